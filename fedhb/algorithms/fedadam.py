"""FedAdam."""

from __future__ import annotations

from fedhb.algorithms.fedopt import FedOpt


class FedAdam(FedOpt):
    """FedAdam (Reddi et al., "Adaptive Federated Optimization", arXiv 2003.00295): a server-side Adam step on the
    averaged client update, with second moment ``v <- beta2 v + (1 - beta2) delta^2`` (no bias correction, as in the
    paper; ``variant="flower"`` adds Flower's).

    See :class:`~fedhb.algorithms.fedopt.FedOpt` for the update and the deliberate differences from the paper.
    """

    rule = "adam"
