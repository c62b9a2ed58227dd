"""Sweep of launch configurations (``sam_fused/kernels/launch_configs.json``) per pass.

Each candidate of a pass is timed against the device copy of the same run (taken in turn with
it: ``measure.time_ms``), on each shape; per pass and bucket size class, the candidate with the
best geometric mean of its fraction of the copy over that class's shapes wins (a class without a
measured shape keeps the default). The winners go out as a table in the committed file's format,
under the GPU's name, with the committed default entry beside it.

    python -m sam_fused.tools.bench.sweep --out DIR          # on a GPU: 64M, 256M, transformer, LLM
    SAM_FUSED_REHEARSAL=1 python -m sam_fused.tools.bench.sweep --out DIR   # tiny, on the CPU

Candidates (``candidates()``) are chosen from the static register counts (`make gpu-static`):
fewer elements per thread, a narrow masked tail, persistent grids and software pipelining (a
register cap of 128 made perturb and the AdamW update spill: left out). Timings are the device's; nothing here predicts them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ...kernels import launch
from ...optim import MSAM, FusedSAM
from .measure import median, quartiles, sync, time_ms
from .roofline import _params, llm_numels, transformer_numels

REHEARSAL = os.environ.get("SAM_FUSED_REHEARSAL") == "1"
# timed groups: (name, pass of the launch table, bytes per element in units of the dtype's size)
GROUPS = (("norm", "norm", 1), ("perturb", "perturb", 4), ("update sgd", "update", 5), ("update adamw", "update", 7),
          ("dots", "dots", 2), ("msam step sgd", "msam", 8))
ELEMENTWISE = ("perturb", "update", "msam_perturb", "usam_perturb", "usam_accumulate")


def _c(chunk, block, warps, **kw) -> dict:
    return dict(chunk=chunk, block=block, num_warps=warps, **kw)


def candidate_dicts() -> dict[str, list[dict]]:
    """The JSON objects of the candidates per pass (the default first)."""
    ew = [_c(65536, 4096, 8), _c(65536, 4096, 8, tail=256), _c(65536, 2048, 8, tail=256), _c(65536, 1024, 8),
          _c(65536, 1024, 4, tail=128), _c(16384, 2048, 8, tail=256, grid="persistent", per_sm=4),
          _c(65536, 4096, 8, tail=256, num_stages=2)]
    red = [_c(65536, 4096, 8, grid="persistent", programs=512),
           _c(65536, 4096, 8, tail=256, grid="persistent", programs=512),
           _c(65536, 2048, 8, tail=256, grid="persistent", per_sm=4),
           _c(65536, 1024, 8, grid="persistent", per_sm=8),
           _c(65536, 1024, 4, tail=128, grid="persistent", per_sm=8),
           _c(16384, 2048, 8, tail=256, grid="persistent", per_sm=2),
           _c(65536, 4096, 8, tail=256, grid="persistent", per_sm=4, num_stages=2)]
    out = {p: (red if p in launch.REDUCTIONS else ew) for p in launch.PASSES}
    return out


def candidates() -> dict[str, list[launch.Config]]:
    return {p: [launch.parse_config(d, f"candidate {p}[{i}]", p) for i, d in enumerate(ds)]
            for p, ds in candidate_dicts().items()}


def default_table_json() -> dict:
    return json.loads(launch.PATH.read_text())


def table_with(pass_configs: dict[str, dict]) -> dict:
    """The committed table with the default entry's passes replaced by ``pass_configs`` (pass ->
    JSON object, for every size class)."""
    data = default_table_json()
    passes = data["gpus"]["default"]["passes"]
    for p, cfg in pass_configs.items():
        passes[p] = {"*": cfg}
    return {"version": 1, "size_classes": data["size_classes"], "gpus": {"default": data["gpus"]["default"]}}


def shapes(device: torch.device, tiny: bool = False) -> list[tuple[str, list[int]]]:
    if tiny:
        return [("mix", [97, 5000, 65536 + 3])]
    if REHEARSAL or device.type != "cuda":
        return [("1 tensor", [70_000]), ("mix", [1, 97, 4096, 5000, 65536 + 3])]
    return [("1 tensor", [64_000_000]), ("1 tensor", [256_000_000]), ("transformer", transformer_numels(1e8)),
            ("llm", llm_numels())]


def _copy_fn(device: torch.device, n: int):
    """A device copy of n fp32 elements (read + write: 8 n bytes), the same run's ceiling."""
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _pass_fns(numels, device, dtype) -> tuple[dict, list]:
    """The timed callables of each group over one shape (optimizers warmed up), and what holds them."""
    from ...plan import ZeroBuffers

    fns, keep = {}, []
    for base, cls, kw in (("sgd", torch.optim.SGD, dict(momentum=0.9)), ("adamw", torch.optim.AdamW, dict(weight_decay=0.01))):
        params = _params(numels, device, dtype, seed=1)
        opt = FusedSAM(params, cls, rho=1e-6, lr=1e-6, backend="triton", **kw)
        for _ in range(2):
            opt.first_step()
            opt.second_step()
        be, plan = opt._backend, opt._step_plan()
        launches = be._update_launches("sgd" if base == "sgd" else "adam", True, plan)
        keep += [params, opt]

        def update(be=be, launches=launches):
            for bucket, u in launches:
                be.launch_update(bucket, u, None)

        fns[f"update {base}"] = update
        if base == "sgd":
            sq, norm = be._scalars(device)
            aux, out = ZeroBuffers(), be._dots_out(device)
            fns["norm"] = lambda be=be, plan=plan: be.launch_sq(plan.buckets, None, sq, norm, None)
            fns["perturb"] = lambda be=be, plan=plan: [be.launch_perturb(b, norm, None) for b in plan.buckets]
            fns["dots"] = lambda be=be, plan=plan: be.launch_dots(plan.buckets, aux, out, None)
    params = _params(numels, device, dtype, seed=3)
    mopt = MSAM(params, torch.optim.SGD, rho=1e-6, lr=1e-6, momentum=0.9, backend="triton")
    for _ in range(2):
        mopt.step()
    fns["msam step sgd"] = mopt.step
    keep += [params, mopt]
    return fns, keep


def _pass_tables(group_pass: str, cand: dict) -> dict:
    if group_pass == "msam":  # Momentum-SAM's step: its two passes under one candidate shape
        upd = dict(cand)
        if "grid" not in upd or upd.get("grid") == "chunks":
            upd.update(grid="persistent", programs=512)
        pert = {k: v for k, v in cand.items() if k not in ("grid", "programs", "per_sm")}
        if cand.get("grid") == "persistent" and "per_sm" in cand:
            pert.update(grid="persistent", per_sm=cand["per_sm"])
        return table_with({"msam_update": upd, "msam_perturb": pert})
    return table_with({group_pass: cand})


def sweep(device: torch.device, dtype=torch.float32, warmup: int = 3, reps: int = 15, log=print,
          max_candidates: int | None = None, tiny: bool = False, done=None) -> list[dict]:
    """One row per (shape, group, candidate): median ms and quartiles, and the same for the copy
    of the same shape's size taken in turn with it. ``done(rows)`` after each shape (the caller
    writes what it has, so that a time cap leaves the finished shapes)."""
    rows = []
    cands = candidate_dicts()
    cands["msam"] = cands["msam_perturb"]
    if max_candidates:
        cands = {k: v[:max_candidates] for k, v in cands.items()}
    elem = torch.tensor([], dtype=dtype).element_size()
    for label, numels in shapes(device, tiny):
        n = sum(numels)
        fns, keep = _pass_fns(numels, device, dtype)
        copy = _copy_fn(device, n * elem // 4)
        for group, pass_name, elements in GROUPS:
            for cand in cands[pass_name]:
                with launch.use(_pass_tables(pass_name, cand)):
                    t0 = time.perf_counter()
                    fns[group]()  # compiled, cached
                    sync(device)
                    compile_s = time.perf_counter() - t0
                    times = time_ms({"copy": copy, group: fns[group]}, device, warmup, reps)
                ms, copy_ms = median(times[group]), median(times["copy"])
                q1, q3 = quartiles(times[group])
                c1, c3 = quartiles(times["copy"])
                gbs = elements * elem * n / (ms * 1e-3) / 1e9
                copy_gbs = 2 * elem * n / (copy_ms * 1e-3) / 1e9
                cfg = launch.parse_config(cand, "candidate", "msam_perturb" if pass_name == "msam" else pass_name)
                row = dict(shape=label, params=n, tensors=len(numels), group=group, pass_name=pass_name,
                           config=cand, label=cfg.label(), median_ms=ms, q1_ms=q1, q3_ms=q3, copy_median_ms=copy_ms,
                           copy_q1_ms=c1, copy_q3_ms=c3, gbs=gbs, copy_gbs=copy_gbs, fraction_of_copy=gbs / copy_gbs,
                           first_call_s=compile_s, size_class=launch.table().size_class(n))
                rows.append(row)
                log(f"{label:12s} {n / 1e6:8.1f}M {group:14s} {cfg.label():44s} {ms:8.3f} ms "
                    f"[{q1:.3f}, {q3:.3f}]  copy {copy_ms:.3f} ms  {100 * row['fraction_of_copy']:5.1f}% of copy")
        fns = keep = copy = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if done is not None:
            done(rows)
    return rows


def winners(rows: list[dict], gpu: str) -> dict:
    """The winning table: per pass and size class, the candidate with the best geometric mean of
    its fraction of the copy over that class's shapes (and over the groups of that pass)."""
    score: dict = {}
    for r in rows:
        key = (r["pass_name"], r["size_class"], json.dumps(r["config"], sort_keys=True))
        score.setdefault(key, []).append(math.log(max(r["fraction_of_copy"], 1e-9)))
    best: dict = {}
    for (p, cls, cfg), logs in score.items():
        value = sum(logs) / len(logs)
        if (p, cls) not in best or value > best[(p, cls)][0]:
            best[(p, cls)] = (value, json.loads(cfg))
    data = default_table_json()
    entry: dict = {}
    for (p, cls), (_, cfg) in sorted(best.items()):
        if p == "msam":
            tables = _pass_tables("msam", cfg)["gpus"]["default"]["passes"]
            for q in ("msam_update", "msam_perturb"):
                entry.setdefault(q, {})[cls] = tables[q]["*"]
        else:
            entry.setdefault(p, {})[cls] = cfg
    data["gpus"] = {"default": data["gpus"]["default"], gpu: {"passes": entry}}
    data.pop("notes", None)
    launch.Table(data, "the sweep's winning table")  # validates
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for sweep.json and launch_configs.json")
    ap.add_argument("--reps", type=int, default=3 if REHEARSAL else 10)
    ap.add_argument("--warmup", type=int, default=1 if REHEARSAL else 3)
    ap.add_argument("--max-candidates", type=int, default=None, help="the first N candidates of each pass")
    ap.add_argument("--tiny", action="store_true", help="one small mix only (the rehearsal's test)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = launch.gpu_name(device) or "cpu-rehearsal"
    args.out.mkdir(parents=True, exist_ok=True)

    def write(rows):
        (args.out / "sweep.json").write_text(json.dumps(dict(gpu=gpu, rehearsal=REHEARSAL, rows=rows), indent=1))
        (args.out / "launch_configs.json").write_text(json.dumps(winners(rows, gpu), indent=1) + "\n")

    rows = sweep(device, warmup=args.warmup, reps=args.reps, max_candidates=args.max_candidates, tiny=args.tiny,
                 done=write)
    table = winners(rows, gpu)
    print(f"winning table for {gpu!r}: {args.out / 'launch_configs.json'}")
    for p, per in table["gpus"][gpu]["passes"].items():
        for cls, cfg in per.items():
            print(f"  {p:14s} {cls:7s} {launch.parse_config(cfg, 'w', p).label()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
