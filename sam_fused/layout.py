"""Memory-layout predicates: when a tensor's elements can be walked as one flat array."""

from __future__ import annotations

import torch
from torch import Tensor


def is_dense(t: Tensor) -> bool:
    """True when the ``numel`` elements of ``t`` fill ``numel`` consecutive slots from ``data_ptr``."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def preserved_strides(t: Tensor) -> tuple[int, ...]:
    """Strides of ``torch.empty_like(t, memory_format=torch.preserve_format)``: ``t``'s own when it
    is dense, row-major otherwise."""
    if is_dense(t):
        return t.stride()
    strides, acc = [], 1
    for size in reversed(t.shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


def same_layout(p: Tensor, *others: Tensor | None) -> bool:
    """``p`` is dense and every other tensor has its dtype, device and strides: flat indexing is valid."""
    if not is_dense(p):
        return False
    return all(
        o is None or (o.dtype == p.dtype and o.device == p.device and o.stride() == p.stride())
        for o in others
    )
