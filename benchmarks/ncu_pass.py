"""One pass of the fused step on 64M fp32 parameters under one launch configuration, for Nsight
Compute: ``ncu ... python benchmarks/ncu_pass.py GROUP CONFIG_JSON`` (GROUP as in the sweep:
norm, perturb, update sgd, update adamw, dots, msam step sgd). Warm-up calls first (compiled,
state made), then one call between cudaProfilerStart/Stop (ncu --profile-from-start off)."""

import json
import sys

import torch

from sam_fused.kernels import launch
from sam_fused.tools.bench import sweep

group, cfg = sys.argv[1], json.loads(sys.argv[2])
pass_name = dict((g, p) for g, p, _ in sweep.GROUPS)[group]
n = int(float(sys.argv[3])) if len(sys.argv) > 3 else 64_000_000
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: a dry run (interpreter)
cuda = device.type == "cuda"
with launch.use(sweep._pass_tables(pass_name, cfg)):
    fns, keep = sweep._pass_fns([n], device, torch.float32)
    for _ in range(3):
        fns[group]()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()  # ncu --profile-from-start off: only this call's launches
    fns[group]()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
print("done", group, launch.parse_config(cfg, "ncu", "msam_perturb" if pass_name == "msam" else pass_name).label())
