"""Triton multi-tensor kernels: one kernel family per module, all driven by ``PointerTable``.

- ``table``:   the device-resident table of tensor addresses and chunk offsets, and shared helpers;
- ``norm``:    per-program partial sums of ``(T * g)^2`` and the deterministic final reduction;
- ``perturb``: backup + ``w += e`` in one pass, scale read from the device;
- ``update``:  restore from the backup fused with the SGD or Adam/AdamW update (or restore alone);
- ``universal``: Frob-/Trace-/Det-SAM: in-kernel Philox noise, sums fused into the gradient pass.
"""
