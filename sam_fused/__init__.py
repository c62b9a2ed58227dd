"""sam_fused: Sharpness-Aware Minimization with fused multi-tensor kernels."""

from .backends import BACKENDS, BackendUnavailable, available_backends
from .nn import norm_layer_param_groups
from .optim import (DetSAM, FrobSAM, FunctionalSAM, FusedSAM, GSAM, LargePerturbationWarning, LookSAM, MSAM, RhoFollowsLR,
                    TraceSAM, UniversalSAM)

__all__ = ["FusedSAM", "FunctionalSAM", "GSAM", "LookSAM", "MSAM", "RhoFollowsLR", "UniversalSAM", "FrobSAM", "TraceSAM",
           "DetSAM", "BACKENDS", "BackendUnavailable", "available_backends", "norm_layer_param_groups",
           "LargePerturbationWarning"]
__version__ = "0.1.0"
