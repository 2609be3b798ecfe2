"""``FederatedLoop``: the only place where rounds run.

Each process holds one :class:`~fedhb.client.ClientModule` and the states of the clients assigned to it (balanced by
training samples). A round: the selected clients of this rank train one after another (state swapped in, trained,
swapped out); their uploads are flattened and gathered from all ranks with ``all_gather`` in client-id order; every
rank runs the same pure ``aggregate`` on the same tensors, so all ranks agree without a broadcast; each rank applies
what its clients receive. Seeds, data order and dropout masks depend on ``(seed, round, client)`` only, so a
federation gives the same numbers on any number of processes.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedhb.algorithms._ops import State, state_bytes
from fedhb.algorithms.base import Algorithm
from fedhb.algorithms.trainer import Diverged, LocalTrainer
from fedhb.client import ClientModule, lr_at
from fedhb.config import FederationArgs, OptimArgs
from fedhb.data.partition import ClientSplit
from fedhb.metrics import ClientScores, confusion_scores, score_logits

#: How a state is packed for a collective: ``(name, shape, dtype)`` of each tensor, in order.
Layout = list[tuple[str, torch.Size, torch.dtype]]

# Lightning's all_gather goes through a torch function that warns on every call; the call itself is what we want.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")


def client_seed(seed: int, rnd: int, client: int) -> int:
    """A seed that depends on the run seed, the round and the client only (never on the rank)."""
    return int(np.random.SeedSequence([seed, rnd, client]).generate_state(1)[0])


def assign_clients(sizes: list[int], world_size: int) -> list[int]:
    """Rank of each client: largest first, each to the least-loaded rank (ties to the lower rank)."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for c in sorted(range(len(sizes)), key=lambda c: (-sizes[c], c)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[c] = r
        load[r] += max(1, sizes[c])
    return owner


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


class FederatedLoop:
    """Runs rounds over clients sharded across Fabric ranks.

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

    def __init__(self, fabric: Any, module: Any, optimizer: Any, algorithm: Algorithm, tensors: dict[str, Tensor],
                 splits: list[ClientSplit], federation: FederationArgs, optim: OptimArgs, seed: int,
                 task: str, num_classes: int) -> None:
        self.fabric, self.module, self.optimizer, self.algorithm = fabric, module, optimizer, algorithm
        self.tensors, self.splits, self.args, self.optim, self.seed = tensors, splits, federation, optim, seed
        self.task, self.num_classes = task, num_classes
        self.num_clients = len(splits)
        self.num_train = [s.num_train for s in splits]
        self.owner = assign_clients(self.num_train, fabric.world_size)
        self.mine = [c for c in range(self.num_clients) if self.owner[c] == fabric.global_rank]
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
            layout = [(k, v.shape, v.dtype) for k, v in algorithm.upload(self.states[c]).items()]
            own[c] = distinct.setdefault(tuple(layout), layout)
        self.upload_layouts: dict[int, Layout] = self._from_every_rank(own)
        # Round in which each client last received the global model (all ranks track every client).
        self.synced = np.zeros(self.num_clients, dtype=np.int64)
        self.last_aggregation = 0
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self.best_val: dict[int, tuple[float, ClientScores]] = {}  # FHBench protocol: best validation per client
        self.bytes_total = 0
        # Failed or dropped clients since the last evaluated round; reported in the next metrics record.
        self.pending_failures: list[dict[str, Any]] = []

    @property
    def client_module(self) -> ClientModule:
        m = self.module
        return m.module if hasattr(m, "module") and isinstance(m.module, ClientModule) else m

    def _from_every_rank(self, own: dict[int, Any]) -> dict[int, Any]:
        """The union of every rank's ``own`` (picklable objects, one broadcast per rank; for set-up only)."""
        if self.fabric.world_size == 1:
            return dict(own)
        union: dict[int, Any] = {}
        for r in range(self.fabric.world_size):
            union.update(self.fabric.broadcast(own if r == self.fabric.global_rank else None, src=r))
        return union

    # -- selection ------------------------------------------------------------------------------------------------
    def select(self, rnd: int) -> list[int]:
        """The clients that train in round ``rnd``, sorted; the same on every rank."""
        if self.args.fraction >= 1:
            return list(range(self.num_clients))
        k = max(1, int(round(self.args.fraction * self.num_clients)))
        rng = np.random.default_rng([self.seed, rnd, 7])
        return sorted(int(c) for c in rng.choice(self.num_clients, size=k, replace=False))

    # -- local work -----------------------------------------------------------------------------------------------
    def batches(self, index: np.ndarray, batch_size: int) -> Any:
        for start in range(0, len(index), batch_size):
            rows = torch.from_numpy(index[start:start + batch_size])
            yield {k: self.fabric.to_device(v[rows]) for k, v in self.tensors.items()}

    def load(self, state: State) -> None:
        self.client_module.set_state({k: state[k] for k in self.model_names})
        self.algorithm.on_load(self.client_module, state)

    def train_client(self, cid: int, rnd: int) -> tuple[float, int, str | None]:
        """Local training of client ``cid`` by the algorithm's ``local_update``; returns (mean loss, local steps,
        failure reason or None). A client that fails keeps the whole state it started the round with."""
        state = self.states[cid]
        # local_update may change algo/ tensors (even in place) before failing: keep a copy in a buffer reused by every
        # client, so that the backup itself allocates nothing round after round.
        for k in [k for k in self._backup if k not in state]:
            del self._backup[k]
        store(self._backup, state, pin=False)
        seed = client_seed(self.seed, rnd, cid)
        torch.manual_seed(seed)  # dropout masks
        trainer = LocalTrainer(
            self.fabric, self.module, self.client_module, self.optimizer, self.algorithm, self.tensors,
            self.splits[cid].train, epochs=self.args.local_epochs, batch_size=self.args.batch_size,
            eval_batch_size=self.args.eval_batch_size, lr=lr_at(self.optim, rnd, self.args.rounds), optim=self.optim,
            seed=seed, round=rnd, rounds=self.args.rounds, client=cid,
        )
        self.load(state)
        self.module.train()
        self.algorithm.on_train_start(self.client_module, state)
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
            return math.nan, trainer.steps, failure
        store(state, new, self.pin_states)
        self.algorithm.on_train_end(self.client_module, state, trainer.steps)
        self.load(self.algorithm.personalized_model(state))  # what the fhbench protocol scores right after training
        return trainer.mean_loss, trainer.steps, None

    @torch.no_grad()
    def predict(self, index: np.ndarray) -> tuple[Tensor, Tensor]:
        self.module.eval()
        logits, labels = [], []
        for batch in self.batches(index, self.args.eval_batch_size):
            with self.fabric.autocast():  # --fabric.precision: Fabric applies it to forward() only
                logits.append(self.module.validation_step(batch).float().cpu())
            labels.append(batch["labels"].cpu())
        if not logits:
            return torch.zeros(0, self.num_classes), self.tensors["labels"][:0]
        return torch.cat(logits), torch.cat(labels)

    def score_client(self, cid: int, split: str) -> ClientScores:
        logits, labels = self.predict(getattr(self.splits[cid], split))
        return score_logits(logits, labels, self.task, self.num_classes)

    # -- collectives ----------------------------------------------------------------------------------------------
    def gather_rows(self, clients: list[int], rows: dict[int, Tensor], width: int) -> dict[int, Tensor]:
        """All ranks' ``{client: 1-D float tensor of length width}`` for ``clients``, via one all_gather."""
        per_rank, block = self._row_block(clients, width, torch.float64)
        for j, c in enumerate(per_rank[self.fabric.global_rank]):
            block[j] = rows[c]
        return self._gather_block(per_rank, block)

    def _row_block(self, clients: list[int], width: int, dtype: torch.dtype) -> tuple[list[list[int]], Tensor]:
        """Each rank's share of ``clients`` and a zero ``(largest share, width)`` block for this rank's rows."""
        per_rank = [[c for c in clients if self.owner[c] == r] for r in range(self.fabric.world_size)]
        return per_rank, torch.zeros(max(1, max(len(p) for p in per_rank)), width, dtype=dtype)

    def _gather_block(self, per_rank: list[list[int]], block: Tensor) -> dict[int, Tensor]:
        world = self.fabric.world_size
        gathered = block[None] if world == 1 else self.fabric.all_gather(self.fabric.to_device(block)).cpu()
        return {c: gathered[r, j] for r in range(world) for j, c in enumerate(per_rank[r])}

    def gather_uploads(self, clients: list[int], uploads: dict[int, State]) -> dict[int, State]:
        """Every rank gets every client's upload.

        One process: the uploads themselves (``run_round`` detaches what it writes back into client states).
        Several: see :meth:`gather_states`.
        """
        if self.fabric.world_size == 1:
            return {c: uploads[c] for c in clients}
        return self.gather_states(clients, uploads, self.upload_layouts)

    def gather_states(self, clients: list[int], local: dict[int, State],
                      layouts: Mapping[int, Layout]) -> dict[int, State]:
        """Every rank's ``{client: state}`` for ``clients``, client ``c``'s laid out as ``layouts[c]``.

        Each state is packed into its row of one block (as wide as the largest), all-gathered once and unpacked as
        views of the gathered block, so the result holds each state once. The block is float32 when every tensor is
        float32 or narrower (bit-exact) and float64 otherwise.
        """
        width = max((sum(math.prod(shape) for _, shape, _ in layouts[c]) for c in clients), default=0)
        if width == 0:
            return {c: {} for c in clients}
        narrow = all(dtype in (torch.float32, torch.bfloat16, torch.float16) for c in clients for _, _, dtype in
                     layouts[c])
        carrier = torch.float32 if narrow else torch.float64
        per_rank, block = self._row_block(clients, width, carrier)
        for j, c in enumerate(per_rank[self.fabric.global_rank]):
            offset = 0
            for k, shape, _ in layouts[c]:
                n = math.prod(shape)
                block[j, offset:offset + n] = local[c][k].detach().reshape(-1)
                offset += n
        out: dict[int, State] = {}
        for c, row in self._gather_block(per_rank, block).items():
            parts, offset = {}, 0
            for k, shape, dtype in layouts[c]:
                n = math.prod(shape)
                part = row[offset:offset + n].view(shape)
                parts[k] = part if dtype == carrier else part.to(dtype)
                offset += n
            out[c] = parts
        return out

    # -- one round ------------------------------------------------------------------------------------------------
    def dropped(self, rnd: int, attempt: int, selected: list[int]) -> set[int]:
        """Clients that fail to report (``--federation.dropout``); a function of (seed, round, attempt) only."""
        if self.args.dropout <= 0:
            return set()
        draw = np.random.default_rng([self.seed, rnd, attempt, 11]).random(len(selected))
        return {c for c, u in zip(selected, draw) if u < self.args.dropout}

    def run_round(self, rnd: int) -> RoundResult:
        start = time.perf_counter()
        selected = self.select(rnd)
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
        reporting = [c for c in selected if c not in dropped]
        glob = self.algorithm.global_state()
        compute = 0.0
        sync_bytes = 0
        losses: dict[int, Tensor] = {}
        uploads: dict[int, State] = {}
        fhbench = self.args.eval_protocol == "fhbench"
        early: dict[int, Tensor] = {}
        for cid in reporting:
            stale = glob is not None and self.synced[cid] < self.last_aggregation
            if stale:
                assert glob is not None
                sync_bytes += self.algorithm.download_bytes(glob, catch_up=True)  # on every rank: deterministic
            if self.owner[cid] != self.fabric.global_rank:
                continue
            if stale and glob is not None:
                store(self.states[cid], glob, self.pin_states)
            t = time.perf_counter()
            loss, steps, failure = self.train_client(cid, rnd)
            if fhbench and failure is None:
                early[cid] = self._fhbench_row(cid)
            compute += time.perf_counter() - t
            losses[cid] = torch.tensor([loss, float(steps), 0.0 if failure is None else 1.0], dtype=torch.float64)
            if failure is None:
                uploads[cid] = self.algorithm.upload(self.states[cid])
            else:
                uploads[cid] = {k: torch.zeros(shape, dtype=dtype) for k, shape, dtype in self.upload_layouts[cid]}
        info = self.gather_rows(reporting, losses, 3)
        failed: dict[int, str] = {}
        for c in reporting:
            if info[c][2] > 0:
                failed[c] = "non-finite loss or parameters"
            elif float(info[c][0]) > self.args.max_loss:
                loss = float(info[c][0])
                failed[c] = f"diverged: mean loss {loss:.4g} > --federation.max_loss={self.args.max_loss:g}"
        ok = [c for c in reporting if c not in failed]
        for c, why in failed.items():
            self.fabric.print(f"fedhb: warning: round {rnd}: client {c} excluded from aggregation ({why})")
        if len(ok) < min_clients:
            raise RuntimeError(
                f"round {rnd}: {len(ok)} usable client updates ({len(failed)} failed: {failed}), fewer than "
                f"--federation.min_clients={self.args.min_clients}; the run stops rather than aggregate too few. "
                f"Finished rounds are in the last checkpoint; lower --optim.lr if clients diverge."
            )
        gathered = self.gather_uploads(reporting, uploads)
        gathered = {c: gathered[c] for c in ok}
        received: dict[int, State] = {}
        if ok:
            received = self.algorithm.aggregate(gathered, {c: self.num_train[c] for c in ok})
            self.last_aggregation = rnd
        bytes_up = sum(state_bytes(gathered[c]) for c in ok)
        del uploads, gathered
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
        bytes_down = sum(self.algorithm.download_bytes(s) for s in received.values()) + sync_bytes
        self.bytes_total += bytes_up + bytes_down
        # Clients without training samples (Centralized pools all data on one) did not train: no loss to average.
        trained = [c for c in ok if self.num_train[c] > 0]
        train_loss = (float(np.average([float(info[c][0]) for c in trained],
                                       weights=[self.num_train[c] for c in trained])) if trained else math.nan)
        result = RoundResult(rnd, selected, train_loss, bytes_up, bytes_down, 0.0, compute, failed, sorted(dropped))
        if rnd % self.args.eval_every == 0 or rnd == self.args.rounds:
            t = time.perf_counter()
            result.metrics = self.evaluate(rnd, early if fhbench else None)
            compute += time.perf_counter() - t
        result.compute_s = float(self._sum_over_ranks(compute))
        result.time_s = time.perf_counter() - start
        self.round = rnd
        return result

    def _sum_over_ranks(self, value: float) -> float:
        if self.fabric.world_size == 1:
            return value
        return float(self.fabric.all_reduce(torch.tensor(value, dtype=torch.float64), reduce_op="sum"))

    # -- evaluation -----------------------------------------------------------------------------------------------
    def _fhbench_row(self, cid: int) -> Tensor:
        val, test = self.score_client(cid, "val"), self.score_client(cid, "test")
        best = self.best_val.get(cid)
        if best is None or val.acc > best[0]:
            self.best_val[cid] = (val.acc, test)
        return self.best_val[cid][1].as_tensor()

    def evaluate(self, rnd: int, early: dict[int, Tensor] | None = None) -> dict[str, Any]:
        """Each client's own model on its own test split and, if there is one, the global model on their union."""
        rows: dict[int, Tensor] = {}
        for cid in self.mine:
            if early is not None:
                best = self.best_val.get(cid)
                rows[cid] = early[cid] if cid in early else (best[1].as_tensor() if best else ClientScores.empty())
                continue
            self.load(self.algorithm.personalized_model(self.states[cid]))
            rows[cid] = self.score_client(cid, "test").as_tensor()
        scores = {c: ClientScores.from_tensor(r) for c, r in
                  self.gather_rows(list(range(self.num_clients)), rows, ClientScores.width).items()}
        valid = {c: s for c, s in scores.items() if s.n > 0}
        acc = [s.acc for s in valid.values()]
        metrics: dict[str, Any] = {
            "personalized_acc": float(np.mean(acc)) if acc else math.nan,
            "worst_client_acc": float(np.min(acc)) if acc else math.nan,
            "personalized_f1": float(np.nanmean([s.f1 for s in valid.values()])) if acc else math.nan,
            "personalized_auroc": _nanmean([s.auroc for s in valid.values()]),
            "global_acc": None,
            "global_f1": None,
            "client_acc": {str(c): round(s.acc, 6) for c, s in sorted(scores.items())},
        }
        glob = self.algorithm.global_state() if self.algorithm.has_global_model else None
        if glob is not None:
            confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)
            full = {**self.client_module.get_state(), **glob}
            self.load(full)
            for cid in self.mine:
                logits, labels = self.predict(self.splits[cid].test)
                confusion += confusion_matrix(logits, labels, self.task, self.num_classes)
            confusion = self.gather_sum(confusion)
            metrics["global_acc"], metrics["global_f1"] = confusion_scores(confusion)
        return metrics

    def gather_sum(self, tensor: Tensor) -> Tensor:
        if self.fabric.world_size == 1:
            return tensor
        return self.fabric.all_reduce(self.fabric.to_device(tensor), reduce_op="sum").cpu()

    # -- the run --------------------------------------------------------------------------------------------------
    def run(self, on_round: Any = None) -> list[dict[str, Any]]:
        """Rounds ``self.round + 1 .. rounds``; ``on_round(result)`` is called on every rank after each."""
        progress = _Progress(self.fabric, self.args.rounds, self.round, len(self.select(1)))
        for rnd in range(self.round + 1, self.args.rounds + 1):
            result = self.run_round(rnd)
            self.pending_failures += [{"round": rnd, "client": c, "reason": why} for c, why in result.failed.items()]
            self.pending_failures += [{"round": rnd, "client": c, "reason": "dropped: did not report"}
                                      for c in result.dropped]
            if result.metrics is not None:
                record = {
                    "round": rnd,
                    **{k: v for k, v in result.metrics.items() if k != "client_acc"},
                    "train_loss": result.train_loss,
                    "bytes_up": result.bytes_up,
                    "bytes_down": result.bytes_down,
                    "bytes_total": self.bytes_total,
                    "round_time_s": round(result.time_s, 4),
                    "clients_trained": len(result.selected) - len(result.failed) - len(result.dropped),
                    "failures": self.pending_failures,
                    "client_acc": result.metrics["client_acc"],
                }
                self.history.append(record)
                self.pending_failures = []
            progress.update(result)
            if on_round is not None:
                on_round(result)
        progress.close()
        return self.history

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The whole federation state, identical on every rank (a collective: every rank must call it)."""
        clients = self.gather_client_states()
        empty = torch.full((1 + ClientScores.width,), math.nan, dtype=torch.float64)
        best = {c: torch.cat([torch.tensor([self.best_val[c][0]], dtype=torch.float64),
                              self.best_val[c][1].as_tensor()]) if c in self.best_val else empty for c in self.mine}
        best_all = self.gather_rows(list(range(self.num_clients)), best, 1 + ClientScores.width)
        return {
            "round": self.round,
            "clients": {str(c): s for c, s in sorted(clients.items())},
            "algorithm": self.algorithm.state_dict(),
            "loop": {
                "synced": torch.from_numpy(self.synced.copy()),
                "last_aggregation": self.last_aggregation,
                "bytes_total": self.bytes_total,
                "history": self.history,
                "pending_failures": self.pending_failures,
                "best_val": {str(c): row for c, row in best_all.items() if not math.isnan(float(row[0]))},
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
        self.bytes_total = int(loop["bytes_total"])
        self.history = list(loop["history"])
        self.pending_failures = list(loop["pending_failures"])
        self.best_val = {}
        for c, row in loop["best_val"].items():
            if int(c) in self.states:
                self.best_val[int(c)] = (float(row[0]), ClientScores.from_tensor(row[1:]))
        torch.set_rng_state(state["rng"]["torch"])

    def gather_client_states(self) -> dict[int, State]:
        """Every client's full state on every rank (for checkpoints); tensors travel flat via all_gather."""
        if self.fabric.world_size == 1:
            return {c: dict(s) for c, s in self.states.items()}
        template = self.states[self.mine[0]] if self.mine else None
        layout_src = self.fabric.broadcast([(k, tuple(v.shape), v.dtype) for k, v in template.items()]
                                          if template is not None and self.fabric.global_rank == 0 else None, src=0)
        layout = [(k, torch.Size(s), d) for k, s, d in layout_src]
        return self.gather_states(list(range(self.num_clients)), self.states, dict.fromkeys(range(self.num_clients),
                                                                                             layout))


def confusion_matrix(logits: Tensor, labels: Tensor, task: str, num_classes: int) -> Tensor:
    """``(C, C)`` counts, true class by row (multi-label: per-label TP on the diagonal is not defined; use argmax of the
    first positive label as the class, which keeps global accuracy comparable)."""
    if task == "multi-label":
        pred = (logits > 0).long()
        labels = labels.long()
        cm = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        for j in range(num_classes):
            cm[j, j] += float(((pred[:, j] == 1) & (labels[:, j] == 1)).sum())
            cm[j, (j + 1) % num_classes] += float(((pred[:, j] == 0) & (labels[:, j] == 1)).sum())
        return cm
    pred = logits.argmax(1)
    idx = labels.long() * num_classes + pred
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).double()


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


class _Progress:
    """A tqdm bar on a terminal, one plain line per round otherwise (SLURM logs). Rank 0 only."""

    def __init__(self, fabric: Any, rounds: int, done: int, clients: int) -> None:
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
