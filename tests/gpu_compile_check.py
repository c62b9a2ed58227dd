"""Compile every Triton kernel variant for a Hopper GPU (sm_90) without a GPU.

Run as a script with TRITON_INTERPRET unset (tests/test_gpu_compile.py does): the interpreter
runs the kernels' Python on the CPU and cannot see type or lowering errors that only the GPU
compiler (Triton -> LLVM -> PTX -> ptxas) reports. Prints one line per variant and a summary
with the widest global access found in the PTX (the ALIGNED variants must use vector ones).
"""

from __future__ import annotations

import itertools
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sam_fused.kernels import dots, momentum, norm, perturb, universal, update
from sam_fused.kernels.table import NUM_WARPS

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
COMMON: dict = {}


def sig(kernel, types: dict) -> dict:
    """Every argument of ``kernel`` typed: constexprs as such, the others from ``types``."""
    out = {}
    for name in kernel.arg_names:
        out[name] = types.get(name, "constexpr")
    return out


def variants():
    f32 = "fp32"
    # AMP (GradScaler) variants only with aligned tables: the unscale is a scalar multiply
    for dt, ad, al, amp in itertools.product(DTYPES, (False, True), (False, True), (False, True)):
        if amp and not al:
            continue
        c = dict(COMMON, DTYPE=DTYPES[dt], ADAPTIVE=ad, AMP=amp, ALIGNED=al)
        yield ("norm", dt, ad, al, amp), norm._sq_partials_kernel, dict(
            chunks="*i64", tensors="*i64", partials="*fp64", n_chunks="i32", eta=f32, inv_scale_ptr="*fp32"), c
        # SAVE (GSAM, LookSAM keep g): the SAM perturbation only, aligned
        for save in (False, True) if (al and not ad) else (False,):
            yield ("perturb", dt, ad, al, amp, save), perturb._perturb_kernel, dict(
                chunks="*i64", tensors="*i64", norm_ptr="*fp32", rho=f32, eta=f32, inv_scale_ptr="*fp32"), dict(
                c, SAVE=save)
        if not ad:
            yield ("dots", dt, al, amp), dots._dots_partials_kernel, dict(
                chunks="*i64", tensors="*i64", partials="*fp32", n_chunks="i32", inv_scale_ptr="*fp32"), dict(
                COMMON, DTYPE=DTYPES[dt], AMP=amp, ALIGNED=al)
    yield ("finalize",), norm._finalize_kernel, dict(partials="*fp64", n="i32", sq="*fp64", norm="*fp32"), dict(
        PBLOCK=1024)
    for amp in (False, True):
        yield ("msam_finalize", amp), momentum._finalize_kernel, dict(
            partials="*fp64", n="i32", sq="*fp64", inv_ptr="*fp32", inv_next_ptr="*fp32", found_inf_ptr="*fp32"), dict(
            AMP=amp, PBLOCK=1024)
    yield ("finalize_dots",), dots._finalize_dots_kernel, dict(partials="*fp32", n="i32", out="*fp32"), dict(
        PBLOCK=1024)
    floats = "sign lr l2 decay momentum keep coef one_minus_beta1 beta2 one_minus_beta2 eps step_size".split()
    floats.append("bias_correction2_sqrt")
    utypes = dict(chunks="*i64", tensors="*i64", inv_scale_ptr="*fp32", found_inf_ptr="*fp32", coef_ptr="*fp32",
                  **{f: f32 for f in floats})
    for dt in DTYPES:
        for opt, mom, nest, amp, comb in [(0, 0, 0, 0, 0), (1, 0, 0, 0, 0), (1, 1, 0, 0, 0), (1, 1, 1, 0, 0),
                                          (2, 0, 0, 0, 0), (1, 1, 0, 1, 0), (2, 0, 0, 1, 0),
                                          # GSAM (1) and LookSAM (2) combinations
                                          (1, 1, 0, 0, 1), (1, 1, 0, 0, 2), (2, 0, 0, 0, 1), (2, 0, 0, 0, 2),
                                          (1, 1, 0, 1, 1)]:
            for al in (False, True) if not comb else (True,):
                c = dict(COMMON, DTYPE=DTYPES[dt], OPT=opt, HAS_MOMENTUM=bool(mom), NESTEROV=bool(nest),
                         AMP=bool(amp), COMBINE=comb, ALIGNED=al)
                yield ("update", dt, opt, mom, nest, amp, comb, al), update._restore_update_kernel, utypes, c
        mtypes = dict(chunks="*i64", tensors="*i64", partials="*fp64", n_chunks="i32", inv_ptr="*fp32",
                      inv_scale_ptr="*fp32", found_inf_ptr="*fp32", rho=f32,
                      **{f: f32 for f in floats if f != "momentum"})
        for opt, restore, amp, al in itertools.product((1, 2), (False, True), (False, True), (False, True)):
            if amp and not al:
                continue
            c = dict(COMMON, DTYPE=DTYPES[dt], OPT=opt, RESTORE=restore, AMP=amp, ALIGNED=al)
            yield ("msam_update", dt, opt, restore, amp, al), momentum._update_kernel, mtypes, c
        for amp, al in ((False, False), (False, True), (True, True)):
            yield ("msam_perturb", dt, amp, al), momentum._perturb_kernel, dict(
                chunks="*i64", tensors="*i64", inv_next_ptr="*fp32", found_inf_ptr="*fp32", rho=f32), dict(
                COMMON, DTYPE=DTYPES[dt], AMP=amp, ALIGNED=al)
        for start, uni, expl in itertools.product((False, True), repeat=3):
            c = dict(COMMON, DTYPE=DTYPES[dt], START=start, UNIFORM=uni, EXPLICIT=expl, ALIGNED=not expl)
            yield ("usam_perturb", dt, start, uni, expl), universal._usam_perturb_kernel, dict(
                chunks="*i64", tensors="*i64", seed="i32", rho=f32, h=f32), c
        for measure, first, last in itertools.product((0, 1, 2), (False, True), (False, True)):
            c = dict(COMMON, DTYPE=DTYPES[dt], MEASURE=measure, FIRST=first, LAST=last, ALIGNED=True)
            yield ("usam_accumulate", dt, measure, first, last), universal._usam_accumulate_kernel, dict(
                chunks="*i64", tensors="*i64", losses="*fp32", i="i32", n="i32", rho=f32, lam=f32), c


def main(argv: list[str]) -> int:
    """``--shard K/N``: compile every N-th variant from the K-th (the test runs N shards at once)."""
    shard, shards = 0, 1
    if len(argv) == 2 and argv[0] == "--shard":
        shard, shards = (int(x) for x in argv[1].split("/"))
    widest = {}
    count = 0
    for index, (name, kernel, types, constexprs) in enumerate(variants()):
        if index % shards != shard:
            continue
        if not isinstance(kernel, triton.runtime.jit.JITFunction):
            print("kernels are interpreted: run with TRITON_INTERPRET unset", file=sys.stderr)
            return 2
        src = ASTSource(fn=kernel, signature=sig(kernel, types), constexprs=constexprs)
        compiled = triton.compile(src, target=TARGET, options=dict(num_warps=NUM_WARPS))
        assert compiled.asm.get("cubin"), name
        ptx = compiled.asm["ptx"]
        if constexprs.get("ALIGNED"):  # the vectorized full blocks must show as 16-byte accesses
            assert re.search(r"(ld|st)\.global(\.\w+)*\.v[248]\.b(32|16)", ptx), f"no vector access in {name}"
        vec = re.findall(r"(?:ld|st)\.global(?:\.\w+)*?\.v(\d)\.b(\d+)", ptx)
        bits = max((int(v) * int(b) for v, b in vec), default=32)
        widest[name[0]] = max(widest.get(name[0], 0), bits)
        count += 1
    print(f"compiled {count} kernel variants for sm_90; widest global access per family (bits): {widest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
