"""Everything fedhb knows about LoRA (Hu et al., arXiv 2106.09685), in one file, as LitGPT keeps it in ``lora.py``.

- **Injection** (:func:`apply_lora`): peft adapters on a frozen backbone's attention projections.
- **Names** (:func:`is_lora`, :func:`is_lora_a`, :func:`is_lora_b`, :func:`lora_pairs`, :func:`layer_of`,
  :func:`adapter_names`): which trainable tensor is which factor of which adapted layer. No other file spells peft's
  parameter names.
- **Ranks** (:func:`rank_part`, :data:`RANK_KEY`, :func:`run_at_rank`): a client may run the process's rank-``r``
  adapters at a lower rank ``r_k``: the first ``r_k`` rows of A and columns of B, the rest held at zero, with the
  scaling ``alpha / r_k``.
- **Merging** (:class:`BaseMerge`): writing an accumulated low-rank update into the frozen weights.

Only :func:`apply_lora` imports peft; the name helpers are plain string functions, so algorithms can use them without
importing any model library.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

    from fedhb.config import LoRAArgs

_A, _B = ".lora_A.", ".lora_B."
#: The name fragment every peft LoRA parameter carries (``lora_A``, ``lora_B``, ``lora_embedding_*``).
_FRAGMENT = "lora_"
#: peft's adapter name: fedhb injects one adapter per backbone.
_ADAPTER = "default"
#: A client state may hold its LoRA rank under this key; loading such a state runs the adapters at that rank.
RANK_KEY = "lora/rank"


# -- names ----------------------------------------------------------------------------------------------------------
def is_lora(name: str) -> bool:
    """Whether trainable tensor ``name`` is a LoRA factor (A or B)."""
    return _A in name or _B in name


def is_lora_a(name: str) -> bool:
    return _A in name


def is_lora_b(name: str) -> bool:
    return _B in name


def layer_of(name: str) -> str:
    """The module path of the adapted layer that LoRA factor ``name`` belongs to (``...attention.query``)."""
    for fragment in (_A, _B):
        if fragment in name:
            return name.split(fragment)[0]
    raise ValueError(f"{name!r} is not a LoRA factor")


def adapter_names(layer: str) -> tuple[str, str]:
    """The ``(A, B)`` parameter names peft gives the adapter of module ``layer`` (for tests and fixtures)."""
    return f"{layer}{_A}{_ADAPTER}.weight", f"{layer}{_B}{_ADAPTER}.weight"


def lora_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """``(A name, B name)`` of every LoRA-adapted module, in model order."""
    names = list(names)
    known = set(names)
    pairs = []
    for name in names:
        if _A in name:
            b = name.replace(_A, _B)
            if b not in known:
                raise ValueError(f"LoRA A matrix {name} has no B matrix {b}")
            pairs.append((name, b))
    return pairs


def encoder_of(name: str) -> str:
    """The modality whose encoder tensor ``name`` belongs to (``encoders.<modality>.``), or ``""`` for any other."""
    parts = name.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "encoders" else ""


def select_layers(pairs: list[tuple[str, str]], layers: str) -> list[tuple[str, str]]:
    """``all``, ``first_half`` or ``second_half`` of the LoRA modules in model order (the middle one goes to the
    second half when the count is odd), taken per encoder: with a text and an image backbone, ``first_half`` is the
    first half of each one's layers, not the text encoder's layers alone."""
    if layers not in ("all", "first_half", "second_half"):
        raise ValueError(f"--algorithm.layers must be all, first_half or second_half; got {layers!r}")
    if layers == "all":
        return pairs
    groups: dict[str, list[tuple[str, str]]] = {}
    for pair in pairs:
        groups.setdefault(encoder_of(pair[0]), []).append(pair)
    chosen = set()
    for group in groups.values():
        half = len(group) // 2
        chosen.update(group[:half] or group[:1] if layers == "first_half" else group[half:])
    return [p for p in pairs if p in chosen]


# -- ranks ----------------------------------------------------------------------------------------------------------
def rank_part(name: str, value: Tensor, rank: int, beyond: bool = False) -> Tensor:
    """A view of LoRA factor ``name``'s first ``rank`` components (A's rows, B's columns) or, with ``beyond``, of the
    rest; tensors other than LoRA's are returned whole."""
    part = slice(rank, None) if beyond else slice(None, rank)
    if _A in name:
        return value[part]
    if _B in name:
        return value[:, part]
    return value


def rank_of(state: Mapping[str, Tensor]) -> int:
    """The LoRA rank of the adapters in ``state`` (the rows of its first A matrix; 0 without LoRA)."""
    for name, value in state.items():
        if _A in name:
            return int(value.shape[0])
    return 0


def _lora_modules(module: nn.Module) -> dict[str, Any]:
    """peft's LoRA layers of ``module`` by path (those with a ``scaling`` dict and a frozen ``base_layer``)."""
    return {name: m for name, m in module.named_modules()
            if isinstance(getattr(m, "scaling", None), dict) and hasattr(m, "base_layer")}


class RankedAdapters:
    """Runs a module's LoRA adapters at the rank a loaded client state asks for (:data:`RANK_KEY`).

    Client ``k`` of rank ``r_k`` uses the first ``r_k`` rows of every A and columns of every B of the process's
    rank-``r`` adapters; the rest is zeroed (so their gradients are exactly zero and stay zero under any optimizer)
    and LoRA's scaling becomes ``alpha / r_k``. A state without a rank runs at the module's own rank and scaling.
    Nothing happens (and nothing is scanned) until a state with a rank is loaded.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._layers: dict[str, Any] | None = None
        self._scaling: dict[str, float] = {}  # each layer's own alpha / r
        self._rank: int | None = None  # the rank the module runs at now (None: its own)

    def _modules(self) -> dict[str, Any]:
        if self._layers is None:
            self._layers = _lora_modules(self.module)
            self._scaling = {k: float(m.scaling[_ADAPTER]) for k, m in self._layers.items()}
        return self._layers

    def load(self, state: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
        """After ``state``'s tensors were copied into ``params`` (the module's trainable parameters by name)."""
        import torch

        rank = int(state[RANK_KEY]) if RANK_KEY in state else None
        if rank is None and self._rank is None:
            return
        layers = self._modules()
        full = rank_of(params)
        with torch.no_grad():
            for path, layer in layers.items():
                layer.scaling[_ADAPTER] = self._scaling[path] * full / (rank or full)
            if rank is not None:
                for name, param in params.items():
                    if is_lora(name):
                        rank_part(name, param, rank, beyond=True).zero_()
        self._rank = rank


# -- merging ----------------------------------------------------------------------------------------------------------
class BaseMerge:
    """Writes ``W_0 + (alpha / r) * update`` into the frozen base weight of adapted layers.

    ``W_0`` (the process's original frozen weight) is copied the first time a layer is merged, so merging is
    idempotent and a resumed run merges into the original weights, not on top of them.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._base: dict[str, Tensor] = {}

    def merge(self, updates: Mapping[str, Tensor]) -> None:
        """``updates``: layer path -> the accumulated low-rank update (before LoRA's scaling)."""
        import torch

        with torch.no_grad():
            for path, update in updates.items():
                layer: Any = self.module.get_submodule(path)
                weight = layer.base_layer.weight
                if path not in self._base:
                    self._base[path] = weight.detach().clone()
                scaling = _own_scaling(layer)
                merged = self._base[path].to(torch.float64) + scaling * update.to(weight.device, torch.float64)
                weight.copy_(merged.to(weight.dtype))


def _own_scaling(layer: Any) -> float:
    """The layer's LoRA scaling ``alpha / r`` at its full rank, whatever rank it runs at now (peft keeps ``r`` and
    ``lora_alpha`` per adapter; fedhb does not enable rank-stabilised scaling)."""
    return float(layer.lora_alpha[_ADAPTER] / layer.r[_ADAPTER])


# -- injection -------------------------------------------------------------------------------------------------------
# Generic names in configs map to what each architecture calls its attention projections (transformers 5.x renamed
# ViT's `query`/`value` to `q_proj`/`v_proj`; DistilBERT uses `q_lin`, T5 and MOMENT use `q`). A dotted alias is a
# module-path suffix: BERT's attention output is `attention.output.dense` (its feed-forward output is `output.dense`).
ALIASES: dict[str, tuple[str, ...]] = {
    "query": ("query", "q_proj", "q_lin", "q", "to_q"),
    "key": ("key", "k_proj", "k_lin", "k", "to_k"),
    "value": ("value", "v_proj", "v_lin", "v", "to_v"),
    "output": ("o_proj", "out_proj", "out_lin", "o", "attention.output.dense"),
}


def _linear_names(model: nn.Module) -> list[str]:
    from torch import nn

    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]


def _matches(names: list[str], target: str) -> bool:
    """Whether ``target`` names a module of ``names`` the way peft's ``target_modules`` does: the whole path or a
    suffix of it after a dot."""
    return any(name == target or name.endswith("." + target) for name in names)


def resolve_target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Map configured target names to the module names this backbone really has.

    Raises:
        ValueError: naming ``--model.lora.target_modules``, when a target matches nothing.
    """
    names = _linear_names(model)
    resolved: list[str] = []
    for target in targets:
        if _matches(names, target):
            resolved.append(target)
            continue
        hits = [alias for alias in ALIASES.get(target, ()) if _matches(names, alias)]
        if not hits:
            raise ValueError(
                f"--model.lora.target_modules: the backbone has no linear module named {target!r}"
                f" (or an alias of it); its linear modules are {sorted({n.rsplit('.', 1)[-1] for n in names})}"
            )
        resolved.append(hits[0])
    return sorted(set(resolved), key=resolved.index)


def apply_lora(model: nn.Module, args: LoRAArgs) -> nn.Module:
    """Freeze ``model`` and inject LoRA into its target modules; only the LoRA matrices stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = resolve_target_modules(model, list(args.target_modules))
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,  # type: ignore[arg-type]
                        target_modules=targets, bias="none")
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(_FRAGMENT in name)
    return model


# -- routing: several clients' adapters in one pass -----------------------------------------------------------------
class RoutingError(ValueError):
    """A routed LoRA layer saw a batch whose first dimension is not the concatenated samples (the encoder reshapes
    its batch): the clients cannot share this pass."""


class RoutedAdapters:
    """Runs a concatenated batch through the frozen backbone with each sample's own client's LoRA factors.

    Multi-LoRA batching as Punica (Chen et al., arXiv 2310.18547) and S-LoRA (Sheng et al., arXiv 2311.03285) do it
    for serving: the base layer runs once over every sample, and each client's low-rank term ``B_k A_k x`` over its
    own rows, as one batched matmul over the stacked factors when the clients bring equally many rows (a grouped
    loop otherwise). Within :meth:`route` every peft LoRA layer of ``module`` computes, for the rows of client ``k``,
    exactly peft's ``base(x) + B_k(A_k(dropout(x))) * scaling``. The factors are the clients' own tensors (stacked, not
    copied out of the graph), so a backward pass gives each client exactly the gradient of its own loss.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._layers: dict[str, Any] | None = None

    def layers(self) -> dict[str, Any]:
        if self._layers is None:
            self._layers = _lora_modules(self.module)
        return self._layers

    def unsupported(self) -> str | None:
        """Why these adapters cannot be routed (a DoRA variant, a merged adapter, LoRA on a non-linear layer), or
        ``None``."""
        from torch import nn

        for path, layer in self.layers().items():
            if not isinstance(layer.base_layer, nn.Linear) or getattr(layer, "fan_in_fan_out", False):
                return f"{path}: LoRA on a {type(layer.base_layer).__name__} layer"
            if layer.merged or layer.disable_adapters or list(layer.active_adapters) != [_ADAPTER]:
                return f"{path}: merged, disabled or several adapters"
            if getattr(layer, "lora_variant", {}).get(_ADAPTER) is not None:
                return f"{path}: a LoRA variant (DoRA)"
        return None

    def route(self, clients: Sequence[Mapping[str, Tensor]], sizes: Sequence[int]) -> Any:
        """A context in which the first ``sizes[0]`` samples of a batch use ``clients[0]``'s factors, the next
        ``sizes[1]`` ``clients[1]``'s, and so on (each a mapping of the module's parameter names to tensors)."""
        import contextlib

        @contextlib.contextmanager
        def routing() -> Any:
            patched = []
            try:
                for path, layer in self.layers().items():
                    a, b = adapter_names(path)
                    layer.forward = _Routed(layer, [c[a] for c in clients], [c[b] for c in clients], list(sizes))
                    patched.append(layer)
                yield
            finally:
                for layer in patched:
                    del layer.forward  # the instance attribute: the class's forward is back

        return routing()


class _Routed:
    """The forward of one peft LoRA layer under :meth:`RoutedAdapters.route`."""

    def __init__(self, layer: Any, a: list[Tensor], b: list[Tensor], sizes: list[int]) -> None:
        self.layer, self.a, self.b, self.sizes = layer, a, b, sizes

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        import torch
        import torch.nn.functional as F

        layer = self.layer
        result = layer.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        total = sum(self.sizes)
        if x.shape[0] != total:
            raise RoutingError(f"a LoRA layer saw {x.shape[0]} rows for {total} samples")
        if x.dtype != self.a[0].dtype:  # as peft's _cast_input_dtype
            x = x.to(self.a[0].dtype)
        x = layer.lora_dropout[_ADAPTER](x)
        if len(set(self.sizes)) == 1:  # equal shares: one batched matmul over the stacked factors
            rows = x.reshape(len(self.sizes), -1, x.shape[-1])
            a, b = torch.stack(self.a), torch.stack(self.b)  # (K, r, in), (K, out, r)
            delta = torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2)).reshape(*x.shape[:-1], -1)
        else:
            delta = torch.cat([F.linear(F.linear(part, a), b)
                               for part, a, b in zip(x.split(self.sizes), self.a, self.b)])
        return (result + delta * layer.scaling[_ADAPTER]).to(dtype)
