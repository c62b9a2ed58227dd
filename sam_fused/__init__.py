"""sam_fused: Sharpness-Aware Minimization with fused multi-tensor kernels."""

from .backends import BACKENDS, BackendUnavailable, available_backends
from .optim import DetSAM, FrobSAM, FusedSAM, GSAM, LargePerturbationWarning, LookSAM, MSAM, RhoFollowsLR, TraceSAM, UniversalSAM

__all__ = ["FusedSAM", "GSAM", "LookSAM", "MSAM", "RhoFollowsLR", "UniversalSAM", "FrobSAM", "TraceSAM", "DetSAM", "BACKENDS", "BackendUnavailable",
           "available_backends", "LargePerturbationWarning"]
__version__ = "0.1.0"
