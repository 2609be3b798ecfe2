"""Datasets (one family per file), partitions and fixture writers."""

from fedhb.data.adftd import ADFTD
from fedhb.data.base import FederatedDataset, Samples
from fedhb.data.brats import BraTS
from fedhb.data.ehrxqa import EHRXQA
from fedhb.data.icbhi import ICBHI
from fedhb.data.iu_xray import IUXray, IUXrayReports
from fedhb.data.medical_abstracts import MedicalAbstracts
from fedhb.data.medmnist import MedMNIST
from fedhb.data.mimic_cxr import MIMICCXR
from fedhb.data.padchest import PadChest
from fedhb.data.pathvqa import PathVQA
from fedhb.data.ptbxl import PTBXL
from fedhb.data.pubmed_rct import PubMedRCT
from fedhb.data.sprsound import SPRSound
from fedhb.data.symile_mimic import SymileMIMIC

__all__ = [
    "ADFTD", "ICBHI", "MIMICCXR", "PTBXL", "FederatedDataset", "IUXray", "IUXrayReports", "MedMNIST",
    "MedicalAbstracts", "PadChest", "PubMedRCT", "SPRSound", "Samples",
    "EHRXQA", "PathVQA",
    "BraTS",
    "SymileMIMIC",
]
