"""``--fast_dev_run true``: any config end to end in seconds, to find mistakes before a long run (as Lightning's
``Trainer(fast_dev_run=True)``).

The data is read, checked, partitioned and split with the configured scheme (so a malformed file fails as it would)
over at most 3 clients of at least 2 samples, ``--data.fraction`` keeping at least 200 samples (so that a fixture,
or a small sample of the data, partitions), then
every backbone is replaced by the tiny random-init preset of its family (:data:`fedhb.models.TINY_PRESETS`), the run
has 2 rounds, and each client keeps the first ``2 * batch_size`` samples of its training split (at most 2 batches per
epoch) and ``2 * eval_batch_size`` of its validation and test splits. Outputs are written as usual; ``config.yaml``
keeps the config's own values and ``fast_dev_run: true``, so it reruns the same dev run.
"""

from __future__ import annotations

import dataclasses

from fedhb.config import FederationArgs, ModelArgs, PartitionArgs
from fedhb.data.base import Samples
from fedhb.data.partition import ClientSplit

ROUNDS = 2
BATCHES = 2
CLIENTS = 3
MIN_SAMPLES = 2


def dev_federation(federation: FederationArgs) -> FederationArgs:
    """2 rounds (both evaluated when ``eval_every`` is 1, the last one otherwise), at most 3 clients required."""
    return dataclasses.replace(federation, rounds=ROUNDS, min_clients=min(federation.min_clients, CLIENTS))


def dev_partition(partition: PartitionArgs) -> PartitionArgs:
    """The configured scheme over at most 3 clients of at least 2 samples."""
    return dataclasses.replace(partition, num_clients=min(partition.num_clients, CLIENTS),
                               min_samples=min(partition.min_samples, MIN_SAMPLES))


def dev_model(model: ModelArgs, samples: Samples) -> ModelArgs:
    """Every backbone replaced by its family's tiny preset (a preset of the same model class, so the configured LoRA
    targets exist in it)."""
    if samples.task == "vqa":  # one BLIP over image and question (fedhb.models.blip)
        from fedhb.models.blip import TINY_BLIP

        return dataclasses.replace(model, backbone=TINY_BLIP)
    if samples.task == "segmentation":  # one MONAI network over the four MRI sequences (fedhb.models.segmentation)
        from fedhb.models.segmentation import tiny_segmentation_preset

        return dataclasses.replace(model, backbone=tiny_segmentation_preset(model.backbone))
    if samples.modality != "multimodal":
        return dataclasses.replace(model, backbone=tiny_preset(samples.modality, model.backbone))
    given = model.backbones or {}
    return dataclasses.replace(model, backbones={m: tiny_preset(m, given.get(m, "")) for m in samples.modalities})


def tiny_preset(modality: str, backbone: str) -> str:
    """The tiny preset of ``backbone``'s family: ``tiny-roberta`` for a RoBERTa, ``tiny-bert`` for other text
    models (BERT, MiniLM), else the modality's one (:data:`fedhb.models.TINY_PRESETS`)."""
    from fedhb.models import TINY_PRESETS

    if modality not in TINY_PRESETS:
        raise ValueError(f"--fast_dev_run: no tiny preset for the {modality!r} modality")
    if modality == "text" and "roberta" in backbone.lower():
        return "tiny-roberta"
    return TINY_PRESETS[modality]


def dev_splits(splits: list[ClientSplit], federation: FederationArgs) -> list[ClientSplit]:
    """Each client's first ``BATCHES`` training batches and evaluation batches (sample order as partitioned)."""
    train, evaluate = BATCHES * federation.batch_size, BATCHES * federation.eval_batch_size
    return [ClientSplit(s.train[:train], s.val[:evaluate], s.test[:evaluate]) for s in splits]
