"""Tasks: what a client model is trained for and scored on, one concept per file.

A :class:`~fedhb.tasks.base.Task` owns the head, the loss, the predictions, the metrics and their names, and how
per-client scores are reduced into a round's metrics. The loop and the algorithms see only the task's per-client
score vector, so adding a task (retrieval, segmentation, VQA) is a new file here and one line in :data:`TASKS`, not a
change to the loop.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fedhb.tasks.base import Task
from fedhb.tasks.classification import Classification

if TYPE_CHECKING:
    from fedhb.data.base import Samples

#: ``Samples.task`` -> the :class:`Task` that trains and scores it, as ``module:Class`` (imported when first built).
TASKS: dict[str, str] = {
    "multi-class": "fedhb.tasks.classification:Classification",
    "binary": "fedhb.tasks.classification:Classification",
    "multi-label": "fedhb.tasks.classification:Classification",
    "retrieval": "fedhb.tasks.retrieval:Retrieval",
    "segmentation": "fedhb.tasks.segmentation:Segmentation",
    "vqa": "fedhb.tasks.vqa:VQA",
}


def build_task(samples: Samples) -> Task:
    """The task ``samples`` declare (``Samples.task``), built from them."""
    if samples.task not in TASKS:
        raise ValueError(f"no task for {samples.task!r}; known: {', '.join(TASKS)}")
    module, name = TASKS[samples.task].split(":")
    return getattr(importlib.import_module(module), name).from_samples(samples)


__all__ = ["TASKS", "Classification", "Task", "build_task"]
