"""Federated algorithms, one per file; the registry is ``_MODULES`` below and ``__all__``.

Choose one in YAML (``algorithm: {class_path: EPFL, init_args: {lam: 0.5}}``) or on the command line
(``--algorithm EPFL --algorithm.lam 0.5``).

A class is imported when it is first asked for (``from fedhb.algorithms import FedAvg``, ``fedhb.algorithms.EPFL``;
PEP 562), so importing this package imports neither torch nor any algorithm: ``fedhb fit --help`` stays fast. A new
algorithm is one line in ``_MODULES``: its class name and the module (in this package) that defines it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from fedhb.algorithms.base import Algorithm as Algorithm  # re-exported (in __all__)

#: Class name -> the module of this package that defines it, one line per algorithm.
_MODULES = {
    "APFL": "apfl",
    "APPLE": "apple",
    "Centralized": "centralized",
    "CreamFL": "creamfl",
    "Ditto": "ditto",
    "EPFL": "epfl",
    "FedAdagrad": "fedadagrad",
    "FedAdam": "fedadam",
    "FedALA": "fedala",
    "FedAvg": "fedavg",
    "FedAvgM": "fedavgm",
    "FedBABU": "fedbabu",
    "FedDPA": "feddpa",
    "FedDyn": "feddyn",
    "FedNova": "fednova",
    "FedPer": "fedper",
    "FedProx": "fedprox",
    "FedRep": "fedrep",
    "FedSALoRA": "fedsa_lora",
    "FedYogi": "fedyogi",
    "FFALoRA": "ffa_lora",
    "FLoRA": "flora",
    "HetLoRA": "hetlora",
    "Local": "local",
    "MMOON": "mmoon",
    "MOON": "moon",
    "PerFedAvg": "perfedavg",
    "PFedMe": "pfedme",
    "SCAFFOLD": "scaffold",
    "LocalTrainer": "trainer",
}

__all__ = sorted(["Algorithm", *_MODULES])


def __getattr__(name: str) -> Any:
    """Import the module of a registered class on first use (PEP 562) and keep the class as this package's attribute."""
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def names() -> list[str]:
    """The algorithm names ``--algorithm`` accepts, as :func:`fedhb.registry.known_plugins` sorts them, without
    importing any algorithm."""
    return sorted((n for n in _MODULES if n != "LocalTrainer"), key=str.lower)


def load_all() -> list[Any]:
    """Import every registered class (jsonargparse finds ``--algorithm NAME`` among the loaded subclasses of
    :class:`Algorithm`); returns them in ``__all__`` order."""
    return [getattr(sys.modules[__name__], name) for name in __all__]
