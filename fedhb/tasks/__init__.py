"""Tasks: what a client model is trained for and scored on, one concept per file.

A :class:`~fedhb.tasks.base.Task` owns the head, the loss, the predictions, the metrics and their names, and how
per-client scores are reduced into a round's metrics. The loop and the algorithms see only the task's per-client
score vector, so adding a task (retrieval, segmentation, VQA) is a new file here, not a change to the loop.
"""

from fedhb.tasks.base import Task
from fedhb.tasks.classification import Classification, build_task

__all__ = ["Classification", "Task", "build_task"]
