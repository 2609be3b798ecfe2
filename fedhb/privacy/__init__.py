"""Privacy a review board can read: differential privacy with accounting, secure aggregation, a measured audit.

- :mod:`fedhb.privacy.client_dp`: client-level DP (DP-FedAvg, adaptive clipping) as a wrapper algorithm;
- :mod:`fedhb.privacy.dpsgd`: sample-level DP-SGD inside each client (opacus' per-sample gradients);
- :mod:`fedhb.privacy.accounting`: ε from opacus' RDP or PRV accountant, and the noise for a target ε;
- :mod:`fedhb.privacy.secagg` and :mod:`fedhb.privacy.shamir`: SecAgg/SecAgg+ with X25519, HKDF, ChaCha20 masks
  and Shamir recovery of dropped clients;
- :mod:`fedhb.privacy.audit`: membership inference (loss threshold, LiRA-offline) against each client's model;
- :mod:`fedhb.privacy.stack`: the wrappers a run's options call for.
"""

from fedhb.privacy.stack import wrap_privacy

__all__ = ["wrap_privacy"]
