"""Segmentation: Dice, HD95 and DiceBCE against values worked out by hand, scores and union statistics, the MONAI
networks and their checkpoints, and 2-round BraTS federations giving the same numbers on 1 and 2 processes, with and
without missing sequences.

Multi-process runs use ``ddp_spawn`` on CPU; this module must stay importable by the spawned processes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedhb.config import CheckpointArgs, FabricArgs, FederationArgs, ModelArgs, OptimArgs, PartitionArgs
from fedhb.tasks.segmentation import CASE_STATS, HD95_EMPTY, Segmentation, case_stats, regions


def cube(lo: tuple[int, int, int], hi: tuple[int, int, int], size: int = 16) -> torch.Tensor:
    m = torch.zeros(size, size, size, dtype=torch.bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def test_dice_and_hd95_of_hand_made_masks_equal_the_values_worked_out_by_hand():
    # WT: a 4^3 cube and the same cube shifted by one voxel: overlap 3*4*4 = 48, Dice = 2*48 / (64 + 64) = 0.75.
    # TC: a one-voxel-thick slab and the same slab 3 voxels away: Dice 0, and every surface voxel of either lies
    #     exactly 3 voxels (4.5 mm at 1.5 mm) from the other, so HD95 = 4.5.
    # ET: empty in the label, 2 voxels predicted: Dice 0, HD95 = BraTS's 373.13 mm.
    pred = torch.stack([cube((5, 4, 4), (9, 8, 8)), cube((7, 2, 2), (8, 14, 14)), cube((1, 1, 1), (2, 2, 3))])
    true = torch.stack([cube((4, 4, 4), (8, 8, 8)), cube((4, 2, 2), (5, 14, 14)), cube((0, 0, 0), (0, 0, 0))])

    row = dict(zip(CASE_STATS, case_stats(pred[None], true[None], spacing=1.5)[0].tolist()))

    assert row["dice_wt"] == pytest.approx(0.75) and row["dice_tc"] == 0 and row["dice_et"] == 0
    assert row["hd95_tc"] == pytest.approx(4.5) and row["hd95_et"] == pytest.approx(HD95_EMPTY)
    assert (row["inter_wt"], row["pred_wt"], row["true_wt"]) == (48, 64, 64)
    assert (row["pred_et"], row["true_et"]) == (2, 0)
    # Shifted cube: HD95 (in voxels) against a re-derived reference, the 95th percentile of both directed
    # surface-to-surface distances (scipy's exact Euclidean distance transform), the larger of the two.
    from scipy import ndimage

    def surface(m: np.ndarray) -> np.ndarray:
        return m & ~ndimage.binary_erosion(m)

    a, b = pred[0].numpy(), true[0].numpy()
    da = ndimage.distance_transform_edt(~surface(b))[surface(a)]
    db = ndimage.distance_transform_edt(~surface(a))[surface(b)]
    reference = max(np.percentile(da, 95), np.percentile(db, 95))
    assert row["hd95_wt"] == pytest.approx(1.5 * reference, abs=1e-4) and reference > 0
    # Both empty: Dice 1, HD95 0 (BraTS's convention).
    empty = torch.zeros(1, 3, 8, 8, 8, dtype=torch.bool)
    assert case_stats(empty, empty, 1.0)[0, :6].tolist() == [1, 1, 1, 0, 0, 0]


def test_labels_map_to_the_three_overlapping_regions():
    seg = torch.tensor([[0, 1, 2, 3, 4]], dtype=torch.uint8)
    assert regions(seg)[0].int().tolist() == [[0, 1, 1, 1, 0], [0, 1, 0, 1, 0], [0, 0, 0, 1, 0]]


def test_dice_bce_is_sigmoid_dice_plus_binary_cross_entropy():
    logits = torch.tensor([[[2.0, -1.0, 0.5, -3.0]], [[0.0, 1.0, -2.0, 4.0]]]).reshape(2, 1, 2, 2, 1)
    y = torch.tensor([[[1.0, 0.0, 1.0, 0.0]], [[0.0, 1.0, 1.0, 1.0]]]).reshape(2, 1, 2, 2, 1)
    p = torch.sigmoid(logits).flatten(1)
    t = y.flatten(1)
    dice = (1 - (2 * (p * t).sum(1) + 1e-5) / (p.sum(1) + t.sum(1) + 1e-5)).mean()
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    task = Segmentation(("t1c",), 16)
    assert float(task.loss(logits, y.bool())) == pytest.approx(float(dice + bce), rel=1e-5)


def test_scores_reduce_over_clients_and_the_union_sums_cases():
    task = Segmentation(("t1c", "t1n", "t2f", "t2w"), 32)
    # Per case: dice (wt, tc, et), hd95 (wt, tc, et), inter, pred, true (each per region).
    a = torch.tensor([[0.8, 0.6, 0.4, 2, 4, 6, 8, 10, 10, 2, 3, 4, 2, 3, 4],
                      [0.6, 0.4, 0.2, 4, 6, 8, 2, 2, 2, 5, 5, 5, 5, 5, 5]])
    b = torch.tensor([[0.2, 0.2, 0.2, 10, 10, 10, 1, 1, 1, 1, 1, 1, 9, 9, 9]])
    sa, sb = task.score(a, torch.arange(2)), task.score(b, torch.arange(1))
    assert sa.tolist() == pytest.approx([0.5, 0.7, 0.5, 0.3, 5, 3, 5, 7, 2])
    m = task.reduce({0: sa, 1: sb, 2: task.empty_score()})
    assert m["personalized_dice"] == pytest.approx(0.35) and m["worst_client_dice"] == pytest.approx(0.2)
    assert m["personalized_hd95_et"] == pytest.approx(8.5) and m["client_acc"]["1"] == pytest.approx(0.2)
    union = task.global_metrics(task.global_stats(a, None) + task.global_stats(b, None) +
                                task.global_stats(torch.zeros(0, 15), None))
    assert union["global_dice_wt"] == pytest.approx(1.6 / 3) and union["global_hd95"] == pytest.approx(60 / 9)
    voxel = np.mean([2 * 11 / (8 + 16), 2 * 13 / (9 + 17), 2 * 13 / (10 + 18)])
    assert union["global_dice_voxel"] == pytest.approx(voxel)
    assert set(union) == {f.key for f in task.fields if f.key.startswith("global_")}
    assert task.global_metrics(None)["global_dice"] is None


def test_a_swinunetr_checkpoint_loads_into_the_frozen_encoder_and_bad_ones_are_named(tmp_path):
    from monai.networks.nets import SwinUNETR

    from fedhb.models.segmentation import SEGMENTATION_PRESETS, build_segmentation

    torch.manual_seed(1)
    kwargs = SEGMENTATION_PRESETS["tiny-swinunetr"].kwargs
    reference = SwinUNETR(in_channels=4, out_channels=3, spatial_dims=3, **kwargs)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)

    net = build_segmentation(ModelArgs(backbone=f"tiny-swinunetr-lora@{path}"), ("t1c", "t1n", "t2f", "t2w"), 32)

    qkv = net.encoder.model.layers1[0].blocks[0].attn.qkv
    assert torch.equal(qkv.base_layer.weight, reference.swinViT.layers1[0].blocks[0].attn.qkv.weight)
    assert not qkv.base_layer.weight.requires_grad
    assert torch.equal(net.decoder.out.conv.conv.weight, reference.out.conv.conv.weight)
    # The self-supervised encoder's layout: one input channel, keys without "swinViT.".
    one = {f"module.{k}": v for k, v in SwinUNETR(in_channels=1, out_channels=3, spatial_dims=3,
                                                  **kwargs).swinViT.state_dict().items()}
    torch.save({"state_dict": one}, path)
    net = build_segmentation(ModelArgs(backbone=f"tiny-swinunetr@{path}"), ("t1c", "t1n", "t2f", "t2w"), 32)
    spread = one["module.patch_embed.proj.weight"].expand(-1, 4, -1, -1, -1) / 4
    assert torch.equal(net.encoder.model.patch_embed.proj.weight, spread)
    torch.save({"state_dict": {"head.weight": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match=f"no tensor of {path} belongs to a swinunetr network"):
        build_segmentation(ModelArgs(backbone=f"tiny-swinunetr@{path}"), ("t1c",), 32)
    with pytest.raises(ValueError, match="--data.patch 48: tiny-swinunetr needs patch sides that are multiples"):
        build_segmentation(ModelArgs(backbone="tiny-swinunetr"), ("t1c",), 48)
    with pytest.raises(ValueError, match="'tiny-vit' is not a segmentation network"):
        build_segmentation(ModelArgs(backbone="tiny-vit"), ("t1c",), 32)


def test_the_decoder_is_the_head_and_lora_sits_on_the_swin_attention(brats_samples):
    from fedhb.algorithms._ops import is_head
    from fedhb.build import build_module
    from fedhb.models.lora import is_lora

    module = build_module(ModelArgs(backbone="tiny-swinunetr-lora"), brats_samples, OptimArgs(), 0)
    names = list(module.trainable())
    lora = [n for n in names if is_lora(n)]
    assert lora and all(".attn.qkv." in n for n in lora)  # query/value: SwinUNETR's fused qkv
    assert {n for n in names if not is_lora(n) and not is_head(n)} == {"encoders.image.placeholder"}
    assert any(n.startswith("head.decoder1.") for n in names)
    full = build_module(ModelArgs(backbone="tiny-segresnet"), brats_samples, OptimArgs(), 0)
    assert all(p.requires_grad for p in full.parameters()) and any(n.startswith("head.") for n in full.trainable())


# -- federations ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def brats_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    from fedhb.data.fixtures_brats import write_brats_fixture

    return str(write_brats_fixture(tmp_path_factory.mktemp("brats"), cases=6, size=32, seed=0))


@pytest.fixture(scope="module")
def brats_samples(brats_root: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fedhb.data import BraTS

    return BraTS(root=brats_root, size=32, patch=32, cache=str(tmp_path_factory.mktemp("cache"))).load()


#: (algorithm, backbone, sequences removed from one client of two)
PLAN = [("FedAvg", "tiny-segresnet", None), ("FedAvg", "tiny-swinunetr-lora", "t2f,t1c")]


def make_run(root: str, out: Path, algorithm: str, backbone: str, missing: str | None, world: int) -> Any:
    import fedhb.algorithms as algorithms
    from fedhb.data import BraTS
    from fedhb.fit import _Run

    args = dict(
        data=BraTS(root=root, size=32, patch=32, volume_bins=1, cache=str(out / "cache")),
        algorithm=getattr(algorithms, algorithm)(), out_dir=str(out), seed=5,
        partition=PartitionArgs(scheme="iid", num_clients=2, min_samples=2, split=(0.67, 0.0, 0.33),
                                missing_modality=missing, missing_fraction=0.5),
        model=ModelArgs(backbone=backbone), federation=FederationArgs(rounds=2, batch_size=2, eval_batch_size=2),
        optim=OptimArgs(name="adam", lr=2e-3, schedule="constant", min_lr=0.0),
        fabric=FabricArgs(accelerator="cpu", devices=world, strategy="ddp_spawn" if world > 1 else "auto"),
        checkpoint=CheckpointArgs(minutes=0),
    )
    return _Run.of(**args)


def federations(fabric: Any, root: str, out: str) -> dict[str, Any] | None:
    summaries = {}
    for algorithm, backbone, missing in PLAN:
        folder = Path(out) / f"{backbone}-{missing}"
        summary = make_run(root, folder, algorithm, backbone, missing, fabric.world_size)(fabric)
        if fabric.global_rank == 0:
            summary["history"] = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
            summaries[folder.name] = summary
    return summaries if fabric.global_rank == 0 else None


def launch(world: int, root: str, out: Path) -> dict[str, Any]:
    from fedhb.strategy import make_fabric

    args = FabricArgs(accelerator="cpu", devices=world, strategy="ddp_spawn" if world > 1 else "auto")
    return make_fabric(args).launch(federations, root, str(out))


@pytest.mark.slow
def test_a_brats_federation_gives_the_same_numbers_on_1_and_2_processes_with_and_without_missing_sequences(
        brats_root, tmp_path):
    one = launch(1, brats_root, tmp_path / "one")
    two = launch(2, brats_root, tmp_path / "two")

    assert set(one) == {"tiny-segresnet-None", "tiny-swinunetr-lora-t2f,t1c"}
    task = Segmentation(("t1c",), 32)
    keys = [f.key for f in task.fields] + ["train_loss", "bytes_total"]
    for name in one:
        assert one[name]["world_size"] == 1 and two[name]["world_size"] == 2
        assert len(one[name]["history"]) == 2  # both rounds evaluated
        for a, b in zip(one[name]["history"], two[name]["history"], strict=True):
            for key in keys:
                assert math.isfinite(a[key]), (name, key)
                assert a[key] == pytest.approx(b[key], abs=1e-6), (name, key)
            assert a["client_acc"] == pytest.approx(b["client_acc"], abs=1e-6) and a["failures"] == []
            assert 0 <= a["personalized_dice"] <= 1 and a["global_hd95"] >= 0
    # With the sequences removed from one client, its cases hold t1n and t2w only.
    from fedhb.data import BraTS
    from fedhb.fit import prepare_partition

    run = make_run(brats_root, tmp_path / "check", *PLAN[1], world=1)
    samples, splits, _ = prepare_partition(run.data, run.partition, run.seed)
    present = samples.inputs.present
    held = [present[np.concatenate([s.train, s.test])].all(0).tolist() for s in splits]
    assert sorted(held) == [[False, True, False, True], [True, True, True, True]]
    assert isinstance(run.data, BraTS)
