"""The public optimizers, one module per algorithm over one base (``base.SAMOptimizer``)."""

from .functional import FunctionalSAM
from .gsam import GSAM, RhoFollowsLR
from .looksam import LookSAM
from .msam import MSAM
from .base import LARGE_PERTURBATION, LargePerturbationWarning
from .sam import FusedSAM
from .universal import DetSAM, FrobSAM, TraceSAM, UniversalSAM

__all__ = ["FusedSAM", "FunctionalSAM", "GSAM", "LookSAM", "MSAM", "RhoFollowsLR", "UniversalSAM", "FrobSAM", "TraceSAM",
           "DetSAM", "LargePerturbationWarning", "LARGE_PERTURBATION"]
