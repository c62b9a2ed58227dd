"""The device script's sweep rehearsed on the CPU (interpreted Triton, a tiny mix, two candidates
per pass): it writes its rows and a winning table that the loader accepts, so that on a GPU only
the GPU is new. The whole script's rehearsal: ``SAM_FUSED_REHEARSAL=1 bash benchmarks/gpu_run.sh``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HAS_TRITON
from sam_fused.kernels import launch

ROOT = Path(__file__).resolve().parents[1]


def test_device_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_run.sh")], check=True)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_sweep_rehearsal_writes_a_loadable_winning_table(tmp_path):
    env = dict(os.environ, SAM_FUSED_REHEARSAL="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not env.get("CUDA_VISIBLE_DEVICES") and "TRITON_INTERPRET" not in env:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-m", "sam_fused.tools.bench.sweep", "--out", str(tmp_path), "--tiny",
                          "--max-candidates", "2", "--reps", "1", "--warmup", "0"], capture_output=True, text=True,
                         env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    data = json.loads((tmp_path / "sweep.json").read_text())
    groups = {r["group"] for r in data["rows"]}
    assert groups == {"norm", "perturb", "update sgd", "update adamw", "dots", "msam step sgd"}
    for r in data["rows"]:
        assert r["median_ms"] > 0 and r["copy_median_ms"] > 0 and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
    table = launch.load(tmp_path / "launch_configs.json")
    gpu = data["gpu"]
    assert gpu in table.entries and set(table.entries[gpu]) == {"norm", "perturb", "update", "dots", "msam_update",
                                                                 "msam_perturb"}
