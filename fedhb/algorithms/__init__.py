"""Federated algorithms, one per file; the registry is this module's imports and ``__all__``.

Choose one in YAML (``algorithm: {class_path: EPFL, init_args: {lam: 0.5}}``) or on the command line
(``--algorithm EPFL --algorithm.lam 0.5``).
"""

from fedhb.algorithms.apfl import APFL
from fedhb.algorithms.apple import APPLE
from fedhb.algorithms.base import Algorithm
from fedhb.algorithms.centralized import Centralized
from fedhb.algorithms.ditto import Ditto
from fedhb.algorithms.epfl import EPFL
from fedhb.algorithms.fedadagrad import FedAdagrad
from fedhb.algorithms.fedadam import FedAdam
from fedhb.algorithms.fedala import FedALA
from fedhb.algorithms.fedavg import FedAvg
from fedhb.algorithms.fedavgm import FedAvgM
from fedhb.algorithms.fedbabu import FedBABU
from fedhb.algorithms.feddpa import FedDPA
from fedhb.algorithms.feddyn import FedDyn
from fedhb.algorithms.fednova import FedNova
from fedhb.algorithms.fedper import FedPer
from fedhb.algorithms.fedprox import FedProx
from fedhb.algorithms.fedrep import FedRep
from fedhb.algorithms.fedsa_lora import FedSALoRA
from fedhb.algorithms.fedyogi import FedYogi
from fedhb.algorithms.ffa_lora import FFALoRA
from fedhb.algorithms.flora import FLoRA
from fedhb.algorithms.hetlora import HetLoRA
from fedhb.algorithms.local import Local
from fedhb.algorithms.moon import MOON
from fedhb.algorithms.perfedavg import PerFedAvg
from fedhb.algorithms.pfedme import PFedMe
from fedhb.algorithms.scaffold import SCAFFOLD
from fedhb.algorithms.trainer import LocalTrainer

__all__ = [
    "APFL", "APPLE", "EPFL", "FFALoRA", "FLoRA", "MOON", "SCAFFOLD", "Algorithm", "Centralized", "Ditto",
    "FedALA", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedBABU", "FedDPA", "FedDyn", "FedNova", "FedPer",
    "FedProx", "FedRep", "FedSALoRA", "FedYogi", "HetLoRA", "Local", "LocalTrainer", "PFedMe", "PerFedAvg",
]
