"""The CPU oversubscription warning: one line when a run starts more CPU processes than there are cores."""

from __future__ import annotations

import pytest

from fedhb.resources import available_cores, cpu_oversubscription_warning


def test_more_processes_than_cores_gives_one_line_naming_both():
    line = cpu_oversubscription_warning(8, 2)

    assert line is not None and "\n" not in line
    assert line.startswith("fedhb: warning: --fabric.devices 8 starts 8 CPU processes on 2 cores")
    assert "--fabric.devices 2" in line  # what to use instead


@pytest.mark.parametrize(("processes", "cores"), [(1, 1), (2, 2), (2, 16)])
def test_processes_that_fit_say_nothing(processes, cores):
    assert cpu_oversubscription_warning(processes, cores) is None


def test_one_core_is_singular():
    assert "on 1 core:" in (cpu_oversubscription_warning(3, 1) or "")


def test_available_cores_is_at_least_one():
    assert available_cores() >= 1


def test_make_fabric_warns_once_when_cpu_processes_exceed_the_cores(monkeypatch, capsys):
    import fedhb.resources
    from fedhb.config import FabricArgs
    from fedhb.strategy import make_fabric

    monkeypatch.setattr(fedhb.resources, "available_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)

    make_fabric(FabricArgs(accelerator="cpu", devices=3, strategy="ddp_spawn"))
    make_fabric(FabricArgs(accelerator="cpu", devices=2, strategy="ddp_spawn"))

    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [cpu_oversubscription_warning(3, 2)]
