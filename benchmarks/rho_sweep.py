"""A short radius sweep on the tasks of ``sam-fused compare``: train and test accuracy only (no
Hessian, no landscape), so that a grid of radii per task fits in minutes. Trains exactly as
``compare`` does (its data, models, bases, optimizers and training loop).

    python benchmarks/rho_sweep.py --task images --seeds 0 --sam 0.005,0.01,0.02,0.05 \
        --asam 0.05,0.1,0.2,0.5 --msam 0.1,0.3,1,3 --out benchmarks/results/rho-sweep-images.json

Each line printed: task, method, radius, seed, rho / ||w|| at the initialization, train and test
accuracy, seconds. The JSON holds the same rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from argparse import Namespace

import torch

from sam_fused import MSAM
from sam_fused.tools import compare
from sam_fused.tools.tasks import TASKS


def floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--seeds", default="0")
    p.add_argument("--sam", type=floats, default=[])
    p.add_argument("--asam", type=floats, default=[])
    p.add_argument("--msam", type=floats, default=[])
    p.add_argument("--others", default="", help="comma-separated family methods run at each --sam value")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        args = Namespace(task=a.task, noise=0.2, width=128, epochs=a.epochs, batch_size=None, lr=None, rho=None,
                         train_size=None, test_size=None, hessian_samples=None, probes=None, seed=seed,
                         asam_rho=None, msam_rho=None, gsam_alpha=0.4, looksam_k=5, looksam_alpha=0.7, lam=None)
        compare.resolve(args)
        x_tr, y_tr, y_clean, x_te, y_te = compare._data(args, seed)
        runs = [("sgd", None)] + [("sam", r) for r in a.sam] + [("asam", r) for r in a.asam]
        runs += [("msam", r) for r in a.msam]
        runs += [(o, r) for o in a.others.split(",") if o for r in a.sam]
        for name, rho in runs:
            model = compare._model(args, seed)
            norm = float(torch.sqrt(sum((q.detach().double() ** 2).sum() for q in model.parameters())))
            if name == "asam":
                args.asam_rho = rho
            if name == "msam":
                args.msam_rho = rho
            opt = compare.make_optimizer(name, model.parameters(), args, seed, rho if name != "sgd" else None)
            t0 = time.perf_counter()
            compare.train(model, opt, x_tr, y_tr, args.epochs, args.batch_size, seed)
            wall = time.perf_counter() - t0
            if isinstance(opt, MSAM):
                opt.restore()
            _, tr = compare.evaluate(model, x_tr, y_tr)
            _, te = compare.evaluate(model, x_te, y_te)
            row = dict(task=a.task, method=name, rho=rho, seed=seed, rho_over_w=(rho or 0.0) / norm,
                       train_acc=tr, test_acc=te, seconds=wall, epochs=args.epochs)
            rows.append(row)
            print(f"{a.task:10s} {name:8s} rho {rho if rho is not None else '-':>6} seed {seed} "
                  f"rho/||w|| {row['rho_over_w']:.4f}  train {tr:.3f}  test {te:.3f}  {wall:.0f} s", flush=True)
            if a.out:
                with open(a.out, "w") as f:
                    json.dump(dict(command=" ".join(sys.argv), rows=rows, threads=a.threads,
                                   torch=torch.__version__), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
