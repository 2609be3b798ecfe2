"""The task contract."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

    from fedhb.record import Field


class Task:
    """What is trained and scored: head, loss, metrics and their names, and how per-client scores are reduced.

    Scores cross processes as one float64 vector per client, laid out as :attr:`score_names` followed by the number
    of samples scored; global scores (the global model on the union of the clients' test splits) as a statistic
    that sums over clients and processes (:meth:`global_stats`), so every rank computes the same metrics.
    """

    #: Per-client score names, in vector order (the vector has one more entry: the number of samples).
    score_names: tuple[str, ...] = ()
    #: The score that picks a client's best validation round (``--federation.eval_protocol fhbench``).
    selection_score: str = ""
    #: The round metrics this task adds to ``metrics.jsonl`` (keys, TensorBoard tags, report columns).
    fields: tuple[Field, ...] = ()

    @property
    def width(self) -> int:
        """Length of a client's score vector."""
        return len(self.score_names) + 1

    def head(self, in_features: int, dropout: float) -> nn.Module:
        """The trainable head on the fused features."""
        raise NotImplementedError

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def score(self, output: Tensor, targets: Tensor) -> Tensor:
        """One client's score vector from the head's outputs on a split."""
        raise NotImplementedError

    def empty_score(self) -> Tensor:
        """The score vector of a client with nothing to score (NaN scores, 0 samples)."""
        import torch

        return torch.cat([torch.full((self.width - 1,), float("nan"), dtype=torch.float64),
                          torch.zeros(1, dtype=torch.float64)])

    def reduce(self, scores: dict[int, Tensor]) -> dict[str, Any]:
        """A round's metrics from every client's score vector (clients with 0 samples are ignored)."""
        raise NotImplementedError

    def global_stats(self, output: Tensor, targets: Tensor) -> Tensor:
        """A statistic of one client's test split under the global model that sums over clients."""
        raise NotImplementedError

    def global_metrics(self, stats: Tensor | None) -> dict[str, Any]:
        """Global metrics from the summed statistic (``None``: the method has no global model)."""
        raise NotImplementedError
