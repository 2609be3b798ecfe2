"""The algorithm plug-in: what a client uploads, how the server combines uploads, what each client receives, and
what it adds to local training. Algorithms never loop; only :class:`fedhb.loop.FederatedLoop` runs rounds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from fedhb.algorithms._ops import State, state_bytes

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer
    from fedhb.client import ClientModule
    from fedhb.data.partition import ClientSplit

#: Prefix of per-client tensors that belong to the algorithm (SCAFFOLD's control variate, ...), not to the model.
ALGO_PREFIX = "algo/"


class Algorithm:
    """Base class; subclasses override only what differs.

    A client's state is a flat ``{name: tensor}`` dict: the model's trainable tensors under their parameter names, and
    the algorithm's own per-client tensors under ``algo/...``. It is what gets swapped in and out, checkpointed and
    counted in memory figures.
    """

    #: Whether the method keeps one global model (evaluated on the union of the clients' test splits).
    has_global_model: bool = False

    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        """Called once per process before any round.

        Args:
            names: The model's trainable tensor names, in model order.
            initial: The initial model tensors (identical on every rank): server optimizers start from them.
            num_clients: Number of clients in the federation.
        """
        self.names = list(names)
        self._num_clients = num_clients

    @property
    def num_clients(self) -> int | None:
        """Number of clients in the federation (set by :meth:`setup`; not an option, so not in :meth:`hparams`)."""
        return getattr(self, "_num_clients", None)

    def client_splits(self, splits: list[ClientSplit]) -> list[ClientSplit]:
        """The train/val/test indices each client uses (``Centralized`` pools the training data). Default: as
        partitioned."""
        return splits

    # -- communication -------------------------------------------------------------------------------------------
    def shares(self, name: str) -> bool:
        """Whether the trainable tensor ``name`` is uploaded. Default: all of them."""
        return True

    def upload(self, state: State) -> State:
        """What a client sends after local training."""
        return {k: v for k, v in state.items() if not k.startswith(ALGO_PREFIX) and self.shares(k)}

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> dict[int, State]:
        """Combine the uploads of one round into what each uploading client receives.

        Args:
            uploads: ``{client_id: {name: tensor}}`` as returned by :meth:`upload`.
            num_samples: ``{client_id: number of local training samples}``.

        Returns:
            ``{client_id: {name: tensor}}``; every tensor received overwrites the client's own.
        """
        raise NotImplementedError

    def global_state(self) -> State | None:
        """The global model after the last aggregation (``None`` for purely personalized methods). Clients that
        missed rounds load it before they train."""
        return None

    def download_bytes(self, state: State, catch_up: bool = False) -> int:
        """Bytes a client downloads to receive ``state``: what :meth:`aggregate` returned for it or, with
        ``catch_up``, the :meth:`global_state` a client that missed rounds syncs to. Default: the tensors' size.
        Methods whose clients rebuild what they receive from something smaller (FLoRA's stacked factors) override it.
        """
        return state_bytes(state)

    # -- local training hooks ------------------------------------------------------------------------------------
    def init_client_state(self, state: State, client: int) -> State:
        """Add the algorithm's per-client tensors to client ``client``'s fresh state (a copy of the initial model's
        trainable tensors) and return it."""
        return state

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        """A client's local training; default: ``trainer.fit()`` (``--federation.local_epochs`` over its data with
        :meth:`extra_loss` and :meth:`on_before_optimizer_step`). Methods with their own local procedure override it
        and compose the trainer's operations; they may update the client's ``algo/...`` tensors in ``state``. The
        model tensors the trainer holds at the end become the client's new model tensors."""
        trainer.fit()

    def personalized_model(self, state: State) -> State:
        """The model tensors a client is evaluated with (Ditto's personal model, APFL's mixture). Default: its model
        tensors as they are."""
        return state

    def on_load(self, module: ClientModule, state: State) -> None:
        """After the model tensors of ``state`` were copied into the module: sync any part of the module the
        algorithm keeps itself (FLoRA's merged base weights, a client's LoRA rank). ``state`` is what was loaded: a
        client's state with its ``algo/...`` tensors, its :meth:`personalized_model`, or the global model."""

    def on_train_start(self, module: ClientModule, state: State) -> None:
        """Before a client's local training; ``state`` is its full state (model tensors already loaded)."""

    def extra_loss(self, module: ClientModule, batch: dict[str, Tensor], out: dict[str, Tensor]) -> Tensor | None:
        """A term added to the local loss (FedProx's proximal term, MOON's contrastive term, ...)."""
        return None

    def on_before_optimizer_step(self, module: ClientModule) -> None:
        """After backward, before the step: gradient corrections (SCAFFOLD)."""

    def on_train_end(self, module: ClientModule, state: State, num_steps: int) -> None:
        """After local training; update the client's ``algo/...`` tensors in ``state`` in place."""

    # -- server state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no server state but the checkpoint has {sorted(state)}")

    def hparams(self) -> dict[str, Any]:
        """The options to log: the ``__init__`` arguments, read back from the attributes of the same name."""
        import inspect

        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        values = {n: getattr(self, n) for n in names if hasattr(self, n)}
        return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))}
