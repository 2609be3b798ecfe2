"""Datasets (one family per file), partitions and fixture writers."""

from fedhb.data.adftd import ADFTD
from fedhb.data.base import FederatedDataset, Samples
from fedhb.data.icbhi import ICBHI
from fedhb.data.iu_xray import IUXrayReports
from fedhb.data.medical_abstracts import MedicalAbstracts
from fedhb.data.medmnist import MedMNIST
from fedhb.data.padchest import PadChest
from fedhb.data.ptbxl import PTBXL
from fedhb.data.pubmed_rct import PubMedRCT
from fedhb.data.sprsound import SPRSound

__all__ = [
    "ADFTD", "ICBHI", "PTBXL", "FederatedDataset", "IUXrayReports", "MedMNIST", "MedicalAbstracts", "PadChest",
    "PubMedRCT", "SPRSound", "Samples",
]
