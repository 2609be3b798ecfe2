"""The task contract."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

    from fedhb.data.base import Samples
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
    #: Whether the client model's fusion step is trained; a task that uses the modalities apart (retrieval's
    #: per-modality projections) sets it false and the client model freezes the fusion step (not uploaded).
    uses_fusion: bool = True

    @classmethod
    def from_samples(cls, samples: Samples) -> Task:
        """The task ``samples`` declare (``Samples.task``), sized from them (classes, labels, regions, ...)."""
        raise NotImplementedError

    @property
    def width(self) -> int:
        """Length of a client's score vector."""
        return len(self.score_names) + 1

    def head(self, in_features: int, dropout: float) -> nn.Module:
        """The trainable head on the fused features."""
        raise NotImplementedError

    def build_encoders(self, model: Any, samples: Samples) -> dict[str, Any] | None:
        """The client model's encoders for this task, from ``--model`` options (:class:`~fedhb.config.ModelArgs`)
        and the samples; ``None`` (the default): one per modality, as :func:`fedhb.models.build_encoders` builds
        them. A task whose model is not "an encoder per modality" (a segmentation network over four MRI sequences,
        BLIP over an image and a question) returns its own (one encoder: no fusion step)."""
        return None

    def forward(self, module: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The head's output on a batch and the representation it was computed from (what MOON-style methods
        contrast), from a :class:`~fedhb.client.ClientModule`: by default the head on the fused features. A task
        whose output is not "head of fused features" (retrieval's per-modality embeddings, a segmentation map)
        overrides this; training, evaluation and every algorithm go through it."""
        features = module.features(batch)
        return module.head(features), features

    def tensors(self, samples: Samples) -> dict[str, Tensor]:
        """Tensors the task needs beyond the encoders' inputs and ``labels``, indexed by sample, prepared once with
        them (retrieval's ``index``: each sample's row); default none."""
        return {}

    def targets(self, batch: dict[str, Tensor]) -> Tensor:
        """What :meth:`loss`, :meth:`score` and :meth:`global_stats` compare the output with (``labels``)."""
        return batch["labels"]

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def score(self, output: Tensor, targets: Tensor) -> Tensor:
        """One client's score vector from the head's outputs on a split."""
        raise NotImplementedError

    def member_scores(self, output: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """What the membership-inference audit (:mod:`fedhb.privacy.audit`) attacks, per example of an evaluation
        pass: its loss and a confidence that is higher the more the model fits it (float64, ``(n,)`` each; NaN for an
        example that cannot be scored, which the audit leaves out). Default: the task loss of each example alone and
        its negative; tasks whose loss needs a batch (contrastive) or whose evaluation output is not the head's
        (segmentation's per-case statistics) override it."""
        import torch

        loss = torch.stack([self.loss(output[i:i + 1], targets[i:i + 1]).to(torch.float64)
                            for i in range(len(output))]) if len(output) else torch.zeros(0, dtype=torch.float64)
        return loss, -loss

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
