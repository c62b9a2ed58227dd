"""Does Frob-SAM flatten the Hessian? SGD against Frob-SAM at several lam, over several seeds.

    python benchmarks/frob_experiment.py [--seeds 5] [--epochs 100] [--json PATH]

Same data, model and training loop as ``sam-fused compare`` (digits, 20% flipped labels, MLP),
SGD-momentum base, Frob-SAM with the paper's rho = 0.005 and n = 2. After training: test accuracy,
training loss, and the squared Frobenius norm of the training-loss Hessian (Hutchinson, 30
probes, with its standard error). A run whose loss is not finite at the end counts as diverged.
Every seed given is reported; none is left out.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from sam_fused import __version__
from sam_fused.tools.compare import evaluate, load_digits_split, make_optimizer, mlp, train
from sam_fused.tools.sharpness import hessian_frobenius

LAMS = (0.001, 0.005, 0.02, 0.1, 0.5)


def run_one(name: str, lam: float | None, seed: int, epochs: int) -> dict:
    x_tr, y_tr, _, x_te, y_te = load_digits_split(0.2, seed)
    model = mlp(128, seed)
    args = SimpleNamespace(lr=0.05, rho=0.05, asam_rho=0.5, lam=lam, seed=seed)
    opt = make_optimizer(name, model.parameters(), args)
    t0 = time.perf_counter()
    train(model, opt, x_tr, y_tr, epochs, 64, seed)
    wall = time.perf_counter() - t0
    tr_loss, _ = evaluate(model, x_tr, y_tr)
    te_loss, te_acc = evaluate(model, x_te, y_te)
    out = dict(optimizer=name, lam=lam, seed=seed, train_loss=tr_loss, test_loss=te_loss, test_acc=te_acc,
               seconds=wall, diverged=not math.isfinite(tr_loss))
    if not out["diverged"]:
        fro = hessian_frobenius(model, F.cross_entropy, [(x_tr, y_tr)], num_probes=30, seed=seed)
        out.update(frobenius_sq=fro.value, frobenius_sq_stderr=fro.stderr)
    return out


def summarize(rows: list[dict]) -> str:
    lines = [f"{'optimizer':10s} {'lam':>6s} {'diverged':>8s} {'test acc':>15s} {'train loss':>15s} {'||H||_F^2':>19s}"]
    keys = list(dict.fromkeys((r["optimizer"], r["lam"]) for r in rows))
    for name, lam in keys:
        rs = [r for r in rows if (r["optimizer"], r["lam"]) == (name, lam)]
        ok = [r for r in rs if not r["diverged"]]

        def ms(key, fmt):
            vals = [r[key] for r in ok]
            if not vals:
                return "-"
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):{fmt}} +- {sd:{fmt}}"

        lines.append(f"{name:10s} {'' if lam is None else lam:>6} {len(rs) - len(ok):>4d}/{len(rs):<3d} "
                     f"{ms('test_acc', '.3f'):>15s} {ms('train_loss', '.3f'):>15s} {ms('frobenius_sq', '.1f'):>19s}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    configs = [("sgd", None)] + [("frob", lam) for lam in LAMS]
    for i, (name, lam) in enumerate(configs):
        for seed in range(args.seeds):
            print(f"[{i * args.seeds + seed + 1}/{len(configs) * args.seeds}] {name} lam={lam} seed={seed}",
                  file=sys.stderr)
            rows.append(run_one(name, lam, seed, args.epochs))
    print(summarize(rows))
    if args.json:
        args.json.write_text(json.dumps(dict(
            date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), sam_fused=__version__,
            torch=torch.__version__, epochs=args.epochs, rho=0.005, n_samples=2, rows=rows), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
