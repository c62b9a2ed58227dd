"""Static GPU checks, on this machine, with or without a GPU (tests/gpu_compile_check.py): every
Triton kernel variant compiles for NVIDIA GPUs, with no register spills, 128-bit global accesses
in the aligned element loops, fp64 only in the norm's sums, and its register count recorded. The
CPU interpreter cannot catch what only the GPU compiler reports.

`make test` compiles a covering subset (one variant of each kernel family and update kind, bf16,
fp16, AMP, the unaligned path, GSAM/LookSAM's combine) for sm_90, and the heaviest passes for
sm_80, sm_89 and sm_100;
`make test-full` every variant for sm_90; `make gpu-static` prints the register/occupancy table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HAS_TRITON, full_matrix

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], shards: int, tmp_path: Path) -> list[dict]:
    """The check script in ``shards`` processes (the compiler is single-threaded); its rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's sam_fused
    script = Path(__file__).with_name("gpu_compile_check.py")
    procs = [subprocess.Popen([sys.executable, str(script), *args, "--shard", f"{k}/{shards}", "--json",
                               str(tmp_path / f"rows{k}.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for k in range(shards)]
    outs = [p.communicate(timeout=900) for p in procs]
    rows = []
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0 and "ptxas" in err and "not found" in err.lower():
            pytest.skip("Triton's ptxas is not available here")
        assert p.returncode == 0, (out + err)[-4000:]
        assert "compiled" in out
    for k in range(shards):
        rows += json.loads((tmp_path / f"rows{k}.json").read_text())["rows"]
    return rows


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_kernels_compile_clean_for_every_arch(request, tmp_path):
    shards = max(2, min(4, os.cpu_count() or 1))
    full = full_matrix(request.config)
    rows = _run([] if full else ["--quick"], shards, tmp_path)
    assert not [r for r in rows if r["problems"]]
    if full:
        assert len(rows) >= 170, f"only {len(rows)} kernel variants compiled"
    else:
        assert 90 in {r["arch"] for r in rows} and len(rows) >= 18
    for r in rows:
        assert r["regs"] > 0 and 0 < r["occupancy"] <= 1  # recorded: the occupancy can be predicted
    families = {r["family"] for r in rows}
    assert {"norm", "perturb", "update", "dots", "msam_update", "msam_perturb", "usam_perturb",
            "usam_accumulate"} <= families
    aligned32 = [r for r in rows if r.get("want_bits") == 128]
    assert aligned32 and all(r["ld_bits"] == 128 for r in aligned32)
