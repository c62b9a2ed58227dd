"""sam_fused: Sharpness-Aware Minimization with fused multi-tensor kernels."""

from .backends import BACKENDS, BackendUnavailable, available_backends
from .optimizer import FusedSAM

__all__ = ["FusedSAM", "BACKENDS", "BackendUnavailable", "available_backends"]
__version__ = "0.1.0"
