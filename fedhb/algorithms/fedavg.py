"""FedAvg, with robust server steps (coordinate-wise median, trimmed mean, Krum) as options."""

from __future__ import annotations

import torch

from fedhb.algorithms._ops import State, coordinate_median, krum_scores, trimmed_mean, weighted_average
from fedhb.algorithms.base import Algorithm

AGGREGATIONS = ("mean", "median", "trimmed_mean", "krum")


class FedAvg(Algorithm):
    """Federated Averaging (McMahan et al., arXiv 1602.05629).

    The server's model is the sample-weighted mean of the uploaded trainable tensors (LoRA matrices and head); every
    client receives it. fedhb applies it to the LoRA and head parameters only: the backbone is frozen and identical
    everywhere, so averaging it would change nothing.

    For federations where some hospitals may send corrupted or adversarial updates, ``aggregation`` replaces the mean
    by a robust server step, each as Flower implements it (adap/flower, ``framework/py/flwr/server/strategy/
    aggregate.py``) and each ignoring sample counts, so that a client cannot buy weight by claiming many samples:

    - ``median``: the coordinate-wise median (FedMedian; Yin et al., arXiv 1803.01498);
    - ``trimmed_mean``: the coordinate-wise mean after cutting ``int(trim * n)`` values at each end (Yin et al.;
      Flower's ``FedTrimmedAvg(beta=trim)``);
    - ``krum``: the upload with the smallest sum of squared distances to its ``n - num_malicious - 2`` nearest
      others (Krum; Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
      NeurIPS 2017), or with ``krum_keep = m > 0`` the sample-weighted mean of the ``m`` best-scored (Multi-Krum).
      The distances are over every uploaded tensor at once.
    """

    client_batchable = True  # plain local SGD: --federation.client_batch trains clients together

    has_global_model = True

    def __init__(self, aggregation: str = "mean", trim: float = 0.2, num_malicious: int = 1,
                 krum_keep: int = 0) -> None:
        """
        Args:
            aggregation: ``mean`` (FedAvg), ``median``, ``trimmed_mean`` or ``krum``.
            trim: Fraction of the clients cut at each end by ``trimmed_mean`` (Flower's default 0.2).
            num_malicious: Number of adversarial clients ``f`` that ``krum`` tolerates.
            krum_keep: ``krum`` averages the ``krum_keep`` best-scored uploads (Multi-Krum); 0 keeps the best one.
        """
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"--algorithm.aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        if not 0 <= trim < 0.5:
            raise ValueError(f"--algorithm.trim must be in [0, 0.5), got {trim!r}")
        if num_malicious < 0 or krum_keep < 0:
            raise ValueError(f"--algorithm.num_malicious and --algorithm.krum_keep must be >= 0, got "
                             f"{num_malicious!r} and {krum_keep!r}")
        self.aggregation, self.trim, self.num_malicious, self.krum_keep = aggregation, trim, num_malicious, krum_keep
        self._global: State | None = None

    def combine(self, uploads: dict[int, State], num_samples: dict[int, int]) -> State:
        """The server's model from ``uploads``: their mean or, with ``aggregation``, a robust statistic of them."""
        ids = sorted(uploads)
        mode = getattr(self, "aggregation", "mean")
        states = [uploads[i] for i in ids]
        if mode == "mean":
            return weighted_average(states, [num_samples[i] for i in ids])
        keys = list(states[0])
        if mode == "krum":
            flat = torch.stack([torch.cat([s[k].reshape(-1).to(torch.float64) for k in keys]) for s in states])
            order = torch.argsort(krum_scores(flat, self.num_malicious), stable=True)
            if self.krum_keep > 0:
                best = sorted(int(j) for j in order[:self.krum_keep])
                return weighted_average([states[j] for j in best], [num_samples[ids[j]] for j in best])
            return {k: v.clone() for k, v in states[int(order[0])].items()}
        out = {}
        for k in keys:
            stacked = torch.stack([s[k] for s in states])
            value = coordinate_median(stacked) if mode == "median" else trimmed_mean(stacked, self.trim)
            out[k] = value.to(states[0][k].dtype)
        return out

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> dict[int, State]:
        ids = sorted(uploads)
        avg = self.combine(uploads, num_samples)
        self._global = avg
        return {i: avg for i in ids}

    def global_state(self) -> State | None:
        return self._global

    def state_dict(self) -> dict:
        return {"global": self._global} if self._global is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._global = state.get("global")
