"""The algorithm contract: what a client does in its local update, what it uploads, how the server combines uploads,
what each client receives, and which model a client is scored with. Algorithms never loop; only
:class:`fedhb.loop.FederatedLoop` runs rounds.

Like Flower's ``Strategy``, the contract is small. A new algorithm overrides what differs among

- :meth:`~Algorithm.setup`: once per process, with the model's tensor names, the initial model, the client count;
- :meth:`~Algorithm.init_client_state`: the algorithm's own per-client tensors (``algo/...``) in a fresh state;
- :meth:`~Algorithm.local_update`: a client's local training, composed from the ``LocalTrainer``'s operations;
- :meth:`~Algorithm.upload`: what a client sends after training;
- :meth:`~Algorithm.aggregate`: the server step, what each uploading client receives;
- :meth:`~Algorithm.global_state`: the global model (``None`` for purely personalized methods);
- :meth:`~Algorithm.personalized_model`: the model tensors a client is scored with;
- :meth:`~Algorithm.state_dict` and :meth:`~Algorithm.load_state_dict`: the server state, for checkpoints.

Per-step behaviour (an extra loss term, a gradient correction) is not a hook: ``local_update`` hands it to the trainer
as a closure. State that belongs to one client lives in that client's state dict, never on the algorithm object,
which every client of a process shares.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only for type checkers: the CLI imports this module for --help, which needs no torch
    from torch import Tensor

    from fedhb.algorithms._ops import State
    from fedhb.algorithms.trainer import LocalTrainer

#: Prefix of per-client tensors that belong to the algorithm (SCAFFOLD's control variate, ...), not to the model.
ALGO_PREFIX = "algo/"


def algo_key(*parts: str) -> str:
    """The name of an algorithm's own per-client tensor: ``algo_key("scaffold", "c_i/")`` is ``algo/scaffold/c_i/``."""
    return ALGO_PREFIX + "/".join(parts)


@dataclass
class Aggregate(Mapping[int, "State"]):
    """What :meth:`Algorithm.aggregate` may return instead of a plain ``{client: state}`` dict, when the server step
    does more than hand tensors back. It reads as the mapping ``received``.

    Attributes:
        received: ``{client: state}`` for every uploading client; every tensor received overwrites the client's own.
        bytes_down: Bytes each client downloads, where the wire form is smaller than ``received`` (clients rebuild
            the rest, e.g. FLoRA's reset adapters from the run's seed). Default: the size of ``received``.
        catch_up_bytes: Bytes a client that missed aggregations downloads to sync to :meth:`Algorithm.global_state`.
            Default: the size of the global state.
        backbone: ``{layer path: accumulated low-rank update}`` to merge into the frozen backbone that every client
            shares (FLoRA), as ``W_0 + (alpha / r) * update``; the loop merges it and keeps it in checkpoints.
        metrics: ``{key: number}`` the server step measured this round (client-level DP's ε so far, its clip); the
            loop adds them to the round's ``metrics.jsonl`` record (:data:`fedhb.record.SERVER_FIELDS` names their
            TensorBoard tags).
    """

    received: dict[int, State]
    bytes_down: dict[int, int] | None = None
    catch_up_bytes: int | None = None
    backbone: Mapping[str, Tensor] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, result: Mapping[int, State]) -> Aggregate:
        return result if isinstance(result, Aggregate) else cls(dict(result))

    def __getitem__(self, client: int) -> State:
        return self.received[client]

    def __iter__(self) -> Iterator[int]:
        return iter(self.received)

    def __len__(self) -> int:
        return len(self.received)


class Algorithm:
    """Base class; subclasses override only what differs (see the module docstring for the contract).

    A client's state is a flat ``{name: tensor}`` dict: the model's trainable tensors under their parameter names, and
    the algorithm's own per-client tensors under ``algo/...``. It is what gets swapped in and out, checkpointed and
    counted in memory figures.
    """

    #: Whether the method keeps one global model (evaluated on the union of the clients' test splits).
    has_global_model: bool = False
    #: Whether client 0 trains on every client's pooled training data (``Centralized``), the others on nothing.
    pools_training_data: bool = False
    #: Whether ``--federation.client_batch`` may train several clients of this method in one pass
    #: (:mod:`fedhb.batched`): ``local_update`` makes exactly one ``trainer.fit`` call, whose ``loss`` and
    #: ``before_step`` closures read only their arguments and the trainer's tensors, and does nothing after it.
    #: Methods that do more (extra passes, several phases, state updated from the trained model) train one client at a
    #: time, and say so.
    client_batchable: bool = False

    # -- set-up ----------------------------------------------------------------------------------------------------
    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        """Called once per process before any round.

        Args:
            names: The model's trainable tensor names, in model order.
            initial: The initial model tensors (identical on every rank): server optimizers start from them.
            num_clients: Number of clients in the federation.
        """
        self.names = list(names)
        self._num_clients = num_clients

    def init_client_state(self, state: State, client: int) -> State:
        """Add the algorithm's per-client tensors to client ``client``'s fresh state (a copy of the initial model's
        trainable tensors) and return it."""
        return state

    # -- the client --------------------------------------------------------------------------------------------------
    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        """A client's local training; default: ``trainer.fit()`` (``--federation.local_epochs`` over its data).

        Methods with their own local procedure compose the trainer's operations and pass per-step behaviour as
        closures (``trainer.fit(loss=...)``, ``trainer.fit(before_step=...)``); they may update the client's
        ``algo/...`` tensors in ``state``. The model tensors the trainer holds at the end become the client's new
        model tensors."""
        trainer.fit()

    def upload(self, state: State) -> State:
        """What a client sends after local training. Default: every model tensor."""
        return self.model_part(state)

    def personalized_model(self, state: State) -> State:
        """The model tensors a client is scored with (Ditto's personal model, APFL's mixture). Default: its model
        tensors as they are."""
        return state

    # -- the server ----------------------------------------------------------------------------------------------------
    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> Mapping[int, State]:
        """Combine the uploads of one round into what each uploading client receives.

        Args:
            uploads: ``{client_id: {name: tensor}}`` as returned by :meth:`upload`.
            num_samples: ``{client_id: number of local training samples}``.

        Returns:
            ``{client_id: {name: tensor}}`` (every tensor received overwrites the client's own), or an
            :class:`Aggregate` when the download is smaller than that or the frozen backbone changes.
        """
        raise NotImplementedError

    def global_state(self) -> State | None:
        """The global model after the last aggregation (``None`` for purely personalized methods). Clients that
        missed rounds load it before they train."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The server state (for checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no server state but the checkpoint has {sorted(state)}")

    # -- helpers (not meant to be overridden) --------------------------------------------------------------------------
    @property
    def num_clients(self) -> int | None:
        """Number of clients in the federation (set by :meth:`setup`; not an option, so not in :meth:`hparams`)."""
        return getattr(self, "_num_clients", None)

    def model_part(self, state: State, keep: Callable[[str], bool] | None = None) -> State:
        """``state``'s model tensors (not its ``algo/...`` ones), optionally only those whose name ``keep`` accepts."""
        names = getattr(self, "names", None)
        chosen = names if names is not None else [k for k in state if not k.startswith(ALGO_PREFIX)]
        return {k: state[k] for k in chosen if k in state and (keep is None or keep(k))}

    def hparams(self) -> dict[str, Any]:
        """The options to log: the ``__init__`` arguments, read back from the attributes of the same name; lists
        become comma-separated text; ``None`` (a default computed at run time) is left out."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        out: dict[str, Any] = {}
        for n in names:
            if not hasattr(self, n):
                continue
            value = getattr(self, n)
            if isinstance(value, (list, tuple)):
                value = ",".join(map(str, value))
            if isinstance(value, (int, float, str, bool)):
                out[n] = value
        return out

