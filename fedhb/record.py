"""One definition of what a round records: the ``metrics.jsonl`` keys, the TensorBoard tags and the report's columns.

A round's record is the task's metrics (:attr:`fedhb.tasks.base.Task.fields`) followed by the loop's own
(:data:`LOOP_FIELDS`); :func:`round_record` builds it, :func:`tensorboard_scalars` turns it into tags, and
``fedhb report`` takes its columns from the fields with a ``title``. Nothing else spells these names.

This module imports nothing heavy, so the report and the CLI can read it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Field:
    """One recorded value.

    Attributes:
        key: Its key in ``metrics.jsonl`` (and in ``summary.json``'s ``final`` record).
        tag: Its TensorBoard scalar tag, or ``None`` when it is not a scalar (lists, per-client dicts).
        title: Its column title in ``fedhb report``, or ``None`` when it is not a column.
        kind: ``fraction`` (shown in %), ``bytes``, ``seconds``, ``count``, ``loss`` or ``other``.
        higher_is_better: Which way is better (for the report's ranking).
        final: Whether TensorBoard's HParams tab shows its final value (``final/<key>``).
        summary: Whether it is a whole-run value read from ``summary.json`` (not a round's).
    """

    key: str
    tag: str | None = None
    title: str | None = None
    kind: str = "other"
    higher_is_better: bool = True
    final: bool = False
    summary: bool = False


#: What the loop records every evaluated round, after the task's metrics.
LOOP_FIELDS = (
    Field("train_loss", "train/loss", kind="loss", higher_is_better=False),
    Field("bytes_up", "comm/bytes_up", kind="bytes", higher_is_better=False),
    Field("bytes_down", "comm/bytes_down", kind="bytes", higher_is_better=False),
    Field("bytes_total", "comm/bytes_total", "communicated", "bytes", False, final=True, summary=True),
    Field("round_time_s", "time/round_s", kind="seconds", higher_is_better=False),
    Field("clients_trained", "clients/trained", kind="count"),
    Field("failures"),  # [{round, client, reason}] since the last evaluated round
)
#: What a server step may measure (``Aggregate.metrics``), recorded after the loop's fields in the rounds it does:
#: client-level DP (``fedhb.privacy``) reports the ε spent so far and the clip in force, secure aggregation its cost.
SERVER_FIELDS = (
    Field("epsilon", "privacy/epsilon", kind="other", higher_is_better=False, final=True),
    Field("epsilon_mean", "privacy/epsilon_mean", kind="other", higher_is_better=False),
    Field("dp_clip", "privacy/clip", kind="other"),
    Field("dp_unclipped", "privacy/unclipped_fraction", kind="fraction"),
    Field("secagg_bytes", "comm/secagg_bytes", kind="bytes", higher_is_better=False),
    Field("secagg_time_s", "time/secagg_s", kind="seconds", higher_is_better=False),
)
#: What the loop records in a multimodal run's rounds, after the server step's values: the bytes sent and received by
#: part of the model (each modality's encoder, ``fusion``, ``head``, ``other``; :func:`fedhb.models.bytes_by_modality`)
#: and the per-client scores grouped by the modalities the clients hold (:func:`modality_groups`). TensorBoard shows
#: each number inside them under the field's tag (``comm/bytes_up_by_modality/text``,
#: ``modalities/text+tabular/mean_client_acc``).
MODALITY_FIELDS = (
    Field("bytes_up_by_modality", "comm/bytes_up_by_modality", kind="bytes", higher_is_better=False),
    Field("bytes_down_by_modality", "comm/bytes_down_by_modality", kind="bytes", higher_is_better=False),
    Field("by_modalities", "modalities", kind="fraction"),
)
#: Whole-run values of ``summary.json`` that the report and the HParams tab show.
SUMMARY_FIELDS = (Field("wall_time_s", None, "wall time", "seconds", False, final=True, summary=True),)
#: Per-client values, last in a record (``{client id: value}``).
PER_CLIENT = "client_acc"


def classification_fields() -> tuple[Field, ...]:
    """The classification task's metrics (:class:`fedhb.tasks.classification.Classification`)."""
    return (
        Field("personalized_acc", "personalized/acc", "personalized acc (%)", "fraction", final=True),
        Field("worst_client_acc", "personalized/worst_client_acc", "worst-client acc (%)", "fraction", final=True),
        Field("personalized_f1", "personalized/f1", "macro F1 (%)", "fraction", final=True),
        Field("personalized_auroc", "personalized/auroc", kind="fraction", final=True),
        Field("global_acc", "global/acc", "global acc (%)", "fraction", final=True),
        Field("global_f1", "global/f1", kind="fraction", final=True),
    )


#: The report's column order (the first is its default metric).
REPORT_ORDER = ("personalized_acc", "worst_client_acc", "global_acc", "personalized_f1", "bytes_total", "wall_time_s")


def all_fields(task_fields: Iterable[Field] | None = None) -> tuple[Field, ...]:
    """Every field of a run: the task's (classification by default), the loop's, the summary's."""
    task = tuple(classification_fields() if task_fields is None else task_fields)
    return task + LOOP_FIELDS + SERVER_FIELDS + MODALITY_FIELDS + SUMMARY_FIELDS


def report_columns(task_fields: Iterable[Field] | None = None) -> tuple[Field, ...]:
    """The report's columns: the task's titled fields (those of :data:`REPORT_ORDER` in its order, then the others in
    the task's), then the run's own (bytes, wall time)."""
    task = [f.key for f in (classification_fields() if task_fields is None else task_fields) if f.title is not None]
    by_key = {f.key: f for f in all_fields(task_fields) if f.title is not None}
    keys = [k for k in REPORT_ORDER if k in task] + [k for k in task if k not in REPORT_ORDER]
    keys += [k for k in REPORT_ORDER if k not in task and k in by_key]
    return tuple(by_key[k] for k in keys)


def task_columns(task_fields: Iterable[Field]) -> list[dict[str, Any]]:
    """The task's report columns as ``summary.json`` keeps them (so that ``fedhb report`` can show any task's)."""
    import dataclasses

    return [dataclasses.asdict(f) for f in task_fields if f.title is not None]


def columns_of(summary: Mapping[str, Any]) -> tuple[Field, ...]:
    """The task fields a run's ``summary.json`` names (classification's for a run written before it named them)."""
    saved = summary.get("task_columns")
    if not isinstance(saved, list):
        return classification_fields()
    return tuple(Field(**d) for d in saved if isinstance(d, dict))


def final_keys(task_fields: Iterable[Field] | None = None) -> tuple[Field, ...]:
    """The fields whose final value TensorBoard's HParams tab shows."""
    return tuple(f for f in all_fields(task_fields) if f.final)


def round_record(rnd: int, metrics: Mapping[str, Any], loop_values: Mapping[str, Any],
                 task_fields: Iterable[Field], server: Mapping[str, Any] | None = None,
                 modalities: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A round's ``metrics.jsonl`` record: ``round``, the task's metrics, the loop's values, what the server step
    measured (``server``, in :data:`SERVER_FIELDS` order, any other key after them), a multimodal run's
    :data:`MODALITY_FIELDS` (``modalities``), the per-client scores.

    Raises:
        KeyError: when a value a field names is missing (the record would silently lose a column).
    """
    record: dict[str, Any] = {"round": rnd}
    for f in task_fields:
        record[f.key] = metrics[f.key]
    for f in LOOP_FIELDS:
        record[f.key] = loop_values[f.key]
    server = dict(server or {})
    for f in SERVER_FIELDS:
        if f.key in server:
            record[f.key] = server.pop(f.key)
    record.update(sorted(server.items()))
    if modalities:
        for f in MODALITY_FIELDS:
            record[f.key] = modalities[f.key]
    record[PER_CLIENT] = metrics[PER_CLIENT]
    return record


def modality_groups(held: Mapping[str, Iterable[str]], per_client: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-client scores grouped by the modalities each client holds: ``{"text+tabular": {"clients": [0, 2],
    "mean_client_acc": ..., "worst_client_acc": ...}}``, in the order the sets first appear; the mean and worst over
    the group's clients with a defined score (``None`` when none has one).

    Args:
        held: ``{client id: modalities it holds}`` (``summary.json``'s ``client_modalities``).
        per_client: ``{client id: score}`` (a record's :data:`PER_CLIENT`).
    """
    groups: dict[str, dict[str, Any]] = {}
    scores: dict[str, list[float]] = {}
    for c, modalities in held.items():
        name = "+".join(modalities)
        groups.setdefault(name, {"clients": []})["clients"].append(int(c))
        value = per_client.get(str(c))
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            scores.setdefault(name, []).append(float(value))
    for name, entry in groups.items():
        values = scores.get(name, [])
        entry[f"mean_{PER_CLIENT}"] = sum(values) / len(values) if values else None
        entry[f"worst_{PER_CLIENT}"] = min(values) if values else None
    return groups


def tensorboard_scalars(record: Mapping[str, Any], task_fields: Iterable[Field]) -> dict[str, float]:
    """``{tag: value}`` of a round's record, leaving out values that are not defined (``None``, NaN)."""
    out = {}
    for f in (*task_fields, *LOOP_FIELDS, *SERVER_FIELDS, *MODALITY_FIELDS):
        value = record.get(f.key)
        if f.tag is not None and isinstance(value, Mapping):  # by modality: one tag per number inside
            out.update(_nested_scalars(f.tag, value))
            continue
        if f.tag is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if not math.isnan(value):
            out[f.tag] = value
    return out


def _nested_scalars(tag: str, values: Mapping[str, Any]) -> dict[str, float]:
    """``{tag/key(/key...): number}`` for every defined number in ``values`` (nested mappings; lists left out)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(_nested_scalars(f"{tag}/{key}", value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            out[f"{tag}/{key}"] = value
    return out
