"""3D segmentation of brain tumours into three overlapping regions (whole tumour, tumour core, enhancing tumour), as
the BraTS challenges score it, on MONAI's networks, loss, metrics and sliding-window inference.

- **Model** (:meth:`Segmentation.build_encoders`): the MONAI network ``--model.backbone`` names
  (:mod:`fedhb.models.segmentation`), its encoder the client model's one encoder and its decoder the ``head``.
- **Training** on random ``--data.patch`` cubes: each sample's crop is centred on a tumour voxel with probability
  1/2 and uniform otherwise (the positive/negative sampling of MONAI's ``RandCropByPosNegLabel``), drawn from torch's
  generator, which the loop seeds per client and round (:func:`fedhb.seeds.client_seed`), so the crops are the same
  on any number of processes. When some case lacks a sequence, present sequences are dropped at random too
  (rate :data:`SEQUENCE_DROPOUT`, never a sample's last one; see :mod:`fedhb.models.segmentation`).
- **Loss**: DiceBCE, MONAI's ``DiceLoss(sigmoid=True)`` plus binary cross-entropy, on the three region channels.
- **Evaluation**: MONAI's ``sliding_window_inference`` over the whole preprocessed volume (windows of the patch size,
  ``--data.overlap``), the regions thresholded at probability 1/2, then per case MONAI's ``DiceMetric`` and
  ``HausdorffDistanceMetric(percentile=95)`` (in mm at ``--data.spacing``). As BraTS scores: a region empty in both
  prediction and label has Dice 1 and HD95 0; empty in just one, Dice 0 and HD95 :data:`HD95_EMPTY` mm (BraTS's
  value, the diagonal of its 240 x 240 x 155 mm grid). Evaluating one batch gives one small row per case
  (:data:`CASE_STATS`), never the volumes, so a split's predictions cost a few floats per case.

**Scores.** A client's score is the mean over its test cases of each region's Dice and HD95 and of their means over
the regions; a round reports the mean over clients (``personalized_*``), the worst client's Dice, and every client's
mean Dice (under the per-client key ``client_acc``). The global model is scored on the union of the clients' test
cases from a statistic that sums over clients and processes: the per-case Dice and HD95 summed with the number of
cases, so ``global_dice``/``global_hd95`` are means over every union case (the BraTS ranking's "mean over cases"),
and the intersections and the predicted and true voxel counts summed, for ``global_dice_voxel``, the Dice of the
pooled voxels (larger tumours weigh more).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fedhb.record import Field
from fedhb.tasks.base import Task

if TYPE_CHECKING:
    from torch import Tensor, nn

    from fedhb.data.base import Samples

#: The regions, in channel order, and the labels each covers (BraTS 2023: 1 NETC, 2 SNFH, 3 ET).
REGIONS = {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)}
#: HD95 of a region present in only one of prediction and label (BraTS's convention), in mm.
HD95_EMPTY = 373.12866
#: Rate at which a present sequence is dropped in training when the federation has absent sequences.
SEQUENCE_DROPOUT = 0.25
#: Probability that a training patch is centred on a tumour voxel.
POSITIVE = 0.5
#: One case's evaluation row: Dice and HD95 per region, then intersection, predicted and true voxels per region.
CASE_STATS = tuple(f"{s}_{r}" for s in ("dice", "hd95", "inter", "pred", "true") for r in REGIONS)
#: Batch key under which the training forward leaves its patch's region targets for :meth:`Segmentation.targets`.
PATCH_TARGETS = "patch/regions"


def regions(seg: Tensor) -> Tensor:
    """``(B, 3, ...)`` bool region masks (WT, TC, ET) of ``(B, ...)`` BraTS labels."""
    import torch

    return torch.stack([torch.isin(seg, torch.tensor(labels, device=seg.device, dtype=seg.dtype))
                        for labels in REGIONS.values()], 1)


def case_stats(pred: Tensor, true: Tensor, spacing: float) -> Tensor:
    """``(B, len(CASE_STATS))`` rows of bool region masks ``(B, 3, ...)``, with MONAI's Dice and HD95 (computed on
    the CPU: MONAI's distance transform runs on the GPU only with cuCIM)."""
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    p, t = pred.float().cpu(), true.float().cpu()
    dice = torch.as_tensor(DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, t)).float()
    n_pred, n_true = p.flatten(2).sum(-1), t.flatten(2).sum(-1)
    hd95 = torch.zeros_like(dice)
    both = (n_pred > 0) & (n_true > 0)
    if bool(both.any()):
        import warnings

        with warnings.catch_warnings():  # MONAI warns about the empty masks it then scores as nan/inf
            warnings.simplefilter("ignore")
            full = torch.as_tensor(HausdorffDistanceMetric(include_background=True, percentile=95,
                                                           reduction="none")(p, t, spacing=spacing)).float()
        hd95 = torch.where(both, full.to(hd95.device), hd95)
    hd95 = torch.where((n_pred > 0) != (n_true > 0), torch.full_like(hd95, HD95_EMPTY), hd95)
    inter = (p * t).flatten(2).sum(-1)
    return torch.cat([dice, hd95, inter, n_pred, n_true], 1)


class Segmentation(Task):
    """Brain-tumour segmentation (see the module doc).

    Args:
        channels: The input sequences, in channel order.
        patch: Training patch and inference window side.
        overlap: Sliding-window overlap.
        spacing: Voxel size in mm (HD95's unit).
        sequence_dropout: Rate at which training drops present sequences.
    """

    score_names = ("dice", "dice_wt", "dice_tc", "dice_et", "hd95", "hd95_wt", "hd95_tc", "hd95_et")
    selection_score = "dice"
    fields = (
        Field("personalized_dice", "personalized/dice", "personalized Dice (%)", "fraction", final=True),
        Field("worst_client_dice", "personalized/worst_client_dice", "worst-client Dice (%)", "fraction",
              final=True),
        Field("personalized_dice_wt", "personalized/dice_wt", kind="fraction"),
        Field("personalized_dice_tc", "personalized/dice_tc", kind="fraction"),
        Field("personalized_dice_et", "personalized/dice_et", kind="fraction"),
        Field("personalized_hd95", "personalized/hd95", "HD95 (mm)", higher_is_better=False, final=True),
        Field("personalized_hd95_wt", "personalized/hd95_wt", higher_is_better=False),
        Field("personalized_hd95_tc", "personalized/hd95_tc", higher_is_better=False),
        Field("personalized_hd95_et", "personalized/hd95_et", higher_is_better=False),
        Field("global_dice", "global/dice", "global Dice (%)", "fraction", final=True),
        Field("global_dice_wt", "global/dice_wt", kind="fraction"),
        Field("global_dice_tc", "global/dice_tc", kind="fraction"),
        Field("global_dice_et", "global/dice_et", kind="fraction"),
        Field("global_dice_voxel", "global/dice_voxel", kind="fraction"),
        Field("global_hd95", "global/hd95", "global HD95 (mm)", higher_is_better=False, final=True),
        Field("global_hd95_wt", "global/hd95_wt", higher_is_better=False),
        Field("global_hd95_tc", "global/hd95_tc", higher_is_better=False),
        Field("global_hd95_et", "global/hd95_et", higher_is_better=False),
    )

    def __init__(self, channels: tuple[str, ...], patch: int, overlap: float = 0.5, spacing: float = 1.0,
                 sequence_dropout: float = 0.0) -> None:
        self.channels, self.patch, self.overlap, self.spacing = tuple(channels), patch, overlap, spacing
        self.sequence_dropout = sequence_dropout
        self._decoder: nn.Module | None = None

    @classmethod
    def from_samples(cls, samples: Samples) -> Segmentation:
        present = getattr(samples.inputs, "present", None)
        meta = samples.meta
        if present is None or "patch" not in meta:
            raise ValueError("segmentation samples must come from a volume dataset (fedhb.data.BraTS)")
        absent = not bool(present.all())
        return cls(tuple(meta["channels"]), int(meta["patch"]), float(meta.get("overlap", 0.5)),
                   float(meta.get("spacing", 1.0)), SEQUENCE_DROPOUT if absent else 0.0)

    # -- model ------------------------------------------------------------------------------------------------------
    def build_encoders(self, model: Any, samples: Samples) -> dict[str, Any]:
        from fedhb.models.segmentation import build_segmentation

        net = build_segmentation(model, self.channels, self.patch)
        self._decoder = net.decoder
        return {"image": net.encoder}

    def head(self, in_features: int, dropout: float) -> nn.Module:
        """The network's decoder (built with the encoder by :meth:`build_encoders`)."""
        if self._decoder is None:
            raise RuntimeError("Segmentation.head: build_encoders must build the network first")
        decoder, self._decoder = self._decoder, None
        return decoder

    def forward(self, module: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Training: the logits ``(B, 3, p, p, p)`` of a random patch per sample (its targets left in the batch) and
        the pooled deepest features. Evaluation: each case's :data:`CASE_STATS` row (and no features)."""
        encoder, head = module.encoders["image"], module.head
        if not module.training:
            return self.evaluate(encoder, head, batch), batch["volume"].new_zeros(len(batch["volume"]), 0).float()
        volume, seg = self.crop(batch["volume"], batch["seg"])
        present = self.drop_sequences(batch["present"].bool())
        x = encoder.fill(volume, present)
        features = encoder.encode(x)
        batch[PATCH_TARGETS] = regions(seg)
        return head(x, features), encoder.pooled(features)

    def crop(self, volume: Tensor, seg: Tensor) -> tuple[Tensor, Tensor]:
        """One ``patch`` cube per sample: centred on a tumour voxel with probability :data:`POSITIVE` (when there
        is one), else anywhere, drawn from torch's (seeded) generator; volumes smaller than the patch are padded."""
        import torch

        from fedhb.models.segmentation import pad_to

        p = self.patch
        volume, seg = pad_to(volume, p), pad_to(seg[:, None], p)[:, 0]
        shape = volume.shape[2:]
        crops, labels = [], []
        for b in range(len(volume)):
            u = float(torch.rand(()))
            if u < POSITIVE and bool((seg[b] > 0).any()):
                voxels = (seg[b] > 0).nonzero()
                centre = voxels[int(torch.randint(len(voxels), ()))].tolist()
                start = [min(max(0, c - p // 2), s - p) for c, s in zip(centre, shape)]
            else:
                start = [int(torch.randint(s - p + 1, ())) for s in shape]
            window: Any = tuple(slice(a, a + p) for a in start)
            crops.append(volume[(b, slice(None), *window)])
            labels.append(seg[(b, *window)])
        return torch.stack(crops), torch.stack(labels)

    def drop_sequences(self, present: Tensor) -> Tensor:
        """Training's modality dropout: each present sequence dropped at :attr:`sequence_dropout`, a sample's last
        one kept."""
        import torch

        if self.sequence_dropout <= 0:
            return present
        keep = torch.rand(present.shape) >= self.sequence_dropout
        out = present & keep.to(present.device)
        return torch.where(out.any(1, keepdim=True), out, present)

    def evaluate(self, encoder: Any, head: Any, batch: dict[str, Tensor]) -> Tensor:
        """Each case's :data:`CASE_STATS` row under sliding-window inference, one case at a time."""
        import torch
        from monai.inferers import sliding_window_inference

        def predict(x: Tensor) -> Tensor:
            return head(x, encoder.encode(x))

        rows = []
        for b in range(len(batch["volume"])):
            x = encoder.fill(batch["volume"][b:b + 1], batch["present"][b:b + 1].bool())
            logits = sliding_window_inference(x, self.patch, 1, predict, overlap=self.overlap)
            rows.append(case_stats(torch.as_tensor(logits) > 0, regions(batch["seg"][b:b + 1]), self.spacing))
        if not rows:
            return torch.zeros(0, len(CASE_STATS))
        return torch.cat(rows).float()

    # -- loss and targets -------------------------------------------------------------------------------------------
    def targets(self, batch: dict[str, Tensor]) -> Tensor:
        """Training: the patch's region masks (left by :meth:`forward`); evaluation: each case's id."""
        if PATCH_TARGETS in batch:
            return batch[PATCH_TARGETS]
        return batch["case"]

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        """DiceBCE: MONAI's sigmoid Dice loss plus binary cross-entropy, over the three regions."""
        import torch.nn.functional as F
        from monai.losses import DiceLoss

        y = targets.to(output.dtype)
        return DiceLoss(sigmoid=True)(output, y) + F.binary_cross_entropy_with_logits(output, y)

    # -- scores -----------------------------------------------------------------------------------------------------
    def score(self, output: Tensor, targets: Tensor) -> Tensor:
        """Mean over the cases of each region's Dice and HD95 (and their region means), then the case count."""
        import torch

        if len(output) == 0:
            return self.empty_score()
        stats = output.to(torch.float64)
        dice, hd95 = stats[:, 0:3].mean(0), stats[:, 3:6].mean(0)
        return torch.cat([dice.mean()[None], dice, hd95.mean()[None], hd95,
                          torch.tensor([float(len(output))], dtype=torch.float64)])

    def member_scores(self, output: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Each case's mean Dice over the three regions as the confidence and one minus it as the loss (a model
        segments the cases it trained on better): the evaluation output is a per-case statistics row, not logits."""
        import torch

        dice = output.to(torch.float64)[:, 0:3].mean(1)
        return 1.0 - dice, dice

    def reduce(self, scores: dict[int, Tensor]) -> dict[str, Any]:
        import numpy as np

        from fedhb.record import PER_CLIENT

        rows = {c: r.tolist() for c, r in scores.items()}
        valid = {c: r for c, r in rows.items() if r[-1] > 0}
        names = self.score_names

        def mean(name: str) -> float:
            values = [r[names.index(name)] for r in valid.values()]
            return float(np.mean(values)) if values else math.nan

        dice = [r[0] for r in valid.values()]
        out: dict[str, Any] = {f"personalized_{n}": mean(n) for n in names}
        out["worst_client_dice"] = float(np.min(dice)) if dice else math.nan
        out[PER_CLIENT] = {str(c): round(r[0], 6) for c, r in sorted(rows.items())}
        return out

    def global_stats(self, output: Tensor, targets: Tensor) -> Tensor:
        """Per-case rows summed, then the number of cases (float64; sums over clients and processes)."""
        import torch

        total = torch.zeros(len(CASE_STATS) + 1, dtype=torch.float64)
        if len(output):
            total[:-1] = output.to(torch.float64).sum(0)
            total[-1] = len(output)
        return total

    def global_metrics(self, stats: Tensor | None) -> dict[str, Any]:
        names = [f.key for f in self.fields if f.key.startswith("global_")]
        if stats is None or float(stats[-1]) == 0:
            return dict.fromkeys(names, None if stats is None else math.nan)
        n = float(stats[-1])
        s = [float(v) for v in stats[:-1]]
        dice, hd95 = [v / n for v in s[0:3]], [v / n for v in s[3:6]]
        inter, pred, true = s[6:9], s[9:12], s[12:15]
        voxel = [2 * i / (p + t) if p + t > 0 else 1.0 for i, p, t in zip(inter, pred, true)]
        out = {"global_dice": sum(dice) / 3, "global_hd95": sum(hd95) / 3, "global_dice_voxel": sum(voxel) / 3}
        for r, d, h in zip(REGIONS, dice, hd95):
            out[f"global_dice_{r}"], out[f"global_hd95_{r}"] = d, h
        return {k: out[k] for k in names}
