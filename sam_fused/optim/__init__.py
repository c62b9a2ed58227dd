"""The public optimizers, one module per algorithm over one base (``base.SAMOptimizer``)."""

from .gsam import GSAM, RhoFollowsLR
from .looksam import LookSAM
from .sam import FusedSAM
from .universal import DetSAM, FrobSAM, TraceSAM, UniversalSAM

__all__ = ["FusedSAM", "GSAM", "LookSAM", "RhoFollowsLR", "UniversalSAM", "FrobSAM", "TraceSAM", "DetSAM"]
