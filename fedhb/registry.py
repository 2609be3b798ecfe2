"""The plug-ins ``--algorithm`` and ``--data`` accept, read from the registries' ``__all__`` when first asked.

Nothing here runs at import: ``--help`` and the CLI's start never pay for importing every algorithm and dataset, only
an error message or the HParams columns that need the names do.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

#: Plug-in option -> (what one is called, the module whose ``__all__`` lists them, their base class).
PLUGINS = {
    "algorithm": ("algorithm", "fedhb.algorithms", "fedhb.algorithms.base.Algorithm"),
    "data": ("dataset", "fedhb.data", "fedhb.data.base.FederatedDataset"),
}


def _attribute(dotted: str) -> Any:
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def known_plugins(key: str) -> list[str]:
    """The class names ``--{key}`` accepts (``key`` is ``algorithm`` or ``data``): the concrete subclasses of the
    base class in the registry's ``__all__``, sorted case-insensitively."""
    _, module_name, base_path = PLUGINS[key]
    module = importlib.import_module(module_name)
    base = _attribute(base_path)
    names = [name for name in getattr(module, "__all__", ())
             if inspect.isclass(obj := getattr(module, name, None)) and issubclass(obj, base) and obj is not base]
    return sorted(names, key=str.lower)


def plugin_class(key: str, name: str) -> type:
    """The class ``--{key} {name}`` names."""
    return getattr(importlib.import_module(PLUGINS[key][1]), name)


def init_options(cls_or_path: type | str) -> dict[str, inspect.Parameter]:
    """The ``__init__`` options of a plug-in class (or its dotted path; ``{}`` if it cannot be imported)."""
    if isinstance(cls_or_path, str):
        try:
            cls_or_path = _attribute(cls_or_path)
        except (ImportError, AttributeError, ValueError):
            return {}
    return {n: p for n, p in inspect.signature(cls_or_path.__init__).parameters.items()  # type: ignore[misc]
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
