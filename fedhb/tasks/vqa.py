"""Visual question answering with BLIP (arXiv 2201.12086; :mod:`fedhb.models.blip`): yes/no questions classified,
open-ended answers generated.

The client model is one encoder (BLIP's image and question encoders, LoRA on their attention) and the task's head:

- ``classify`` (yes/no questions; Med-MMFL's protocol, arXiv 2602.04416): Med-MMFL's classifier (hidden -> 512, ReLU,
  dropout, -> 2) on the question encoder's ``[CLS]`` state, cross-entropy. Scores: accuracy and F1 of ``yes``
  (torchmetrics), per client and, from the summed confusion counts, for the global model on the union.
- ``generate`` (open-ended answers): the head is BLIP's answer decoder with its own LoRA (so personalised methods that
  keep the head local keep the decoder's adapters), trained teacher-forced on ``[DEC] answer [SEP]`` with BLIP's
  label-smoothed (0.1) cross-entropy; evaluation decodes greedily up to ``--data.answer_length`` tokens. Scores on
  the normalised answers (SQuAD's normalisation, Rajpurkar et al., arXiv 1606.05250: lower case, no punctuation, no
  articles): exact match, token F1, and corpus BLEU-1..4 (Papineni et al., ACL 2002; uniform weights, brevity
  penalty, the definition of torchmetrics' ``BLEUScore``), per client and, from summed clipped n-gram matches and
  lengths, on the union.

The round's metrics keep the report's names: ``personalized_acc``/``worst_client_acc``/``global_acc`` are accuracy
(classify) or exact match (generate), ``personalized_f1``/``global_f1`` the F1 of yes (classify) or token F1
(generate); ``generate`` adds ``personalized_bleu{1..4}`` and ``global_bleu{1..4}``.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import TYPE_CHECKING, Any

from fedhb.record import Field
from fedhb.tasks.base import Task

if TYPE_CHECKING:
    from torch import Tensor, nn

    from fedhb.data.base import Samples

MODES = ("classify", "generate")
BLEU_ORDERS = (1, 2, 3, 4)
#: BLIP's label smoothing of the answer loss.
LABEL_SMOOTHING = 0.1
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


# -- text metrics (pure Python: the hand-checked reference of the task's statistics) ----------------------------------
def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 of the normalised answers (1 when both are empty, 0 when only one is)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def ngram_stats(prediction: str, reference: str, orders: int = 4) -> list[float]:
    """BLEU's sufficient statistics of one pair: clipped matches of each order, candidate n-grams of each order, and
    the candidate and reference lengths (``2 * orders + 2`` numbers that sum over a corpus)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    matches, possible = [], []
    for n in range(1, orders + 1):
        cand = Counter(tuple(pred[i:i + n]) for i in range(len(pred) - n + 1))
        refs = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        matches.append(float(sum((cand & refs).values())))
        possible.append(float(max(0, len(pred) - n + 1)))
    return [*matches, *possible, float(len(pred)), float(len(ref))]


def bleu_from_stats(stats: list[float], order: int, orders: int = 4) -> float:
    """Corpus BLEU-``order`` from summed :func:`ngram_stats`: the geometric mean of the modified n-gram precisions
    of orders 1..``order`` times the brevity penalty; 0 when some order has no match (as torchmetrics')."""
    matches, possible = stats[:orders], stats[orders:2 * orders]
    cand, ref = stats[2 * orders], stats[2 * orders + 1]
    if cand == 0 or min(matches[:order]) == 0:
        return 0.0
    log_precision = sum(math.log(matches[i] / possible[i]) for i in range(order)) / order
    penalty = 1.0 if cand > ref else math.exp(1 - ref / cand)
    return penalty * math.exp(log_precision)


class VQA(Task):
    """Visual question answering: ``classify`` (yes/no) or ``generate`` (open answers); see the module docstring.

    Args:
        mode: ``classify`` or ``generate``.
        answer_length: Answer tokens (start and end included) the decoder is trained on and generates.
    """

    selection_score = "acc"

    def __init__(self, mode: str, answer_length: int = 16) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown VQA mode {mode!r}; expected one of {MODES}")
        self.mode, self.answer_length = mode, int(answer_length)
        self.tokenizer: Any = None
        self._decoder: Any = None

    @classmethod
    def from_samples(cls, samples: Samples) -> VQA:
        mode = samples.meta.get("vqa_mode")
        if mode not in MODES:
            raise ValueError(f"VQA samples must give their mode in meta['vqa_mode'] (classify or generate), not "
                             f"{mode!r}")
        return cls(mode, int(samples.meta.get("answer_length", 16)))

    @property
    def generative(self) -> bool:
        return self.mode == "generate"

    @property
    def score_names(self) -> tuple[str, ...]:  # type: ignore[override]
        if not self.generative:
            return ("acc", "f1")
        return ("acc", "f1", *(f"bleu{n}" for n in BLEU_ORDERS))

    @property
    def fields(self) -> tuple[Field, ...]:  # type: ignore[override]
        acc, f1 = ("exact match (%)", "token F1 (%)") if self.generative else ("acc (%)", "F1 (%)")
        out = [
            Field("personalized_acc", "personalized/acc", f"personalized {acc}", "fraction", final=True),
            Field("worst_client_acc", "personalized/worst_client_acc", f"worst-client {acc}", "fraction", final=True),
            Field("personalized_f1", "personalized/f1", f1, "fraction", final=True),
            Field("global_acc", "global/acc", f"global {acc}", "fraction", final=True),
            Field("global_f1", "global/f1", kind="fraction", final=True),
        ]
        if self.generative:
            out += [Field(f"personalized_bleu{n}", f"personalized/bleu{n}", kind="fraction", final=True)
                    for n in BLEU_ORDERS]
            out += [Field(f"global_bleu{n}", f"global/bleu{n}", kind="fraction", final=True) for n in BLEU_ORDERS]
        return tuple(out)

    # -- model ---------------------------------------------------------------------------------------------------
    def build_encoders(self, model: Any, samples: Samples) -> dict[str, Any]:
        """BLIP (``--model.backbone``) as the one encoder; the answer decoder waits for :meth:`head`."""
        from fedhb.models.blip import ENCODER_NAME, build_blip

        parts = build_blip(model, self.answer_length if self.generative else 0)
        self.tokenizer, self._decoder = parts.tokenizer, parts.decoder
        return {ENCODER_NAME: parts.encoder}

    def head(self, in_features: int, dropout: float) -> nn.Module:
        from torch import nn

        if self.generative:
            if self._decoder is None:
                raise ValueError("the generative VQA head is BLIP's answer decoder: build the encoders first "
                                 "(VQA.build_encoders)")
            return self._decoder
        return nn.Sequential(nn.Linear(in_features, 512), nn.ReLU(), nn.Dropout(dropout), nn.Linear(512, 2))

    def forward(self, module: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Classify: the head's logits on ``[CLS]``. Generate: teacher-forced next-token logits ``(B, L - 1, V)``
        when gradients are on (training), else greedy answers ``(B, answer_length)`` as float token ids (what the
        loop's predictions concatenate)."""
        import torch

        if not self.generative:
            features = module.features(batch)
            return module.head(features), features
        encoder = next(iter(module.encoders.values()))
        states, mask = encoder.encode(batch)
        features = states[:, 0]
        if torch.is_grad_enabled():
            return module.head(states, mask, batch["answer_ids"]), features
        return module.head.generate(states, mask).float(), features

    def targets(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["answer_ids"] if self.generative else batch["labels"]

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        import torch.nn.functional as F

        if not self.generative:
            return F.cross_entropy(output, targets)
        labels = targets[:, 1:1 + output.shape[1]].long()
        pad = self._decoder.pad if self._decoder is not None else 0
        labels = labels.masked_fill(labels == pad, -100)
        return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), labels.reshape(-1), ignore_index=-100,
                               label_smoothing=LABEL_SMOOTHING)

    def member_scores(self, output: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Yes/no: a classifier's (:func:`fedhb.privacy.audit.confidence`). Open answers: the generated answer's
        token F1 against the reference as the confidence, one minus it as the loss."""
        import torch

        if not self.generative:
            from fedhb.privacy.audit import confidence

            return confidence(output, targets, "multi-class")
        if len(output) == 0:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        f1 = torch.as_tensor(self._pair_scores(output, targets)[1], dtype=torch.float64)
        return 1.0 - f1, f1

    # -- scores --------------------------------------------------------------------------------------------------
    def texts(self, ids: Tensor) -> list[str]:
        """Answers from token ids ``(B, L)`` (the start token dropped, special tokens skipped)."""
        rows = ids.long()[:, 1:].tolist()
        return list(self.tokenizer.batch_decode(rows, skip_special_tokens=True))

    def _pair_scores(self, output: Tensor, targets: Tensor) -> tuple[Any, Any, list[list[float]]]:
        import numpy as np

        preds, refs = self.texts(output), self.texts(targets)
        em = np.array([exact_match(p, r) for p, r in zip(preds, refs)])
        f1 = np.array([token_f1(p, r) for p, r in zip(preds, refs)])
        return em, f1, [ngram_stats(p, r) for p, r in zip(preds, refs)]

    def score(self, output: Tensor, targets: Tensor) -> Tensor:
        import torch

        n = len(targets)
        if n == 0:
            return self.empty_score()
        if not self.generative:
            from torchmetrics.functional.classification import binary_accuracy, binary_f1_score

            pred = output.argmax(1)
            values = [float(binary_accuracy(pred, targets)), float(binary_f1_score(pred, targets))]
            return torch.tensor([*values, float(n)], dtype=torch.float64)
        em, f1, stats = self._pair_scores(output, targets)
        total = [sum(col) for col in zip(*stats)]
        bleu = [bleu_from_stats(total, k) for k in BLEU_ORDERS]
        return torch.tensor([float(em.mean()), float(f1.mean()), *bleu, float(n)], dtype=torch.float64)

    def reduce(self, scores: dict[int, Tensor]) -> dict[str, Any]:
        import numpy as np

        valid = {c: r for c, r in scores.items() if float(r[-1]) > 0}

        def mean(k: int) -> float:
            return float(np.mean([float(r[k]) for r in valid.values()])) if valid else math.nan

        acc = [float(r[0]) for r in valid.values()]
        out: dict[str, Any] = {"personalized_acc": mean(0), "worst_client_acc": float(np.min(acc)) if acc else math.nan,
                               "personalized_f1": mean(1)}
        if self.generative:
            out.update({f"personalized_bleu{n}": mean(1 + n) for n in BLEU_ORDERS})
        out["client_acc"] = {str(c): round(float(r[0]), 6) for c, r in sorted(scores.items())}
        return out

    def global_stats(self, output: Tensor, targets: Tensor) -> Tensor:
        """Classify: ``[tp, fp, fn, tn]``; generate: ``[exact matches, token F1 sum, answers, BLEU statistics]``."""
        import torch

        if not self.generative:
            if len(targets) == 0:
                return torch.zeros(4, dtype=torch.float64)
            pred, y = output.argmax(1), targets.long()
            counts = [((pred == 1) & (y == 1)).sum(), ((pred == 1) & (y == 0)).sum(), ((pred == 0) & (y == 1)).sum(),
                      ((pred == 0) & (y == 0)).sum()]
            return torch.tensor([float(c) for c in counts], dtype=torch.float64)
        width = 3 + 2 * len(BLEU_ORDERS) + 2
        if len(targets) == 0:
            return torch.zeros(width, dtype=torch.float64)
        em, f1, stats = self._pair_scores(output, targets)
        total = [sum(col) for col in zip(*stats)]
        return torch.tensor([float(em.sum()), float(f1.sum()), float(len(em)), *total], dtype=torch.float64)

    def global_metrics(self, stats: Tensor | None) -> dict[str, Any]:
        keys = ["global_acc", "global_f1", *(f"global_bleu{n}" for n in BLEU_ORDERS if self.generative)]
        if stats is None:
            return dict.fromkeys(keys)
        s = [float(x) for x in stats]
        if not self.generative:
            tp, fp, fn, tn = s
            n = tp + fp + fn + tn
            return {"global_acc": (tp + tn) / n if n else math.nan,
                    "global_f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0}
        n = s[2]
        out = {"global_acc": s[0] / n if n else math.nan, "global_f1": s[1] / n if n else math.nan}
        out.update({f"global_bleu{k}": bleu_from_stats(s[3:], k) if n else math.nan for k in BLEU_ORDERS})
        return out
