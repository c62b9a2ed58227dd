"""Static GPU checks: compile every Triton kernel variant for NVIDIA GPUs without a GPU.

Run as a script with TRITON_INTERPRET unset (tests/test_gpu_compile.py and `make gpu-static` do):
the interpreter runs the kernels' Python on the CPU and cannot see type or lowering errors that
only the GPU compiler (Triton -> LLVM -> PTX -> ptxas) reports. For each compiled kernel it reads,
without running it:

- registers per thread (the cubin's resource usage, as ``cuobjdump --dump-resource-usage`` prints
  it) and local memory / stack (ptxas spills go there: both must be 0);
- the widest global access in the PTX: aligned variants must reach the vector width their
  elements per thread allow (128 bits for fp32 with >= 4 elements per thread per array; a kernel
  that stores must store that wide too);
- fp64 instructions: only the norm's sum of squares (norm, Momentum-SAM's pass 1 and their final
  sums) may use them;
- the predicted occupancy of the launch on that architecture (65536 registers per SM, allocated
  per warp in units of 256; at most 2048 threads per SM, 1536 on sm_89; 32 programs per SM, 24 on
  sm_89; shared memory per SM).

Modes: ``--shard K/N`` compiles every N-th variant of the full sweep (sm_90, every variant, the
default configurations) from the K-th; ``--quick`` a covering subset (one variant of each kernel
family and update kind on sm_90; perturb, AdamW's update and the norm on the other architectures); ``--table`` the fp32 aligned representative of
each pass, on every architecture, under the default configuration and every sweep candidate, and
prints the register/occupancy table (``make gpu-static``). ``--json PATH`` writes the rows.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sam_fused.kernels import dots, launch, msam, norm, perturb, universal, update

DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
BITS = {"fp32": 32, "bf16": 16, "fp16": 16}
ARCHS = (80, 89, 90, 100)
# per architecture: max threads per SM, max programs (CTAs) per SM, shared memory per SM (bytes)
SM_LIMITS = {80: (2048, 32, 164 * 1024), 89: (1536, 24, 100 * 1024), 90: (2048, 32, 228 * 1024),
             100: (2048, 32, 228 * 1024)}
REGS_PER_SM = 65536
REG_UNIT = 256  # registers are allocated per warp in units of 256
# kernel families whose element loop may hold fp64: the norm's sum of squares (and its final sum)
FP64_FAMILIES = {"norm", "msam_update", "finalize", "msam_finalize"}
# families that store in their element loop (a 128-bit store must show for them)
STORES = {"perturb", "update", "msam_update", "msam_perturb", "usam_perturb", "usam_accumulate"}
# Spills ptxas reports for the committed default configuration, (variant, arch) -> bytes stored:
# known, reported in the table, not failed on (a narrow tail removes them: benchmarks/NOTES.md). Any
# other spill, or a larger one, fails.
KNOWN_SPILLS = {(("norm", "fp32", False, True, False, False), 90): 8, (("norm", "fp32", False, True, False, False), 80): 8,
                (("usam_perturb", "fp32", False, False, False), 90): 4,
                (("msam_update", "fp32", 2, True, False, True), 100): 12,
                (("usam_accumulate", "fp32", 0, False, False), 89): 4,
                # the full sweep's (sm_90, every variant): Nesterov's update, universal SAM's first
                # half-precision perturb with generated noise (each at 128 registers)
                (("update", "fp32", 1, 1, 1, 0, 0, True), 90): 8,
                (("usam_perturb", "bf16", True, False, False), 90): 32,
                (("usam_perturb", "fp16", True, False, False), 90): 32}
# fp64 outside the norm's sums, known: universal SAM's in-kernel noise (tl.rand / tl.randn with
# the tensor's 64-bit element offset) compiles to fp64 conversions; reported, not failed on.
KNOWN_FP64 = {"usam_perturb": lambda constexprs: not constexprs.get("EXPLICIT")}
# the launch-configuration pass of each family
PASS_OF = {"norm": "norm", "perturb": "perturb", "dots": "dots", "update": "update", "msam_update": "msam_update",
           "msam_perturb": "msam_perturb", "usam_perturb": "usam_perturb", "usam_accumulate": "usam_accumulate"}


def sig(kernel, types: dict) -> dict:
    """Every argument of ``kernel`` typed: constexprs as such, the others from ``types``."""
    return {name: types.get(name, "constexpr") for name in kernel.arg_names}


def default_config(pass_name: str) -> launch.Config:
    return launch.load(launch.PATH).lookup(None, pass_name, 1 << 40)


def config_constexprs(cfg: launch.Config, elementwise: bool) -> dict:
    out = dict(CHUNK=cfg.chunk, BLOCK=cfg.block, TAIL=cfg.tail or cfg.block, STAGES=cfg.num_stages)
    if elementwise:
        out["PERSISTENT"] = cfg.persistent
    return out


def variants(configs=None):
    """(name, kernel, argument types, constexprs, pass or None) of every kernel variant, each under
    ``configs[pass]`` (default: the committed table's default entry)."""
    cfgs = {p: (configs or {}).get(p) or default_config(p) for p in launch.PASSES}

    def cx(pass_name, **kw):
        return dict(kw, **config_constexprs(cfgs[pass_name], pass_name not in launch.REDUCTIONS))

    f32 = "fp32"
    for dt, ad, al, amp in itertools.product(DTYPES, (False, True), (False, True), (False, True)):
        if amp and not al:  # AMP (GradScaler) variants only with aligned tables
            continue
        c = dict(DTYPE=DTYPES[dt], ADAPTIVE=ad, AMP=amp, ALIGNED=al)
        yield ("norm", dt, ad, al, amp, False), norm._sq_partials_kernel, dict(
            chunks="*i64", tensors="*i64", partials="*fp64", n_chunks="i32", eta=f32, inv_scale_ptr="*fp32"), \
            cx("norm", **c), "norm"
        if al and not ad:  # the preconditioned norm (Adam's denominator), aligned tables
            yield ("norm", dt, ad, al, amp, True), norm._sq_pre_partials_kernel, dict(
                chunks="*i64", tensors="*i64", partials="*fp64", n_chunks="i32", eps=f32, inv_scale_ptr="*fp32",
                bc2_inv=f32), cx("norm", DTYPE=DTYPES[dt], AMP=amp, ALIGNED=al), "norm"
        for save, pre in ((False, False), (True, False), (False, True)) if (al and not ad) else ((False, False),):
            yield ("perturb", dt, ad, al, amp, save, pre), perturb._perturb_kernel, dict(
                chunks="*i64", tensors="*i64", n_chunks="i32", norm_ptr="*fp32", rho=f32, eta=f32,
                inv_scale_ptr="*fp32", bc2_inv=f32), cx("perturb", SAVE=save, PRECOND=pre, **c), "perturb"
        if not ad:
            yield ("dots", dt, al, amp), dots._dots_partials_kernel, dict(
                chunks="*i64", tensors="*i64", partials="*fp32", n_chunks="i32", inv_scale_ptr="*fp32"), \
                cx("dots", DTYPE=DTYPES[dt], AMP=amp, ALIGNED=al), "dots"
    yield ("finalize",), norm._finalize_kernel, dict(partials="*fp64", n="i32", sq="*fp64", norm="*fp32"), dict(
        PBLOCK=1024), None
    for amp in (False, True):
        yield ("msam_finalize", amp), msam._finalize_kernel, dict(
            partials="*fp64", n="i32", sq="*fp64", inv_ptr="*fp32", inv_next_ptr="*fp32", found_inf_ptr="*fp32"), dict(
            AMP=amp, PBLOCK=1024), None
    yield ("finalize_dots",), dots._finalize_dots_kernel, dict(partials="*fp32", n="i32", out="*fp32"), dict(
        PBLOCK=1024), None
    floats = "sign lr l2 decay momentum keep coef one_minus_beta1 beta2 one_minus_beta2 eps step_size".split()
    floats.append("bias_correction2_sqrt")
    utypes = dict(chunks="*i64", tensors="*i64", n_chunks="i32", inv_scale_ptr="*fp32", found_inf_ptr="*fp32",
                  coef_ptr="*fp32", **{f: f32 for f in floats})
    for dt in DTYPES:
        for opt, mom, nest, amp, comb in [(0, 0, 0, 0, 0), (1, 0, 0, 0, 0), (1, 1, 0, 0, 0), (1, 1, 1, 0, 0),
                                          (2, 0, 0, 0, 0), (1, 1, 0, 1, 0), (2, 0, 0, 1, 0),
                                          # GSAM (1) and LookSAM (2) combinations
                                          (1, 1, 0, 0, 1), (1, 1, 0, 0, 2), (2, 0, 0, 0, 1), (2, 0, 0, 0, 2),
                                          (1, 1, 0, 1, 1)]:
            for al in (False, True) if not comb else (True,):
                c = cx("update", DTYPE=DTYPES[dt], OPT=opt, HAS_MOMENTUM=bool(mom), NESTEROV=bool(nest),
                       AMP=bool(amp), COMBINE=comb, ALIGNED=al)
                yield ("update", dt, opt, mom, nest, amp, comb, al), update._restore_update_kernel, utypes, c, "update"
        mtypes = dict(chunks="*i64", tensors="*i64", partials="*fp64", n_chunks="i32", inv_ptr="*fp32",
                      inv_scale_ptr="*fp32", found_inf_ptr="*fp32", rho=f32,
                      **{f: f32 for f in floats if f != "momentum"})
        for opt, restore, amp, al in itertools.product((1, 2), (False, True), (False, True), (False, True)):
            if amp and not al:
                continue
            c = cx("msam_update", DTYPE=DTYPES[dt], OPT=opt, RESTORE=restore, AMP=amp, ALIGNED=al)
            yield ("msam_update", dt, opt, restore, amp, al), msam._update_kernel, mtypes, c, "msam_update"
        for amp, al in ((False, False), (False, True), (True, True)):
            yield ("msam_perturb", dt, amp, al), msam._perturb_kernel, dict(
                chunks="*i64", tensors="*i64", n_chunks="i32", inv_next_ptr="*fp32", found_inf_ptr="*fp32",
                rho=f32), cx("msam_perturb", DTYPE=DTYPES[dt], AMP=amp, ALIGNED=al), "msam_perturb"
        for start, uni, expl in itertools.product((False, True), repeat=3):
            c = cx("usam_perturb", DTYPE=DTYPES[dt], START=start, UNIFORM=uni, EXPLICIT=expl, ALIGNED=not expl)
            yield ("usam_perturb", dt, start, uni, expl), universal._usam_perturb_kernel, dict(
                chunks="*i64", tensors="*i64", n_chunks="i32", seed="i32", rho=f32, h=f32), c, "usam_perturb"
        for measure, first, last in itertools.product((0, 1, 2), (False, True), (False, True)):
            c = cx("usam_accumulate", DTYPE=DTYPES[dt], MEASURE=measure, FIRST=first, LAST=last, ALIGNED=True)
            yield ("usam_accumulate", dt, measure, first, last), universal._usam_accumulate_kernel, dict(
                chunks="*i64", tensors="*i64", n_chunks="i32", losses="*fp32", i="i32", n="i32", rho=f32, lam=f32), \
                c, "usam_accumulate"


# The fp32 aligned representative of each pass (the table of `make gpu-static`), by its name.
REPRESENTATIVES = {
    "norm": ("norm", "fp32", False, True, False, False),
    "perturb": ("perturb", "fp32", False, True, False, False, False),
    "update sgd-mom": ("update", "fp32", 1, 1, 0, 0, 0, True),
    "update adamw": ("update", "fp32", 2, 0, 0, 0, 0, True),
    "restore": ("update", "fp32", 0, 0, 0, 0, 0, True),
    "dots": ("dots", "fp32", True, False),
    "msam_update sgd": ("msam_update", "fp32", 1, True, False, True),
    "msam_update adam": ("msam_update", "fp32", 2, True, False, True),
    "msam_perturb": ("msam_perturb", "fp32", False, True),
    "usam_perturb": ("usam_perturb", "fp32", False, False, False),
    "usam_accumulate": ("usam_accumulate", "fp32", 0, False, False),
}
# `make test`'s subset (with the representatives): bf16 and fp16 rounding, the unaligned path,
# AMP, GSAM/LookSAM's combine, ASAM's norm and perturb, the preconditioned norm and perturb, and a
# final sum.
QUICK_EXTRA = [("update", "bf16", 2, 0, 0, 0, 0, True), ("perturb", "fp16", True, True, True, False, False),
               ("update", "fp32", 1, 1, 0, 1, 2, True), ("norm", "bf16", True, False, False, False),
               ("perturb", "fp32", False, True, False, True, False), ("msam_update", "bf16", 2, True, True, True),
               ("norm", "fp32", False, True, False, True), ("perturb", "fp32", False, True, False, False, True),
               ("finalize",)]


class Toolchain:
    """Triton's bundled cuobjdump (resource usage of a cubin) and ptxas (its spill report)."""

    def __init__(self) -> None:
        base = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        self.cuobjdump = os.environ.get("TRITON_CUOBJDUMP_PATH") or str(base / "cuobjdump")
        self.base = base

    def spills(self, ptx: str, arch: int) -> tuple[int, int]:
        """(spill store bytes, spill load bytes) that ptxas -v reports for the PTX, run as Triton
        runs it for the cubin (its ptxas for that arch and its flags; a register cap is in the
        PTX's .maxnreg)."""
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "k.ptx"
            src.write_text(ptx)
            cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                   f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(d) / "k.o")]
            out = subprocess.run(cmd, capture_output=True, text=True)
        text = out.stdout + out.stderr
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        if out.returncode != 0 or m is None:
            raise RuntimeError(f"ptxas -v failed: {text[-600:]}")
        return int(m.group(1)), int(m.group(2))

    def resources(self, cubin: bytes) -> dict:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([self.cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 check=True).stdout
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
        if m is None:
            raise RuntimeError(f"no resource usage in cuobjdump's output: {out[-400:]}")
        regs, stack, shared, local = (int(x) for x in m.groups())
        return dict(regs=regs, stack=stack, shared=shared, local=local)


def supported_archs(archs=ARCHS) -> tuple[list[int], dict[int, str]]:
    """The architectures this triton/ptxas compiles for, and why the others are skipped."""
    from triton.backends.nvidia.compiler import CUDABackend

    ok, skipped = [], {}
    for arch in archs:
        try:
            CUDABackend(GPUTarget("cuda", arch, 32))
            ok.append(arch)
        except Exception as e:  # an arch the installed triton does not know
            skipped[arch] = f"{type(e).__name__}: {e}"[:200]
    return ok, skipped


def occupancy(regs: int, num_warps: int, shared: int, arch: int) -> tuple[int, float]:
    """(programs per SM, fraction of the SM's warp slots) the registers, threads and shared memory
    allow."""
    max_threads, max_ctas, smem = SM_LIMITS[arch]
    per_warp = math.ceil(max(regs, 1) * 32 / REG_UNIT) * REG_UNIT
    by_regs = (REGS_PER_SM // per_warp) // num_warps
    by_threads = max_threads // (32 * num_warps)
    by_smem = smem // shared if shared else max_ctas
    ctas = min(by_regs, by_threads, max_ctas, by_smem)
    return ctas, ctas * num_warps * 32 / max_threads


def vector_bits(ptx: str, op: str) -> int:
    """Widest global access of ``op`` (ld or st) in the PTX; a software-pipelined load
    (num_stages) is a ``cp.async`` of 4, 8 or 16 bytes into shared memory."""
    widths = [int(v) * int(b) for v, b in re.findall(rf"{op}\.global(?:\.\w+)*?\.v(\d)\.(?:b|f|u|s)(\d+)", ptx)]
    if op == "ld":
        widths += [8 * int(n, 0) for n in re.findall(r"cp\.async\.\w+\.shared\.global \[[^\]]*\], \[[^\]]*\], (0x[0-9a-f]+|\d+)", ptx)]
    return max(widths, default=0)


def fp64_lines(ptx: str) -> list[str]:
    return [ln.strip() for ln in ptx.splitlines() if re.search(r"^\s*[a-z][\w.]*\.f64\b", ln)
            and not ln.strip().startswith(("ld.param", "//"))]


def check(name, kernel, types, constexprs, arch: int, num_warps: int, tools: Toolchain, maxnreg=None) -> dict:
    """Compile one variant for ``arch`` and read what can be seen without running it; the row's
    ``problems`` lists every failed expectation."""
    src = ASTSource(fn=kernel, signature=sig(kernel, types), constexprs=constexprs)
    options = dict(num_warps=num_warps)
    if maxnreg:
        options["maxnreg"] = maxnreg
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    cubin, ptx = compiled.asm.get("cubin"), compiled.asm["ptx"]
    problems = []
    if not cubin:
        problems.append("no cubin")
        return dict(name=list(map(str, name)), arch=arch, problems=problems)
    res = tools.resources(cubin)
    family = name[0]
    ld, st = vector_bits(ptx, "ld"), vector_bits(ptx, "st")
    row = dict(name=[str(x) for x in name], family=family, arch=arch, num_warps=num_warps, **res, ld_bits=ld,
               st_bits=st, problems=problems)
    spill_st, spill_ld = tools.spills(ptx, arch)
    row.update(spill_stores=spill_st, spill_loads=spill_ld)
    known = KNOWN_SPILLS.get((tuple(name), arch))
    is_default = pass_name_of(name) is None or constexprs.get("BLOCK") is None or all(
        constexprs.get(k) == v for k, v in config_constexprs(default_config(pass_name_of(name)),
                                                            pass_name_of(name) not in launch.REDUCTIONS).items())
    if known is not None and is_default and spill_st <= known and not res["local"]:
        if spill_st:
            row["known"] = f"known spill: {spill_st} B"
    elif spill_st or spill_ld or res["local"]:
        problems.append(f"spills: {spill_st} B stored, {spill_ld} B loaded, {res['local']} B local memory")
    block = constexprs.get("BLOCK")
    if constexprs.get("ALIGNED") and block:
        dt = next((k for k, v in DTYPES.items() if v == constexprs.get("DTYPE")), "fp32")
        ept = block // (32 * num_warps)
        want = min(128, ept * BITS[dt])
        row["want_bits"] = want
        if want >= 64 and ld < want:
            problems.append(f"widest load {ld} bits, {want} expected ({ept} {dt} elements per thread)")
        if family in STORES and want >= 64 and st < want:
            problems.append(f"widest store {st} bits, {want} expected")
    f64 = fp64_lines(ptx)
    row["f64_instructions"] = len(f64)
    if f64 and family in KNOWN_FP64 and KNOWN_FP64[family](constexprs):
        row["known"] = (row.get("known", "") + f" known fp64: {len(f64)} instructions").strip()
    elif f64 and family not in FP64_FAMILIES:
        problems.append(f"{len(f64)} fp64 instructions, e.g. {f64[0]!r}")
    ctas, occ = occupancy(res["regs"], num_warps, res["shared"], arch)
    row.update(programs_per_sm=ctas, occupancy=occ)
    return row


def pass_name_of(name) -> str | None:
    return PASS_OF.get(name[0])


def _select(which: str):
    if which == "full":
        return list(variants())
    wanted = set(REPRESENTATIVES.values()) | set(QUICK_EXTRA)
    return [v for v in variants() if v[0] in wanted]


def table_rows(archs, tools: Toolchain, candidates) -> list[dict]:
    """The representative of each pass under the default configuration and every candidate of
    that pass, on every architecture."""
    rows = []
    for label, key in REPRESENTATIVES.items():
        pass_name = PASS_OF[key[0]]
        cfgs = [("default", default_config(pass_name))]
        cfgs += [(c.label(), c) for c in candidates.get(pass_name, []) if c != cfgs[0][1]]
        for tag, cfg in cfgs:
            name, kernel, types, constexprs, _ = next(v for v in variants({pass_name: cfg}) if v[0] == key)
            for arch in archs:
                row = check(name, kernel, types, constexprs, arch, cfg.num_warps, tools, cfg.maxnreg)
                row.update(kernel=label, config=tag, config_label=cfg.label(),
                           elements_per_thread=cfg.block // (32 * cfg.num_warps))
                rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = ["kernel", "config", "arch", "regs", "spill B", "ld/st bits", "elem/thr", "progs/SM", "occupancy", "ok"]
    lines = [head]
    for r in rows:
        lines.append([r["kernel"], r["config"] if r["config"] == "default" else r["config_label"], f"sm_{r['arch']}",
                      str(r["regs"]), str(r["spill_stores"] + r["spill_loads"]), f"{r['ld_bits']}/{r['st_bits']}",
                      str(r["elements_per_thread"]), str(r["programs_per_sm"]), f"{100 * r['occupancy']:.1f}%",
                      ("; ".join(r["problems"]) if r["problems"] else r.get("known", "yes"))])
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(x[i].ljust(widths[i]) for i in range(len(head))).rstrip() for x in lines)


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shard", default="0/1", help="K/N: every N-th variant from the K-th")
    ap.add_argument("--quick", action="store_true", help="the covering subset, on every architecture")
    ap.add_argument("--table", action="store_true", help="the register/occupancy table of each pass and candidate")
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="architectures (default: %(default)s)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    shard, shards = (int(x) for x in args.shard.split("/"))
    if not isinstance(norm._sq_partials_kernel, triton.runtime.jit.JITFunction):
        print("kernels are interpreted: run with TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    archs, skipped = supported_archs(tuple(int(a) for a in args.arch.split(",")))
    for arch, why in skipped.items():
        print(f"sm_{arch}: skipped ({why})")
    tools = Toolchain()
    rows = []
    if args.table:
        from sam_fused.tools.bench.sweep import candidates

        rows = table_rows(archs, tools, candidates())
        print(format_table(rows))
    else:
        selected = _select("quick" if args.quick else "full")
        main_arch = 90 if 90 in archs else archs[0]
        jobs = [(v, main_arch) for v in selected]
        if args.quick:  # the other architectures: the heaviest passes' representatives
            heavy = {REPRESENTATIVES[k] for k in ("perturb", "update adamw", "norm")}
            jobs += [(v, a) for v in selected if v[0] in heavy for a in archs if a != main_arch]
        for index, ((name, kernel, types, constexprs, pass_name), arch) in enumerate(jobs):
            if index % shards != shard:
                continue
            warps = default_config(pass_name).num_warps if pass_name else 4
            rows.append(check(name, kernel, types, constexprs, arch, warps, tools))
    bad = [r for r in rows if r["problems"]]
    if args.table:  # a candidate's problems are what the table shows; only the default's fail
        bad = [r for r in bad if r["config"] == "default"]
    for r in bad:
        print(f"FAILED {'/'.join(r['name'])} sm_{r['arch']}: {'; '.join(r['problems'])}")
    widest: dict = {}
    for r in rows:
        widest[r["name"][0]] = max(widest.get(r["name"][0], 0), r.get("ld_bits", 0))
    print(f"compiled {len(rows)} kernel variants for {', '.join(f'sm_{a}' for a in sorted({r['arch'] for r in rows}))}; "
          f"widest global load per family (bits): {widest}; {len(bad)} with problems")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, skipped={f"sm_{a}": w for a, w in skipped.items()}),
                                              indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
