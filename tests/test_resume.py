"""Checkpoints and resume: a killed federation continues with exactly the numbers of an uninterrupted one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedhb.algorithms import EPFL, FedAvg
from fedhb.checkpoint import list_checkpoints
from fedhb.config import CheckpointArgs, FabricArgs, FederationArgs, OptimArgs, PartitionArgs
from fedhb.data import MedMNIST
from fedhb.fit import fit
from fedhb.io import read_jsonl

ROUNDS = 5


def comparable(out: Path) -> list[dict]:
    records = read_jsonl(out / "metrics.jsonl")
    for r in records:
        r.pop("round_time_s")
    return records


def cli(root: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedhb", "fit", "--data", "MedMNIST", "--data.root", root, "--algorithm", "EPFL",
            "--partition.num_clients", "4", "--partition.alpha", "0.5", "--federation.rounds", str(ROUNDS),
            "--optim.name", "adamw", "--optim.lr", "0.01", "--checkpoint.every", "1", "--seed", "3",
            "--fabric.accelerator", "cpu", "--out_dir", str(out), *extra]


@pytest.fixture(scope="module")
def uninterrupted(organamnist_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    subprocess.run(cli(organamnist_root, out), check=True, capture_output=True, timeout=300)
    return comparable(out)


@pytest.mark.slow
def test_sigkill_at_a_random_round_then_resume_gives_the_same_metrics(organamnist_root, tmp_path, uninterrupted):
    out = tmp_path / "run"
    kill_after = random.Random(os.getpid()).randint(1, ROUNDS - 2)
    proc = subprocess.Popen(cli(organamnist_root, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(read_jsonl(out / "metrics.jsonl")) >= kill_after:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    subprocess.run(cli(organamnist_root, out, "--resume", "auto"), check=True, capture_output=True, timeout=300)

    assert comparable(out) == uninterrupted


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_stops_at_a_round_boundary_with_a_checkpoint_and_resume_is_exact(
        organamnist_root, tmp_path, uninterrupted, sig, code):
    # Prepare: checkpoints only at the end (--checkpoint.every 0, no time-based saves): the signal must save one.
    out = tmp_path / "run"
    args = cli(organamnist_root, out, "--checkpoint.every", "0", "--checkpoint.minutes", "0")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(read_jsonl(out / "metrics.jsonl")) >= 2:
            break
        time.sleep(0.05)

    # Execute
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=240)

    # Assert: the exit code of a signalled program, no traceback, one line saying how to continue.
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"fedhb: stopped by {signal.Signals(sig).name} after round ") and "--resume auto" in last
    stopped = len(read_jsonl(out / "metrics.jsonl"))
    assert 2 <= stopped < ROUNDS and [p.name for p in list_checkpoints(out)] == [f"round-{stopped:06d}.ckpt"]
    assert not (out / "summary.json").exists()
    subprocess.run(args + ["--resume", "auto"], check=True, capture_output=True, timeout=300)
    assert comparable(out) == uninterrupted


@pytest.mark.slow
def test_kill_mid_checkpoint_keeps_the_previous_one_and_resumes_exactly(organamnist_root, tmp_path, uninterrupted):
    out = tmp_path / "run"
    crashed = subprocess.run(cli(organamnist_root, out), env={**os.environ, "FEDHB_FAULT": "checkpoint:3"},
                             capture_output=True, timeout=300)
    assert crashed.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(out)] == ["round-000001.ckpt", "round-000002.ckpt"]
    assert list((out / "checkpoints").glob(".round-000003.ckpt.tmp"))  # the torn write, never listed

    subprocess.run(cli(organamnist_root, out, "--resume", "auto"), check=True, capture_output=True, timeout=300)

    assert comparable(out) == uninterrupted
    assert not list((out / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
def test_sigkill_of_a_two_process_federation_then_resume_gives_the_same_metrics(organamnist_root, tmp_path,
                                                                                 uninterrupted):
    out = tmp_path / "run"
    ddp = ("--fabric.devices", "2", "--fabric.strategy", "ddp")
    proc = subprocess.Popen(cli(organamnist_root, out, *ddp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(read_jsonl(out / "metrics.jsonl")) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # both ranks at once, as a pre-empted job
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    subprocess.run(cli(organamnist_root, out, "--resume", "auto", *ddp), check=True, capture_output=True,
                   timeout=300)

    for a, b in zip(uninterrupted, comparable(out), strict=True):
        assert a["personalized_acc"] == pytest.approx(b["personalized_acc"], abs=1e-6)
        assert a["client_acc"] == pytest.approx(b["client_acc"], abs=1e-6)
        assert a["bytes_total"] == b["bytes_total"]


def _fit(root, out, algorithm=None, rounds=3, devices=1, **kw):
    return fit(data=MedMNIST(root=root), algorithm=algorithm or FedAvg(), out_dir=str(out), seed=5,
               partition=PartitionArgs(num_clients=4, alpha=0.5), federation=FederationArgs(rounds=rounds),
               optim=kw.pop("optim", OptimArgs(name="adamw", lr=0.01)),
               checkpoint=kw.pop("checkpoint", CheckpointArgs(every=1, keep=2)),
               fabric=FabricArgs(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto"),
               **kw)


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_processes_with_the_same_numbers(organamnist_root, tmp_path):
    _fit(organamnist_root, tmp_path / "full", EPFL(), rounds=3)
    _fit(organamnist_root, tmp_path / "part", EPFL(), rounds=3)
    (tmp_path / "part" / "checkpoints" / "round-000003.ckpt").unlink()  # as if killed after round 2

    summary = _fit(organamnist_root, tmp_path / "part", EPFL(), rounds=3, devices=2, resume="auto")

    assert summary["world_size"] == 2
    for a, b in zip(comparable(tmp_path / "full"), comparable(tmp_path / "part"), strict=True):
        assert a["personalized_acc"] == pytest.approx(b["personalized_acc"], abs=1e-6)
        assert a["client_acc"] == pytest.approx(b["client_acc"], abs=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)


def test_newest_n_checkpoints_are_kept_and_load_with_weights_only(organamnist_root, tmp_path):
    _fit(organamnist_root, tmp_path / "r", rounds=3)

    kept = list_checkpoints(tmp_path / "r")
    assert [p.name for p in kept] == ["round-000002.ckpt", "round-000003.ckpt"]
    state = torch.load(kept[-1], weights_only=True)  # safe deserialisation: tensors and plain containers only
    assert state["round"] == 3 and len(state["clients"]) == 4 and "global" in state["algorithm"]


def test_a_resumed_run_logs_each_round_once_to_tensorboard_and_counts_its_earlier_time(organamnist_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Prepare: a finished run that then lost its last checkpoint, as if killed after logging round 3.
    out = tmp_path / "r"
    _fit(organamnist_root, out, rounds=3)
    earlier = torch.load(out / "checkpoints" / "round-000002.ckpt", weights_only=True)["wall_time_s"]
    (out / "checkpoints" / "round-000003.ckpt").unlink()

    # Execute
    began = time.perf_counter()
    summary = _fit(organamnist_root, out, rounds=3, resume="auto")
    resumed_for = time.perf_counter() - began

    # Assert: TensorBoard shows round 3 once (the redone one), as metrics.jsonl does.
    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    logged = events.Scalars("personalized/acc")
    assert [e.step for e in logged] == [1, 2, 3]
    records = read_jsonl(out / "metrics.jsonl")
    assert [e.value for e in logged] == pytest.approx([r["personalized_acc"] for r in records])
    # The wall time covers the rounds before the checkpoint, run by the first process, too: more than this call took.
    assert 0 < earlier < summary["wall_time_s"]
    assert resumed_for < summary["wall_time_s"] <= earlier + resumed_for


def test_resuming_a_finished_run_does_nothing(organamnist_root, tmp_path, capsys):
    _fit(organamnist_root, tmp_path / "r", rounds=2)
    before = (tmp_path / "r" / "metrics.jsonl").read_text()

    summary = _fit(organamnist_root, tmp_path / "r", rounds=2, resume="auto")

    assert "already finished all 2 rounds; nothing to do" in capsys.readouterr().out
    assert summary["rounds"] == 2
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_a_truncated_checkpoint_is_refused_by_name_and_auto_falls_back(organamnist_root, tmp_path):
    out = tmp_path / "r"
    _fit(organamnist_root, out, rounds=2, checkpoint=CheckpointArgs(every=1, keep=5))
    newest = list_checkpoints(out)[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    (out / "summary.json").unlink()

    with pytest.raises(ValueError, match=f"--resume {newest}: the checkpoint cannot be read"):
        _fit(organamnist_root, out, rounds=2, resume=str(newest))
    summary = _fit(organamnist_root, out, rounds=2, resume="auto")  # skips the torn file, resumes from round 1

    assert summary["final"]["round"] == 2
    assert [r["round"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


def test_a_checkpoint_from_another_config_names_the_differing_fields(organamnist_root, tmp_path):
    out = tmp_path / "r"
    _fit(organamnist_root, out, rounds=2)
    (out / "summary.json").unlink()

    with pytest.raises(ValueError) as err:
        _fit(organamnist_root, out, rounds=2, resume="auto", optim=OptimArgs(name="adamw", lr=0.02))

    assert "--optim.lr: checkpoint has 0.01, this run has 0.02" in str(err.value)
    assert "--fabric" not in str(err.value)  # devices and precision may change on resume


def test_a_file_that_is_not_a_checkpoint_is_refused(organamnist_root, tmp_path):
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"weights": torch.zeros(2)}, bogus)

    with pytest.raises(ValueError, match=r"not a fedhb checkpoint \(missing \['algorithm'"):
        _fit(organamnist_root, tmp_path / "r", rounds=1, resume=str(bogus))
