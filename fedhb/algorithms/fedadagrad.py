"""FedAdagrad."""

from __future__ import annotations

from fedhb.algorithms.fedopt import FedOpt


class FedAdagrad(FedOpt):
    """FedAdagrad (Reddi et al., "Adaptive Federated Optimization", arXiv 2003.00295): a server-side Adagrad step on the
    averaged client update, with second moment ``v <- v + delta^2`` (``beta2`` is unused; ``variant="flower"`` also
    sets ``beta1 = 0``, as Flower's FedAdagrad).

    See :class:`~fedhb.algorithms.fedopt.FedOpt` for the update and the deliberate differences from the paper.
    """

    rule = "adagrad"
