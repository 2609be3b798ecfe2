"""LoRA adapters (Hu et al., arXiv 2106.09685) injected into a frozen backbone with peft."""

from __future__ import annotations

from torch import nn

from fedhb.config import LoRAArgs

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
        p.requires_grad_("lora_" in name)
    return model
