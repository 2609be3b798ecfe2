"""``FederatedLoop``: the only place where rounds run.

Each process holds one :class:`~fedhb.client.ClientModule` and the states of the clients assigned to it (balanced by
training samples). A round is a short list of phases, each a method:

1. :meth:`~FederatedLoop.select`: the clients that train, and those that fail to report (``--federation.dropout``);
2. :meth:`~FederatedLoop.train`: this rank's clients train one after another (state swapped in, trained, swapped
   out) and say what they upload;
3. :meth:`~FederatedLoop.gather`: every client's status and upload reach every rank, in client-id order;
4. :meth:`~FederatedLoop.aggregate`: every rank runs the same pure server step on the same tensors, so all ranks
   agree without a broadcast;
5. :meth:`~FederatedLoop.apply`: each rank writes what its clients receive into their states;
6. :meth:`~FederatedLoop.evaluate`: every ``--federation.eval_every`` rounds;
7. :meth:`~FederatedLoop.record`: the round's :class:`RoundResult` and, when evaluated, its ``metrics.jsonl`` record.

Seeds, data order and dropout masks depend on ``(seed, round, client)`` only (:mod:`fedhb.seeds`), so a federation
gives the same numbers on any number of processes. Every collective goes through :mod:`fedhb.collectives`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fedhb import seeds
from fedhb.algorithms._ops import State, state_bytes
from fedhb.algorithms.base import Aggregate, Algorithm
from fedhb.algorithms.trainer import Diverged, LocalTrainer
from fedhb.batched import ClientBatcher
from fedhb.client import ClientModule, lr_at
from fedhb.collectives import Collectives, Layout, layout_of
from fedhb.config import FederationArgs, OptimArgs
from fedhb.data.partition import ClientSplit
from fedhb.mapped import gather
from fedhb.models.lora import RANK_KEY, BaseMerge
from fedhb.record import PER_CLIENT, modality_groups, round_record
from fedhb.seeds import client_seed

if TYPE_CHECKING:
    from lightning.fabric import Fabric

__all__ = ["ClientStatus", "FederatedLoop", "RoundResult", "assign_clients", "client_seed", "host_copy",
           "select_clients", "store"]


def select_clients(seed: int, rnd: int, num_clients: int, fraction: float) -> list[int]:
    """The clients that train in round ``rnd`` (``--federation.fraction`` of them), sorted; a function of the run
    seed and the round only, so every rank, and a client-side protocol such as secure aggregation, agrees on it."""
    if fraction >= 1:
        return list(range(num_clients))
    k = max(1, int(round(fraction * num_clients)))
    rng = seeds.rng(seed, rnd, seeds.Stream.SELECTION)
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def assign_clients(sizes: list[int], world_size: int) -> list[int]:
    """Rank of each client: largest first, each to the least-loaded rank (ties to the lower rank)."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for c in sorted(range(len(sizes)), key=lambda c: (-sizes[c], c)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[c] = r
        load[r] += max(1, sizes[c])
    return owner


def hold_out_public(splits: list[ClientSplit], fraction: float, seed: int) -> tuple[np.ndarray, list[ClientSplit]]:
    """Public data the server holds (an algorithm's ``public_fraction``: CreamFL): ``round(fraction * n)`` samples of
    each client's training split of ``n``, drawn from ``[seed, 909, client]`` (at least one left to train on), sorted,
    and the splits without them; validation and test splits are untouched. ``fraction`` 0: none, the splits as given."""
    if fraction <= 0:
        return np.zeros(0, dtype=np.int64), splits
    public, kept = [], []
    for c, s in enumerate(splits):
        k = min(int(round(fraction * len(s.train))), max(0, len(s.train) - 1))
        taken = seeds.rng(seed, seeds.Stream.PUBLIC, c).choice(len(s.train), size=k, replace=False)
        mask = np.zeros(len(s.train), dtype=bool)
        mask[taken] = True
        public.append(s.train[mask])
        kept.append(ClientSplit(s.train[~mask], s.val, s.test))
    return np.sort(np.concatenate(public)).astype(np.int64), kept


def tensor_parts(state: Mapping[str, Tensor]) -> dict[str, int]:
    """Bytes of ``state`` by part of the model (:func:`fedhb.models.bytes_by_modality`)."""
    from fedhb.models import bytes_by_modality

    return bytes_by_modality({k: (v.numel(), v.element_size()) for k, v in state.items()})


def add_parts(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """The sum of byte counts by part, keys in order of first appearance."""
    out: dict[str, int] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return out


def split_bytes(total: int, parts: Mapping[str, int]) -> dict[str, int]:
    """``total`` bytes split over ``parts`` in proportion to their sizes, in whole bytes that sum to ``total`` (the
    largest remainders round up): exact when ``total`` is a multiple of what ``parts`` counts. What an algorithm
    sends in a smaller wire form (``Aggregate.bytes_down``: HetLoRA's truncated ranks, FLoRA's stacked factors) it
    reports as one number, so its parts are estimated this way."""
    size = sum(parts.values())
    if total <= 0:
        return {}
    if size <= 0:
        return {"other": total}
    exact = {k: total * v / size for k, v in parts.items()}
    out = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: out[k] - exact[k])[:total - sum(out.values())]:
        out[k] += 1
    return {k: v for k, v in out.items() if v}


def download_parts(result: Aggregate) -> dict[str, int]:
    """The bytes the clients of one aggregation download, by part of the model: what each receives or, where the
    algorithm sends a smaller wire form (``bytes_down``), that size split over the parts of what it receives."""
    if result.bytes_down is None:
        return add_parts(tensor_parts(s) for s in result.received.values())
    return add_parts(split_bytes(result.bytes_down[c], tensor_parts(s)) for c, s in result.received.items())


def host_copy(tensors: Mapping[str, Tensor], pin: bool) -> State:
    """Detached CPU copies of ``tensors``, the form client states are kept in: page-locked when ``pin`` (GPU runs:
    swapping a client in and out then copies without a staging buffer), plain otherwise."""
    return {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=pin).copy_(v.detach()) for k, v in tensors.items()}


def store(state: State, tensors: Mapping[str, Tensor], pin: bool) -> None:
    """Write ``tensors`` into a client's ``state``, into its existing buffers where shapes and dtypes match.

    Copying in place keeps each client's memory where it was allocated: replacing the tensors every round interleaves
    fresh state allocations with training activations and fragments the host heap, so peak memory would grow by many
    times a client's state per added client.
    """
    for k, v in tensors.items():
        old = state.get(k)
        if old is not None and old.shape == v.shape and old.dtype == v.dtype:
            old.copy_(v.detach())
        else:
            state[k] = host_copy({k: v}, pin)[k]


@dataclass
class ClientStatus:
    """How one client's local update went; crosses ranks as the row ``[loss, steps, failed]`` (the reason follows
    as an object only when some client failed)."""

    loss: float
    steps: int
    failure: str | None = None  # why the update is unusable (kept as the trainer or the check said it)

    width = 3

    def as_row(self) -> Tensor:
        return torch.tensor([self.loss, float(self.steps), 0.0 if self.failure is None else 1.0], dtype=torch.float64)

    @classmethod
    def from_row(cls, row: Tensor, failure: str | None = None) -> ClientStatus:
        return cls(float(row[0]), int(row[1]), failure if float(row[2]) > 0 else None)


#: The category recorded in ``metrics.jsonl`` for a client whose update was not finite (the status keeps the detail).
NON_FINITE = "non-finite loss or parameters"
DROPPED = "dropped: did not report"


@dataclass
class RoundResult:
    """What one round produced, identical on every rank."""

    round: int
    selected: list[int]
    train_loss: float
    bytes_up: int
    bytes_down: int
    time_s: float
    compute_s: float
    failed: dict[int, str] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    #: ``bytes_up`` and ``bytes_down`` by part of the model (:func:`fedhb.models.bytes_by_modality`).
    bytes_up_by_modality: dict[str, int] = field(default_factory=dict)
    bytes_down_by_modality: dict[str, int] = field(default_factory=dict)


@dataclass
class _Plan:
    """The select phase's output."""

    selected: list[int]
    reporting: list[int]
    dropped: set[int]
    min_clients: int


@dataclass
class _Trained:
    """The train phase's output on this rank."""

    status: dict[int, ClientStatus] = field(default_factory=dict)
    uploads: dict[int, State] = field(default_factory=dict)
    early: dict[int, Tensor] = field(default_factory=dict)  # fhbench protocol: scores right after training
    sync_bytes: int = 0  # catch-up downloads of clients that missed aggregations (counted on every rank)
    compute_s: float = 0.0


class FederatedLoop:
    """Runs rounds over clients sharded across Fabric ranks.

    Build it with :func:`fedhb.build.build_loop`.

    Args:
        fabric: A launched ``lightning.Fabric``.
        module: The process's one model, already set up with ``fabric.setup_module``.
        optimizer: Its optimizer (over the trainable parameters), set up with Fabric; its state is reset per client.
        algorithm: The federated algorithm.
        tensors: Every sample's prepared inputs and ``labels``, indexed by sample, on CPU.
        splits: Each client's train/val/test sample indices.
        federation: Round options.
        optim: Optimizer options (for the learning-rate schedule).
        seed: Run seed.
    """

    def __init__(self, fabric: Fabric, module: ClientModule, optimizer: torch.optim.Optimizer, algorithm: Algorithm,
                 tensors: dict[str, Tensor], splits: list[ClientSplit], federation: FederationArgs, optim: OptimArgs,
                 seed: int) -> None:
        self.fabric, self.module, self.optimizer, self.algorithm = fabric, module, optimizer, algorithm
        # Server-held public data (CreamFL's public_fraction): out of the clients' training splits before anything
        # reads them, so that no sample is both public and a client's.
        self.public, splits = hold_out_public(splits, float(getattr(algorithm, "public_fraction", 0.0) or 0.0), seed)
        if len(self.public):
            algorithm.public_index = self.public  # type: ignore[attr-defined]
        self.tensors, self.splits, self.args, self.optim, self.seed = tensors, splits, federation, optim, seed
        self.task = self.client_module.task
        self.num_clients = len(splits)
        self.num_train = [s.num_train for s in splits]
        self.owner = assign_clients(self.num_train, fabric.world_size)
        self.mine = [c for c in range(self.num_clients) if self.owner[c] == fabric.global_rank]
        self.comm = Collectives(fabric, self.owner)
        self.backbone = BaseMerge(self.client_module)
        self.batcher = ClientBatcher(self)  # --federation.client_batch
        initial = self.client_module.get_state()
        self.model_names = list(initial)
        algorithm.setup(self.model_names, initial, self.num_clients)
        self._backup: State = {}
        self.pin_states = fabric.device.type == "cuda"
        self.states: dict[int, State] = {c: algorithm.init_client_state(host_copy(initial, self.pin_states), c)
                                         for c in self.mine}
        # Every rank unpacks every client's upload, so it needs each client's layout (FLoRA's clients may differ in
        # LoRA rank): each rank reads its own clients' and shares them once. Equal layouts are one object, so each
        # distinct one is pickled once.
        distinct: dict[tuple[Any, ...], Layout] = {}
        own = {}
        for c in self.mine:
            layout = layout_of(algorithm.upload(self.states[c]))
            own[c] = distinct.setdefault(tuple(layout), layout)
        self.upload_layouts: dict[int, Layout] = self.comm.from_every_rank(own)
        # Round in which each client last received the global model (all ranks track every client).
        self.synced = np.zeros(self.num_clients, dtype=np.int64)
        self.last_aggregation = 0
        self.catch_up_bytes: int | None = None  # what the last aggregation said a catch-up download costs
        self.backbone_update: dict[str, Tensor] = {}  # merged into the frozen backbone (FLoRA)
        self.server_metrics: dict[str, float] = {}  # what the last server step measured (Aggregate.metrics)
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self.best_val: dict[int, tuple[float, Tensor]] = {}  # FHBench protocol: best validation score and test row
        self.bytes_total = 0
        # Failed or dropped clients since the last evaluated round; reported in the next metrics record.
        self.pending_failures: list[dict[str, Any]] = []
        # A multimodal run's {client id: the modalities its data holds}: its rounds record metrics by modality set
        # (fedhb fit sets it from the partition, so that it matches summary.json's client_modalities).
        self.modality_sets: dict[str, list[str]] = self.held_modalities() if self.client_module.multimodal else {}

    @property
    def client_module(self) -> ClientModule:
        m = self.module
        return m.module if hasattr(m, "module") and isinstance(m.module, ClientModule) else m  # type: ignore[return-value]

    def load(self, state: State) -> None:
        """Load a client's state (or a personalized or the global model) into the process's model."""
        self.client_module.load_state(state, self.model_names)

    # -- 1. select ------------------------------------------------------------------------------------------------
    def selected(self, rnd: int) -> list[int]:
        """The clients that train in round ``rnd``, sorted; the same on every rank."""
        return select_clients(self.seed, rnd, self.num_clients, self.args.fraction)

    def dropped(self, rnd: int, attempt: int, selected: list[int]) -> set[int]:
        """Clients that fail to report (``--federation.dropout``); a function of (seed, round, attempt) only."""
        if self.args.dropout <= 0:
            return set()
        draw = seeds.rng(self.seed, rnd, attempt, seeds.Stream.DROPOUT).random(len(selected))
        return {c for c, u in zip(selected, draw) if u < self.args.dropout}

    def select(self, rnd: int) -> _Plan:
        selected = self.selected(rnd)
        min_clients = min(self.args.min_clients, len(selected))
        for attempt in range(self.args.round_retries + 1):
            dropped = self.dropped(rnd, attempt, selected)
            if len(selected) - len(dropped) >= min_clients:
                break
        else:
            raise RuntimeError(
                f"round {rnd}: only {len(selected) - len(dropped)} of {len(selected)} clients reported after "
                f"{self.args.round_retries + 1} attempts, fewer than --federation.min_clients={self.args.min_clients}; "
                f"lower --federation.dropout or --federation.min_clients. Finished rounds are in the last checkpoint."
            )
        return _Plan(selected, [c for c in selected if c not in dropped], dropped, min_clients)

    # -- 2. train -------------------------------------------------------------------------------------------------
    def train(self, rnd: int, plan: _Plan) -> _Trained:
        out = _Trained()
        glob = self.algorithm.global_state()
        fhbench = self.args.eval_protocol == "fhbench"
        mine = []
        for cid in plan.reporting:
            stale = glob is not None and self.synced[cid] < self.last_aggregation
            if stale and glob is not None:  # counted on every rank: deterministic
                out.sync_bytes += self.catch_up_bytes if self.catch_up_bytes is not None else state_bytes(glob)
            if self.owner[cid] != self.fabric.global_rank:
                continue
            if stale and glob is not None:
                store(self.states[cid], glob, self.pin_states)
            mine.append(cid)
        # --federation.client_batch K: up to K clients take their local steps in one pass (fedhb.batched).
        for group in self.batcher.groups(mine):
            t = time.perf_counter()
            shared = self.batcher.train(group, rnd)  # None: one at a time
            for cid in group:
                status = self.train_client(cid, rnd) if shared is None else ClientStatus(*shared[cid])
                out.status[cid] = status
                if fhbench and status.failure is None:
                    if shared is not None:  # train_client leaves the model scored right after training loaded
                        self.load(self.algorithm.personalized_model(self.states[cid]))
                    out.early[cid] = self._fhbench_row(cid)
            out.compute_s += time.perf_counter() - t
            for cid in group:
                if out.status[cid].failure is None:
                    out.uploads[cid] = self.algorithm.upload(self.states[cid])
                else:
                    out.uploads[cid] = {k: torch.zeros(shape, dtype=dtype)
                                        for k, shape, dtype in self.upload_layouts[cid]}
        return out

    def train_client(self, cid: int, rnd: int) -> ClientStatus:
        """Local training of client ``cid`` by the algorithm's ``local_update``. A client that fails keeps the whole
        state it started the round with."""
        state = self.states[cid]
        # local_update may change algo/ tensors (even in place) before failing: keep a copy in a buffer reused by every
        # client, so that the backup itself allocates nothing round after round.
        for k in [k for k in self._backup if k not in state]:
            del self._backup[k]
        store(self._backup, state, pin=False)
        seed = client_seed(self.seed, rnd, cid)
        torch.manual_seed(seed)  # dropout masks
        trainer = LocalTrainer(
            self.fabric, self.module, self.client_module, self.optimizer, self.tensors, self.splits[cid].train,
            epochs=self.args.local_epochs, batch_size=self.args.batch_size, eval_batch_size=self.args.eval_batch_size,
            lr=lr_at(self.optim, rnd, self.args.rounds), optim=self.optim, seed=seed, round=rnd,
            rounds=self.args.rounds, client=cid,
        )
        self.load(state)
        self.module.train()
        failure = None
        try:
            self.algorithm.local_update(trainer, state)
            new = self.client_module.trainable()
            if not all(torch.isfinite(v).all() for v in new.values()):
                failure = "non-finite parameters after training"
        except Diverged as err:
            failure = str(err)
        if failure is not None:
            state.clear()
            state.update(host_copy(self._backup, self.pin_states))
            self.load(state)
            return ClientStatus(math.nan, trainer.steps, failure)
        store(state, new, self.pin_states)
        self.load(self.algorithm.personalized_model(state))  # what the fhbench protocol scores right after training
        return ClientStatus(trainer.mean_loss, trainer.steps)

    # -- 3. gather ------------------------------------------------------------------------------------------------
    def gather(self, rnd: int, plan: _Plan, trained: _Trained) -> tuple[dict[int, ClientStatus], dict[int, str],
                                                                         dict[int, State]]:
        """Every reporting client's status, the usable ones' uploads, and why the others are excluded."""
        rows = self.comm.rows(plan.reporting, {c: s.as_row() for c, s in trained.status.items()}, ClientStatus.width)
        failed_somewhere = [c for c in plan.reporting if float(rows[c][2]) > 0]
        reasons = {}
        if failed_somewhere:  # every rank knows this from the rows, so all take part in the object collective
            reasons = self.comm.from_every_rank({c: s.failure for c, s in trained.status.items() if s.failure})
        status = {c: ClientStatus.from_row(rows[c], reasons.get(c)) for c in plan.reporting}
        failed: dict[int, str] = {}
        for c, s in status.items():
            if s.failure is not None:
                failed[c] = NON_FINITE
                self.fabric.print(f"fedhb: warning: round {rnd}: client {c} excluded from aggregation ({NON_FINITE}: "
                                  f"{s.failure})")
            elif s.loss > self.args.max_loss:
                failed[c] = f"diverged: mean loss {s.loss:.4g} > --federation.max_loss={self.args.max_loss:g}"
                self.fabric.print(f"fedhb: warning: round {rnd}: client {c} excluded from aggregation ({failed[c]})")
        ok = [c for c in plan.reporting if c not in failed]
        if len(ok) < plan.min_clients:
            raise RuntimeError(
                f"round {rnd}: {len(ok)} usable client updates ({len(failed)} failed: {failed}), fewer than "
                f"--federation.min_clients={self.args.min_clients}; the run stops rather than aggregate too few. "
                f"Finished rounds are in the last checkpoint; lower --optim.lr if clients diverge."
            )
        if self.fabric.world_size == 1:
            # One process: the uploads themselves (apply detaches what it writes back into client states).
            uploads = {c: trained.uploads[c] for c in ok}
        else:
            gathered = self.comm.states(plan.reporting, trained.uploads, self.upload_layouts)
            uploads = {c: gathered[c] for c in ok}
        return status, failed, uploads

    # -- 4. aggregate ---------------------------------------------------------------------------------------------
    def aggregate(self, rnd: int, uploads: dict[int, State]) -> Aggregate:
        if not uploads:
            return Aggregate({})
        result = Aggregate.of(self.algorithm.aggregate(uploads, {c: self.num_train[c] for c in uploads}))
        self.last_aggregation = rnd
        if result.catch_up_bytes is not None:
            self.catch_up_bytes = result.catch_up_bytes
        if result.metrics:
            self.server_metrics = {k: float(v) for k, v in result.metrics.items()}
        return result

    # -- 5. apply -------------------------------------------------------------------------------------------------
    def apply(self, rnd: int, result: Aggregate) -> int:
        """Write what each client received into its state and merge any backbone update; returns the bytes the
        clients downloaded."""
        received = result.received
        if self.fabric.world_size == 1:
            # Uploads passed through uncopied, so an aggregate may hand back a client's own state tensors: detach
            # those from the states before anything is written into them in place.
            held = {t.data_ptr() for s in self.states.values() for t in s.values()}
            received = {c: {k: v.clone() if v.data_ptr() in held else v for k, v in s.items()}
                        for c, s in received.items()}
        for cid, state in received.items():
            self.synced[cid] = rnd
            if cid in self.states:
                store(self.states[cid], state, self.pin_states)
        if result.backbone:
            self.backbone_update = dict(result.backbone)
            self.backbone.merge(self.backbone_update)
        if result.bytes_down is not None:
            return sum(result.bytes_down[c] for c in received)
        return sum(state_bytes(s) for s in received.values())

    # -- one round ------------------------------------------------------------------------------------------------
    def run_round(self, rnd: int) -> RoundResult:
        start = time.perf_counter()
        plan = self.select(rnd)
        trained = self.train(rnd, plan)
        # Catch-up downloads are of the global state the clients trained from (still the algorithm's until aggregate).
        sync_parts = (split_bytes(trained.sync_bytes, tensor_parts(self.algorithm.global_state() or {}))
                      if trained.sync_bytes else {})
        status, failed, uploads = self.gather(rnd, plan, trained)
        bytes_up = sum(state_bytes(u) for u in uploads.values())
        up_parts = add_parts(tensor_parts(u) for u in uploads.values())
        del trained.uploads
        result = self.aggregate(rnd, uploads)
        del uploads
        down_parts = add_parts([download_parts(result), sync_parts])
        bytes_down = self.apply(rnd, result) + trained.sync_bytes
        self.bytes_total += bytes_up + bytes_down
        # Clients without training samples (Centralized pools all data on one) did not train: no loss to average.
        losses = [c for c in plan.reporting if c not in failed and self.num_train[c] > 0]
        train_loss = (float(np.average([status[c].loss for c in losses], weights=[self.num_train[c] for c in losses]))
                      if losses else math.nan)
        out = RoundResult(rnd, plan.selected, train_loss, bytes_up, bytes_down, 0.0, trained.compute_s, failed,
                          sorted(plan.dropped), bytes_up_by_modality=up_parts, bytes_down_by_modality=down_parts)
        compute = trained.compute_s
        if rnd % self.args.eval_every == 0 or rnd == self.args.rounds:
            t = time.perf_counter()
            out.metrics = self.evaluate(rnd, trained.early if self.args.eval_protocol == "fhbench" else None)
            compute += time.perf_counter() - t
        out.compute_s = self.comm.sum(compute)
        out.time_s = time.perf_counter() - start
        self.round = rnd
        return out

    # -- 6. evaluate ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, index: np.ndarray) -> tuple[Tensor, Tensor]:
        self.module.eval()
        outputs, targets = [], []
        for start in range(0, len(index), self.args.eval_batch_size):
            rows = torch.from_numpy(index[start:start + self.args.eval_batch_size])
            batch = gather(self.fabric, self.tensors, rows)
            with self.fabric.autocast():  # --fabric.precision: Fabric applies it to forward() only
                outputs.append(self.module.validation_step(batch).float().cpu())
            targets.append(self.task.targets(batch).cpu())
        if not outputs:
            last = list(self.client_module.head.modules())[-1]
            return torch.zeros(0, int(getattr(last, "out_features", 0))), self.tensors["labels"][:0]
        return torch.cat(outputs), torch.cat(targets)

    def score_client(self, cid: int, split: str) -> Tensor:
        """Client ``cid``'s score vector (the task's) on one of its splits, under the model loaded now."""
        outputs, targets = self.predict(getattr(self.splits[cid], split))
        return self.task.score(outputs, targets)

    def _fhbench_row(self, cid: int) -> Tensor:
        val, test = self.score_client(cid, "val"), self.score_client(cid, "test")
        pick = self.task.score_names.index(self.task.selection_score)
        best = self.best_val.get(cid)
        if best is None or float(val[pick]) > best[0]:
            self.best_val[cid] = (float(val[pick]), test)
        return self.best_val[cid][1]

    def evaluate(self, rnd: int, early: dict[int, Tensor] | None = None) -> dict[str, Any]:
        """Each client's own model on its own test split and, if there is one, the global model on their union.

        A client whose own model is the global model (FedAvg's, after aggregation) is predicted once for both."""
        rows: dict[int, Tensor] = {}
        glob = self.algorithm.global_state() if self.algorithm.has_global_model else None
        predicted: dict[int, tuple[Tensor, Tensor]] = {}  # the global model's outputs, where they were the client's
        for cid in self.mine:
            if early is not None:
                best = self.best_val.get(cid)
                rows[cid] = early[cid] if cid in early else (best[1] if best else self.task.empty_score())
                continue
            model = self.algorithm.personalized_model(self.states[cid])
            self.load(model)
            outputs, targets = self.predict(self.splits[cid].test)
            rows[cid] = self.task.score(outputs, targets)
            if glob is not None and self._is_global(model, glob):
                predicted[cid] = (outputs, targets)
        scores = self.comm.rows(list(range(self.num_clients)), rows, self.task.width)
        metrics = self.task.reduce(scores)
        stats = None
        if glob is not None:
            if any(cid not in predicted for cid in self.mine):
                self.load({**self.client_module.get_state(), **glob})
            for cid in self.mine:
                part = self.task.global_stats(*(predicted.pop(cid) if cid in predicted else
                                                self.predict(self.splits[cid].test)))
                stats = part if stats is None else stats + part
            if stats is None:  # this rank holds no client: contribute zeros of the statistic's shape
                stats = self.task.global_stats(*self.predict(np.zeros(0, dtype=np.int64)))
            stats = self.comm.sum_tensor(stats)
        return {**metrics, **self.task.global_metrics(stats)}

    def _is_global(self, model: State, glob: State) -> bool:
        """Whether loading ``model`` sets every model tensor exactly as loading the global state ``glob`` does (no
        per-client LoRA rank in either), so that their predictions are the same."""
        if RANK_KEY in model or RANK_KEY in glob:
            return False
        return all(k in glob and model[k].dtype == glob[k].dtype and model[k].device == glob[k].device
                   and torch.equal(model[k], glob[k]) for k in self.model_names)

    # -- 7. record ------------------------------------------------------------------------------------------------
    def record(self, result: RoundResult) -> dict[str, Any] | None:
        """Keep the round's failures until the next evaluated round; return its ``metrics.jsonl`` record if it was
        evaluated."""
        self.pending_failures += [{"round": result.round, "client": c, "reason": why} for c, why in
                                  result.failed.items()]
        self.pending_failures += [{"round": result.round, "client": c, "reason": DROPPED} for c in result.dropped]
        if result.metrics is None:
            return None
        record = round_record(result.round, result.metrics, {
            "train_loss": result.train_loss,
            "bytes_up": result.bytes_up,
            "bytes_down": result.bytes_down,
            "bytes_total": self.bytes_total,
            "round_time_s": round(result.time_s, 4),
            "clients_trained": len(result.selected) - len(result.failed) - len(result.dropped),
            "failures": self.pending_failures,
        }, self.task.fields, self.server_metrics, {
            "bytes_up_by_modality": result.bytes_up_by_modality,
            "bytes_down_by_modality": result.bytes_down_by_modality,
            "by_modalities": modality_groups(self.modality_sets, result.metrics[PER_CLIENT]),
        } if self.modality_sets else None)
        self.history.append(record)
        self.pending_failures = []
        return record

    def held_modalities(self) -> dict[str, list[str]]:
        """``{client id: the modalities present in at least one of its samples}``, in fusion order."""
        out = {}
        for c, s in enumerate(self.splits):
            index = torch.from_numpy(np.concatenate([s.train, s.val, s.test]))
            out[str(c)] = [m for m in self.client_module.encoders
                           if bool(self.tensors[f"{m}/present"][index].any())]
        return out

    # -- the run --------------------------------------------------------------------------------------------------
    def run(self, on_round: Callable[[RoundResult], None] | None = None) -> list[dict[str, Any]]:
        """Rounds ``self.round + 1 .. rounds``; ``on_round(result)`` is called on every rank after each."""
        progress = _Progress(self.fabric, self.args.rounds, self.round, len(self.selected(1)))
        for rnd in range(self.round + 1, self.args.rounds + 1):
            result = self.run_round(rnd)
            self.record(result)
            progress.update(result)
            if on_round is not None:
                on_round(result)
        progress.close()
        return self.history

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The whole federation state, identical on every rank (a collective: every rank must call it)."""
        clients = self.gather_client_states()
        width = 1 + self.task.width
        empty = torch.full((width,), math.nan, dtype=torch.float64)
        best = {c: torch.cat([torch.tensor([self.best_val[c][0]], dtype=torch.float64), self.best_val[c][1]])
                if c in self.best_val else empty for c in self.mine}
        best_all = self.comm.rows(list(range(self.num_clients)), best, width)
        return {
            "round": self.round,
            "clients": {str(c): s for c, s in sorted(clients.items())},
            "algorithm": self.algorithm.state_dict(),
            "loop": {
                "synced": torch.from_numpy(self.synced.copy()),
                "last_aggregation": self.last_aggregation,
                "catch_up_bytes": -1 if self.catch_up_bytes is None else self.catch_up_bytes,
                "backbone_update": self.backbone_update,
                "bytes_total": self.bytes_total,
                "history": self.history,
                "pending_failures": self.pending_failures,
                "best_val": {str(c): row for c, row in best_all.items() if not math.isnan(float(row[0]))},
                "server_metrics": self.server_metrics,
            },
            "rng": {"torch": torch.get_rng_state()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; each rank keeps its own clients' states."""
        clients = state["clients"]
        if len(clients) != self.num_clients:
            raise ValueError(f"the checkpoint has {len(clients)} clients, this run has {self.num_clients}")
        template = self.states[self.mine[0]] if self.mine else None
        for c in self.mine:
            saved = clients[str(c)]
            if template is not None and (set(saved) != set(template) or
                                         any(saved[k].shape != template[k].shape for k in template)):
                raise ValueError("the checkpoint's client state does not fit this model (different backbone, LoRA "
                                 "rank, targets or algorithm)")
            self.states[c] = {k: v.clone() for k, v in saved.items()}
        self.algorithm.load_state_dict(state["algorithm"])
        loop = state["loop"]
        self.round = int(state["round"])
        self.synced = loop["synced"].numpy().copy()
        self.last_aggregation = int(loop["last_aggregation"])
        catch_up = int(loop["catch_up_bytes"])
        self.catch_up_bytes = None if catch_up < 0 else catch_up
        self.backbone_update = dict(loop["backbone_update"])
        if self.backbone_update:
            self.backbone.merge(self.backbone_update)
        self.bytes_total = int(loop["bytes_total"])
        self.history = list(loop["history"])
        self.pending_failures = list(loop["pending_failures"])
        self.server_metrics = dict(loop.get("server_metrics", {}))
        self.best_val = {}
        for c, row in loop["best_val"].items():
            if int(c) in self.states:
                self.best_val[int(c)] = (float(row[0]), row[1:].clone())
        torch.set_rng_state(state["rng"]["torch"])

    def gather_client_states(self) -> dict[int, State]:
        """Every client's full state on every rank (for checkpoints); tensors travel flat via all_gather."""
        if self.fabric.world_size == 1:
            return {c: dict(s) for c, s in self.states.items()}
        template = self.states[self.mine[0]] if self.mine else None
        layout_src = self.comm.broadcast([(k, tuple(v.shape), v.dtype) for k, v in template.items()]
                                         if template is not None and self.fabric.global_rank == 0 else None, src=0)
        layout = [(k, torch.Size(s), d) for k, s, d in layout_src]
        return self.comm.states(list(range(self.num_clients)), self.states, dict.fromkeys(range(self.num_clients),
                                                                                          layout))


class _Progress:
    """A tqdm bar on a terminal, one plain line per round otherwise (SLURM logs). Rank 0 only."""

    def __init__(self, fabric: Fabric, rounds: int, done: int, clients: int) -> None:
        self.enabled = fabric.global_rank == 0
        self.start = time.perf_counter()
        self.rounds, self.done, self.clients = rounds, done, clients
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=rounds, initial=done, desc="rounds", unit="round", dynamic_ncols=True)

    def update(self, result: RoundResult) -> None:
        if not self.enabled:
            return
        m = result.metrics or {}
        acc = m.get("personalized_acc")
        missing = ", ".join(f"{len(v)} {k}" for k, v in (("failed", result.failed), ("dropped", result.dropped)) if v)
        clients = f"{len(result.selected)}" + (f" ({missing})" if missing else "")
        if self.bar is not None:  # the bar itself shows rounds done, elapsed and time left
            post = {"clients": clients, "loss": f"{result.train_loss:.3f}"}
            if acc is not None:
                post["acc"] = f"{acc:.3f}"
            self.bar.set_postfix(post)
            self.bar.update(1)
            return
        from tqdm import tqdm

        elapsed = time.perf_counter() - self.start
        # Rate over the rounds run by this process only: a resumed run's earlier rounds took no time here.
        eta = elapsed / max(1, result.round - self.done) * (self.rounds - result.round)
        acc_text = f" acc {acc:.4f}" if acc is not None else ""
        print(f"round {result.round}/{self.rounds} clients {clients} loss {result.train_loss:.4f}{acc_text} "
              f"elapsed {tqdm.format_interval(elapsed)} eta {tqdm.format_interval(eta)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
