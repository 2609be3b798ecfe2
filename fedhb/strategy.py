"""Fabric set-up for client parallelism.

fedhb parallelises over *clients*, not over batches: every rank trains its own clients with its own data, so the
gradients of two ranks must never be averaged. ``ClientParallelStrategy`` is Lightning's DDP strategy (process group,
launchers, SLURM/torchrun environments, collectives) without the ``DistributedDataParallel`` wrapper, whose gradient
all-reduce would mix clients and hang when ranks take different numbers of steps.

Cluster environments come from Fabric: under ``srun`` Lightning's ``SLURMEnvironment`` supplies rank, world size and
the main address, under ``torchrun`` ``TorchElasticEnvironment`` does. :func:`make_fabric` only checks that the
``--fabric.*`` flags agree with what SLURM started, naming the flag to change.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

from lightning.fabric.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.strategies import DDPStrategy
from torch.nn import Module

from fedhb.config import FabricArgs


class ClientParallelStrategy(DDPStrategy):
    """DDP's process group, launchers and collectives; modules are moved to the device but not DDP-wrapped.

    Each process destroys its process group when it exits. Left to interpreter finalization, gloo's worker threads can
    release tensors after Python is gone, and the process then aborts ("terminate called without an active exception",
    SIGABRT) after its work is done, which a ``ddp_spawn`` parent reports as a failed run.
    """

    def setup_module(self, module: Module) -> Module:  # type: ignore[override]
        return module

    def setup_environment(self) -> None:
        super().setup_environment()
        atexit.unregister(destroy_process_group)  # once per process, however many Fabrics it sets up
        atexit.register(destroy_process_group)


def destroy_process_group() -> None:
    """Destroy this process's default process group (and every group made from it), if one is initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_accelerator(name: str) -> str:
    """``auto``/``gpu`` resolved as Lightning resolves them (MPS, then CUDA, then CPU); other names unchanged."""
    if name in ("auto", "gpu"):
        if MPSAccelerator.is_available():
            return "mps"
        if CUDAAccelerator.is_available():
            return "cuda"
        if name == "gpu":
            raise ValueError("--fabric.accelerator gpu: no CUDA or MPS device is visible; use auto or cpu")
        return "cpu"
    return name


def processes_per_node(args: FabricArgs, accelerator: str) -> int:
    """How many processes ``--fabric.devices`` starts on each node (``auto``: one per visible GPU, else one)."""
    if args.devices == "auto":
        return CUDAAccelerator.auto_device_count() if accelerator == "cuda" else 1
    return int(args.devices)


def check_slurm(args: FabricArgs, per_node: int) -> None:
    """Refuse flags that disagree with the tasks ``srun`` started (each task would otherwise run alone or hang).

    Lightning detects SLURM when ``SLURM_NTASKS`` is set and the job is not named ``bash`` or ``interactive``.
    """
    if not SLURMEnvironment.detect():
        return
    ntasks = int(os.environ["SLURM_NTASKS"])
    nnodes = int(os.environ.get("SLURM_NNODES", "1"))
    per_task = os.environ.get("SLURM_NTASKS_PER_NODE")
    if ntasks > 1 and args.strategy == "ddp_spawn":
        raise ValueError("--fabric.strategy ddp_spawn cannot run under srun, which starts one process per task "
                         "itself; use --fabric.strategy ddp")
    if nnodes != args.num_nodes:
        raise ValueError(f"--fabric.num_nodes must equal the SLURM allocation's node count (--nodes={nnodes}), got "
                         f"{args.num_nodes}")
    wanted = ntasks // max(1, nnodes)
    if per_task is not None and per_task.isdigit():
        wanted = int(per_task)
    if per_node * args.num_nodes != ntasks or per_node != wanted:
        raise ValueError(f"--fabric.devices must equal SLURM's tasks per node ({wanted}: --ntasks-per-node, one task "
                         f"per GPU) so that {ntasks} tasks make {ntasks} processes, got {args.devices}")


def make_fabric(args: FabricArgs, loggers: list[Any] | None = None) -> Any:
    """A ``lightning.Fabric`` for ``--fabric.*`` with a client strategy.

    More than one process in all (``--fabric.devices`` > 1, ``auto`` on a multi-GPU node, ``--fabric.num_nodes`` > 1,
    or ``--fabric.strategy ddp``/``ddp_spawn``) gives :class:`ClientParallelStrategy`: ``ddp_spawn`` spawns the
    processes from this one, ``ddp`` (and ``auto``) re-runs the command per process or, under ``srun``/``torchrun``,
    joins the processes they started. Otherwise Lightning's single-device strategy on the first device.

    Precision is Lightning's: the plug-in converts the module, and since these strategies do not wrap it, Fabric's
    autocast reaches ``training_step``/``validation_step`` only where the caller enters ``fabric.autocast()`` (the
    loop's evaluation does). ``16-mixed`` on CPU falls back to ``bf16-mixed`` with Lightning's warning. Torch threads
    are Lightning's too: ``OMP_NUM_THREADS`` if set, else cores // processes.
    """
    import lightning as L

    accelerator = resolve_accelerator(args.accelerator)
    per_node = processes_per_node(args, accelerator)
    check_slurm(args, per_node)
    if accelerator == "cpu" and os.environ.get("LOCAL_RANK", "0") == "0":  # once per node, not once per process
        from fedhb.resources import available_cores, cpu_oversubscription_warning

        line = cpu_oversubscription_warning(per_node, available_cores())
        if line is not None:
            print(line, file=sys.stderr)
    strategy: Any = "auto"  # one process: Lightning's SingleDeviceStrategy
    if args.strategy in ("ddp", "ddp_spawn") or args.num_nodes > 1 or per_node > 1:
        # Never Lightning's own choice here: on several devices "auto" means DDP, whose gradient sync mixes clients.
        strategy = ClientParallelStrategy(start_method="spawn" if args.strategy == "ddp_spawn" else "popen")
    return L.Fabric(accelerator=accelerator, devices=per_node, num_nodes=args.num_nodes, strategy=strategy,
                    precision=args.precision, loggers=loggers)  # type: ignore[arg-type]  # checked in FabricArgs
