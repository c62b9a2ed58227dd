"""Memory-layout predicates: when a tensor's elements can be walked as one flat array."""

from __future__ import annotations

import functools

from torch import Tensor


@functools.lru_cache(maxsize=4096)
def _dense(shape: tuple, stride: tuple) -> bool:
    expected = 1
    for st, size in sorted((st, sz) for sz, st in zip(shape, stride) if sz != 1):
        if st != expected:
            return False
        expected *= size
    return True


def is_dense(t: Tensor) -> bool:
    """True when the ``numel`` elements of ``t`` fill ``numel`` consecutive slots from ``data_ptr``.

    Cached per (shape, strides): the optimizers ask this of every tensor at every step, and a
    model has few distinct layouts."""
    return _dense(t.shape, t.stride())


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
    stride = p.stride()
    if not _dense(p.shape, stride):
        return False
    dtype, device = p.dtype, None
    for o in others:
        if o is None:
            continue
        if o.stride() != stride or o.dtype != dtype:
            return False
        if device is None:
            device = p.device
        if o.device != device:
            return False
    return True
