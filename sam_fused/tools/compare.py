"""``sam-fused compare``: SGD and the SAM family trained alike, with sharpness measured, on four
classification tasks (``--task``): scikit-learn's handwritten digits with noisy labels and an
MLP (the default), and, as in the study this project follows, a Wide ResNet on images, a
transformer encoder on heartbeat-like time series and a GCN on molecule-like graphs (data sets
made in the package: ``sam_fused.tools.tasks``). Each task has its base optimizer (SGD with momentum, or Adam for the
graphs) and its default radii for SAM (and the family that takes ``--rho``), ASAM and
Momentum-SAM, chosen from a short sweep on that task (benchmarks/NOTES.md, "Default radii"): the
study's radii (images 2, timeseries 1) and Momentum-SAM's published 3 stop these small models from
training. ``--rho 0.05,0.5,1,2`` sweeps SAM's radius. Every row, verdict and picture names its
radius ("sam (rho 0.05)"); a run whose training accuracy collapses against SGD's (below SGD's by
more than half the distance to chance, or at chance: the majority class's share of the training
labels) is called "collapsed" in a warning line, the table and the pictures (its Hessian is that
of a model that learned nothing, not a flat minimum), and so is a radius above 0.1 of the
weights' norm at the first step (the optimizers' LargePerturbationWarning).

Every figure is measured over several seeds (default 5: the data, the label noise, the
initialization and the batch order all change with the seed) and reported as the mean and the
standard deviation over the seeds: train/test loss and accuracy (train accuracy on the labels it
was given), the generalization gap, the Hessian of the training loss at both ends of its spectrum
(``lambda_max``, ``lambda_min`` and ``|lambda_max / lambda_min|`` by Lanczos; ``lambda_1`` and
``lambda_1 / lambda_5`` by ARPACK on digits, from the same Lanczos run on the other tasks), its
trace (Hutchinson), and the wall time; the Hessian figures use a fixed subset of the training set
for the larger tasks. A run is deterministic for a given
seed and thread count. For the first seed it saves 1-D and 2-D loss landscapes along
filter-normalized directions and the Hessian spectral densities; the JSON holds every figure of
every seed.

``--task text`` trains a byte-level causal transformer language model on the standard library's
own .py sources (split by file; ``sam_fused.tools.text``) with AdamW and, over AdamW, SAM, SAM
with the preconditioned perturbation (psam), Functional-SAM plain and preconditioned (fsam,
fsam-p), Momentum-SAM and SAM on the last 25% of the steps (sam-phase), for ``--steps`` steps
each, and reports per seed the validation loss in bits per byte at equal steps and at equal
forward/backward count (from the same run, at the step where the method's passes reach AdamW's
total: the halfway step for two passes per step), the loss with 4-bit weights (round-to-nearest,
per output channel) and its increase, and the training throughput relative to AdamW; each method
against AdamW seed by seed by the same paired t-test. No Hessian figures or pictures: the JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import GSAM, MSAM, FusedSAM, LookSAM, UniversalSAM, __version__
from . import args as checks
from . import text
from .common import busy_note, cpu_count, cpu_name, load, plain
from .tasks import TASKS, digits_data

OPTIMIZERS = ("sgd", "sam", "asam", "interval", "rst", "gsam", "looksam", "msam", "frob", "trace", "det")
DEFAULT_OPTIMIZERS = ("sgd", "sam", "asam")


def _defaults(key: str) -> str:
    tasks = [*TASKS.values(), text.TEXT]
    return ", ".join(f"{task.name} {getattr(task, key):g}" for task in tasks if hasattr(task, key))


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="train SGD and the SAM family on a task (digits, images, time series, graphs); "
                                       "measure sharpness; or AdamW and SAM on a byte-level language model (text)",
                       description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted([*TASKS, "text"]), default="digits",
                   help="digits (MLP, default), images (Wide ResNet), timeseries (transformer encoder), graphs (GCN), "
                        "text (byte-level transformer language model on the standard library's sources)")
    p.add_argument("--optimizer", action="append", choices=OPTIMIZERS + text.OPTIMIZERS, metavar="NAME",
                   help="optimizer to train, repeatable. The classification tasks: " + ", ".join(OPTIMIZERS) + " "
                        "(default: " + ", ".join(DEFAULT_OPTIMIZERS) + "); "
                        "sgd is the task's base (SGD-momentum, or Adam for graphs), the others wrap it; "
                        "interval: SAM every 5th step; rst: SAM with probability 0.5; gsam: GSAM (--gsam-alpha); "
                        "looksam: LookSAM (--looksam-k, --looksam-alpha); all with --rho; msam: Momentum-SAM "
                        "(--msam-rho; evaluated at the unperturbed weights); "
                        "frob, trace and det are Frob-SAM, Trace-SAM and Det-SAM with the paper's rho. "
                        "--task text: " + ", ".join(text.OPTIMIZERS) + " (default: all seven); over AdamW, "
                        "sam-adamw is SAM, psam SAM with the preconditioned perturbation, fsam and fsam-p "
                        "Functional-SAM, plain and preconditioned, sam-phase SAM on the last 25%% of the steps, all "
                        "with --rho; msam-adamw is Momentum-SAM (--msam-rho)")
    p.add_argument("--noise", type=checks.probability, default=0.2,
                   help="digits: fraction of training labels flipped, in [0, 1) (default: 0.2)")
    p.add_argument("--epochs", type=checks.positive_int, default=None,
                   help="training epochs (default: the task's; digits 100; text: --steps)")
    p.add_argument("--steps", type=checks.int_at_least(4), default=None,
                   help=f"text: optimizer steps of every method, at least 4 (default: {text.TEXT.steps})")
    p.add_argument("--batch-size", type=checks.positive_int, default=None,
                   help=f"batch size (default: the task's, 64; text: {text.TEXT.batch_size} windows)")
    p.add_argument("--lr", type=checks.finite_positive_float, default=None,
                   help=f"learning rate of the base (default: the task's; digits 0.05; text {text.TEXT.lr:g})")
    p.add_argument("--context", type=checks.int_at_least(2), default=None,
                   help=f"text: bytes of context (default: {text.TEXT.context})")
    p.add_argument("--d-model", type=checks.positive_int, default=None,
                   help=f"text: width of the transformer (default: {text.TEXT.d_model})")
    p.add_argument("--layers", type=checks.positive_int, default=None,
                   help=f"text: transformer blocks (default: {text.TEXT.layers})")
    p.add_argument("--heads", type=checks.positive_int, default=None,
                   help=f"text: attention heads, a divisor of --d-model (default: {text.TEXT.heads})")
    p.add_argument("--rho", type=_rhos, default=None,
                   help="SAM's rho, or several comma-separated (a sweep: each value is its own run of every "
                        "optimizer that takes --rho, named e.g. sam@0.5) (default: the task's: "
                        + _defaults("rho") + "; the study's best, images 2 and timeseries 1, stop these "
                        "small models from training)")
    p.add_argument("--asam-rho", type=checks.finite_non_negative_float, default=None,
                   help="ASAM's rho (default: the task's: " + _defaults("asam_rho") + ")")
    p.add_argument("--gsam-alpha", type=checks.finite_non_negative_float, default=0.4,
                   help="GSAM's alpha (default: 0.4)")
    p.add_argument("--looksam-alpha", type=checks.finite_non_negative_float, default=0.7,
                   help="LookSAM's alpha (default: 0.7)")
    p.add_argument("--looksam-k", type=checks.positive_int, default=5,
                   help="LookSAM's k: a SAM step every k steps (default: 5)")
    p.add_argument("--msam-rho", type=checks.finite_non_negative_float, default=None,
                   help="Momentum-SAM's rho (default: the task's: " + _defaults("msam_rho") + "; the authors' 3.0, "
                        "for ResNets and ViTs on CIFAR-100 and ImageNet, is 0.12-0.32 of these models' weight norm; "
                        "it stopped the transformer encoder from training)")
    p.add_argument("--lam", type=checks.finite_non_negative_float, default=None,
                   help="lam of frob/trace/det (default: each class's default, e.g. Frob-SAM 0.005)")
    p.add_argument("--width", type=checks.positive_int, default=128,
                   help="digits: hidden width of the MLP (default: 128)")
    p.add_argument("--train-size", type=checks.positive_int, default=None,
                   help="training examples (default: the task's)")
    p.add_argument("--test-size", type=checks.positive_int, default=None, help="test examples (default: the task's)")
    p.add_argument("--hessian-samples", type=checks.non_negative_int, default=None,
                   help="training examples the Hessian figures and landscapes use, 0 for all (default: the task's; "
                        "digits: all)")
    p.add_argument("--lanczos-steps", type=checks.int_at_least(5), default=40,
                   help="Lanczos steps for lambda_max and lambda_min, and per probe of the spectral density, at "
                        "least 5 (default: 40)")
    p.add_argument("--probes", type=checks.positive_int, default=None,
                   help="Hutchinson probes for the trace (default: 50 on digits, 10 on the other tasks)")
    p.add_argument("--landscape-steps", type=checks.int_at_least(2), default=31,
                   help="points per landscape axis, at least 2 (default: 31)")
    p.add_argument("--seeds", type=checks.positive_int, default=5,
                   help="number of seeds, each a run of every optimizer (default: 5); figures are mean and "
                        "standard deviation over them")
    p.add_argument("--seed", type=checks.non_negative_int, default=0,
                   help="first seed of the data, the noise, the init and the batch order (default: 0)")
    p.add_argument("--threads", type=checks.positive_int, default=1,
                   help="CPU threads (default: 1: the figures then depend on the seed only)")
    p.add_argument("--out", type=Path, default=Path("sam-compare"), help="folder for the PNGs and JSON")
    p.set_defaults(func=run, check=check)


_rhos = checks.float_list(checks.finite_non_negative_float,
                          f"comma-separated finite non-negative numbers (at most {checks.LARGEST:g})")

# what a run writes into --out (the text task: the JSON only)
OUTPUTS = ("landscape_1d.png", "landscape_2d.png", "spectrum.png", "family.png", "compare.json")
TEXT_OUTPUTS = ("compare.json",)

# the options of the text task alone, and those of the classification tasks that it does not take
TEXT_ONLY = ("steps", "context", "d_model", "layers", "heads")
NOT_TEXT = ("noise", "epochs", "asam_rho", "gsam_alpha", "looksam_alpha", "looksam_k", "lam", "width", "train_size",
            "test_size", "hessian_samples", "lanczos_steps", "probes", "landscape_steps")


def check(args, parser) -> None:
    """The optimizers and options belong to the task (an option of another task given a value
    other than its default is refused), the text model's heads divide its width, and the output
    folder can take every file a run writes (it creates nothing): else argparse's error."""
    is_text = args.task == "text"
    own = text.OPTIMIZERS if is_text else OPTIMIZERS
    bad = [name for name in args.optimizer or () if name not in own]
    if bad:
        parser.error(f"argument --optimizer: {bad[0]!r} is not an optimizer of --task {args.task} (its optimizers: "
                     f"{', '.join(own)})")
    for dest in NOT_TEXT if is_text else TEXT_ONLY:
        if getattr(args, dest, None) != parser.get_default(dest):
            option = "--" + dest.replace("_", "-")
            why = ("an option of --task text only" if not is_text else
                   "not an option of --task text" + (" (it trains for --steps)" if dest == "epochs" else ""))
            parser.error(f"argument {option}: {why}")
    if is_text:
        d, heads = args.d_model or text.TEXT.d_model, args.heads or text.TEXT.heads
        if d % heads:
            parser.error(f"argument --heads: {heads} heads do not divide --d-model {d}")
    problem = checks.output_dir_problem(args.out, TEXT_OUTPUTS if is_text else OUTPUTS)
    if problem:
        parser.error(f"argument --out: {problem}")


# the optimizers whose radius is --rho (a sweep runs each once per value)
RHO_SWEPT = ("sam", "interval", "rst", "gsam", "looksam")


def load_digits_split(noise: float, seed: int, test_fraction: float = 0.4):
    """Standardized digits; (x_train, y_train_noisy, y_train_clean, x_test, y_test)."""
    return digits_data(seed, noise=noise)


def mlp(width: int, seed: int) -> nn.Module:
    from .tasks import mlp as make

    return make(seed, width)


def resolve(args) -> None:
    """Fill the options left to the task (``None``) from it, in place."""
    if getattr(args, "task", "digits") == "text":
        t = text.TEXT
        for key, value in (("steps", t.steps), ("batch_size", t.batch_size), ("lr", t.lr), ("rho", [t.rho]),
                           ("msam_rho", t.msam_rho), ("context", t.context), ("d_model", t.d_model),
                           ("layers", t.layers), ("heads", t.heads)):
            if getattr(args, key, None) is None:
                setattr(args, key, value)
        if isinstance(args.rho, (int, float)):
            args.rho = [float(args.rho)]
        return
    task = TASKS[getattr(args, "task", "digits")]
    for key, value in (("epochs", task.epochs), ("batch_size", task.batch_size), ("lr", task.lr),
                       ("rho", [task.rho]), ("asam_rho", task.asam_rho), ("msam_rho", task.msam_rho),
                       ("train_size", task.train_size), ("test_size", task.test_size),
                       ("hessian_samples", task.hessian_samples), ("probes", 50 if task.name == "digits" else 10)):
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if isinstance(args.rho, (int, float)):
        args.rho = [float(args.rho)]


def runs_of(names: list[str], rhos: list[float], swept: tuple = RHO_SWEPT) -> list[tuple[str, str, float | None]]:
    """(key, optimizer, rho) of every run: one per optimizer, and per rho for those that take --rho
    (``swept``) when several are given (keyed ``name@rho``: the keys of the JSON)."""
    out = []
    for name in names:
        if name in swept:
            for rho in rhos:
                out.append((f"{name}@{rho:g}" if len(rhos) > 1 else name, name, rho))
        else:
            out.append((name, name, None))
    return out


def _class_rho(cls) -> float:
    import inspect

    return inspect.signature(cls).parameters["rho"].default


def radius_of(name: str, args, rho: float | None = None) -> float | None:
    """The radius the run of ``name`` uses (``rho``: its --rho value), None for SGD."""
    if name in RHO_SWEPT:
        return rho if rho is not None else (args.rho[0] if isinstance(args.rho, list) else args.rho)
    if name == "asam":
        return args.asam_rho
    if name == "msam":
        return args.msam_rho
    if name in ("frob", "trace", "det"):
        from .. import DetSAM, FrobSAM, TraceSAM

        return _class_rho({"frob": FrobSAM, "trace": TraceSAM, "det": DetSAM}[name])
    return None


def label_of(name: str, rho: float | None, collapsed: str = "") -> str:
    """What the table, the verdicts and the pictures call a run: ``sam (rho 0.05)``, and
    ``, collapsed`` (or ``, collapsed in 2 of 5 seeds``) after it when it collapsed."""
    base = name.split("@")[0]
    text = base if rho is None else f"{base} (rho {rho:g}{', eta 0.01' if base == 'asam' else ''})"
    return f"{text}, {collapsed}" if collapsed else text


# a run "collapsed" when its training accuracy is within this of chance (the majority class's share
# of the training labels) or lost more than half of SGD's distance from chance
CHANCE_MARGIN = 0.02


def is_collapsed(train_acc: float, chance: float, sgd_train_acc: float | None = None) -> bool:
    """Whether a run's final training accuracy collapsed: at chance (within ``CHANCE_MARGIN``) or,
    given SGD's of the same seed, below it by more than half the distance from SGD's to chance."""
    if train_acc <= chance + CHANCE_MARGIN:
        return True
    return sgd_train_acc is not None and train_acc < sgd_train_acc - 0.5 * (sgd_train_acc - chance)


def collapses(per_seed: list[dict]) -> dict[str, list[bool]]:
    """Per run, seed by seed: :func:`is_collapsed` against SGD's run of the same seed (when there
    is one). SGD itself is judged against chance only."""
    out: dict[str, list[bool]] = {}
    for results in per_seed:
        sgd = results.get("sgd")
        for key, r in results.items():
            ref = sgd["train_acc"] if sgd is not None and key != "sgd" else None
            out.setdefault(key, []).append(is_collapsed(r["train_acc"], r["train_chance"], ref))
    return out


def collapse_word(flags: list[bool]) -> str:
    """"collapsed" (every seed), "collapsed in k of n seeds", or ""."""
    k = sum(flags)
    if not k:
        return ""
    return "collapsed" if k == len(flags) else f"collapsed in {k} of {len(flags)} seeds"


def make_optimizer(name: str, params, args, seed: int | None = None, rho: float | None = None):
    """The optimizer ``name`` over the task's base (SGD with momentum 0.9, or Adam; weight decay
    5e-4 either way); ``rho``: the radius of the optimizers that take --rho (default: its first value)."""
    task = TASKS[getattr(args, "task", "digits")]
    if task.base == "adam":
        cls, base = torch.optim.Adam, dict(lr=args.lr, weight_decay=5e-4)
    else:
        cls, base = torch.optim.SGD, dict(lr=args.lr, momentum=0.9, weight_decay=5e-4)
    if rho is None:
        rho = args.rho[0] if isinstance(args.rho, list) else args.rho
    if name == "sgd":
        return cls(params, **base)
    if name == "sam":
        return FusedSAM(params, cls, rho=rho, **base)
    if name == "interval":
        return FusedSAM(params, cls, rho=rho, interval=5, **base)
    if name == "rst":
        return FusedSAM(params, cls, rho=rho, sam_probability=0.5, seed=args.seed if seed is None else seed, **base)
    if name == "gsam":
        return GSAM(params, cls, rho=rho, alpha=getattr(args, "gsam_alpha", 0.4), **base)
    if name == "looksam":
        return LookSAM(params, cls, rho=rho, k=getattr(args, "looksam_k", 5), alpha=getattr(args, "looksam_alpha", 0.7),
                       **base)
    if name == "msam":
        msam_rho = getattr(args, "msam_rho", None)
        return MSAM(params, cls, rho=task.msam_rho if msam_rho is None else msam_rho, **base)
    if name == "asam":
        asam_rho = getattr(args, "asam_rho", None)
        return FusedSAM(params, cls, rho=task.asam_rho if asam_rho is None else asam_rho, adaptive=True, eta=0.01,
                        **base)
    if name in ("frob", "trace", "det"):
        lam = {} if getattr(args, "lam", None) is None else dict(lam=args.lam)
        return UniversalSAM(params, cls, measure=name, seed=args.seed if seed is None else seed, **lam, **base)
    raise ValueError(f"unknown optimizer {name!r}")


def train(model, opt, x, y, epochs: int, batch_size: int, seed: int) -> None:
    """``epochs`` passes over (x, y) in a seeded order. The closure calls at a perturbed point (SAM's
    second forward at w + e, Frob-SAM's samples) run with BatchNorm's running statistics frozen
    (``opt.freeze_running_stats(model)``): only the forward at w updates them."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    sam = isinstance(opt, (FusedSAM, UniversalSAM))
    if sam:
        opt.freeze_running_stats(model)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]

            def closure():
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            opt.zero_grad()
            if sam:
                opt.step(closure)
            else:
                closure()
                opt.step()


def evaluate(model, x, y) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(x)
        return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


FIGURES = ("train_loss", "train_acc", "train_acc_clean_labels", "test_loss", "test_acc", "gap_acc", "gap_loss",
           "lambda_max", "lambda_min", "lambda_max_over_min", "lambda_1", "lambda_1_over_5", "trace", "train_seconds")


def _model(args, seed: int) -> nn.Module:
    task = TASKS[getattr(args, "task", "digits")]
    return mlp(args.width, seed) if task.name == "digits" else task.model(seed)


def _data(args, seed: int):
    task = TASKS[getattr(args, "task", "digits")]
    if task.name == "digits":
        return digits_data(seed, args.train_size, args.test_size, noise=args.noise)
    return task.data(seed, args.train_size, args.test_size)


def hessian_batches(x, y, samples: int, batch: int = 256) -> list[tuple]:
    """The first ``samples`` training examples (all with 0) as the batches of the Hessian figures."""
    if samples:
        x, y = x[:samples], y[:samples]
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


def run_seed(names, args, seed: int, verbose_prefix: str = ""):
    """Train every run (optimizer, and rho in a sweep) with one seed; (figures per run, trained
    models, the Hessian's batches)."""
    import warnings

    from ..optim.base import LargePerturbationWarning
    from .sharpness import hessian_eigenvalues, hessian_extremes, hessian_trace

    resolve(args)
    x_tr, y_tr, y_clean, x_te, y_te = _data(args, seed)
    chance = float(torch.bincount(y_tr).max()) / len(y_tr)  # the majority class's share of the given labels
    train_data = hessian_batches(x_tr, y_tr, args.hessian_samples)
    results, models = {}, {}
    for label, name, rho in runs_of(names, args.rho):
        radius = radius_of(name, args, rho)
        print(f"{verbose_prefix}training {label_of(label, radius)} for {args.epochs} epochs ...", file=sys.stderr)
        model = _model(args, seed)
        opt = make_optimizer(name, model.parameters(), args, seed, rho)
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # compare says it once per run, after the table (perturbation_fraction)
            warnings.simplefilter("ignore", LargePerturbationWarning)
            train(model, opt, x_tr, y_tr, args.epochs, args.batch_size, seed)
        wall = time.perf_counter() - t0
        if isinstance(opt, MSAM):
            opt.restore()  # the end of training: evaluate w, not the perturbed point
        tr_loss, tr_acc = evaluate(model, x_tr, y_tr)
        _, tr_clean_acc = evaluate(model, x_tr, y_clean)
        te_loss, te_acc = evaluate(model, x_te, y_te)
        ends = hessian_extremes(model, F.cross_entropy, train_data, steps=args.lanczos_steps, seed=seed)
        if args.task == "digits":  # ARPACK to tol 1e-4, as the digits figures have always been taken
            top = hessian_eigenvalues(model, F.cross_entropy, train_data, k=5, tol=1e-4, seed=seed).eigenvalues
        else:  # the larger models: the five largest Ritz values of the same Lanczos run
            top = sorted(ends.ritz, reverse=True)[:5]
        trace = hessian_trace(model, F.cross_entropy, train_data, num_probes=args.probes, seed=seed)
        results[label] = dict(
            train_loss=tr_loss, train_acc=tr_acc, train_acc_clean_labels=tr_clean_acc, test_loss=te_loss,
            test_acc=te_acc, gap_acc=tr_acc - te_acc, gap_loss=te_loss - tr_loss,
            lambda_max=ends.lambda_max, lambda_min=ends.lambda_min, lambda_max_over_min=ends.ratio,
            lambda_1=top[0], lambda_1_over_5=top[0] / top[-1], eigenvalues=top,
            trace=trace.value, trace_stderr=trace.stderr, train_seconds=wall, rho=radius, train_chance=chance,
            perturbation_fraction=getattr(opt, "perturbation_fraction", None),
        )
        models[label] = model
    return results, models, train_data


def summarize(per_seed: list[dict], figures: tuple = FIGURES) -> dict:
    """Mean and standard deviation (n - 1) over the seeds of every figure, per optimizer."""
    out = {}
    for name in per_seed[0]:
        out[name] = {}
        for key in figures:
            values = np.array([r[name][key] for r in per_seed], dtype=float)
            out[name][key] = dict(mean=float(values.mean()), std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                                  values=values.tolist())
    return out


def run(args) -> int:
    if args.seeds < 1:
        raise SystemExit("--seeds must be at least 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # as it was: run() may be called in a process that goes on


def _build_native() -> None:
    """Build the native kernels first (it says so), so that the first seed's time, and the ETA, exclude it."""
    from .. import native

    if native.build_pending():
        try:
            native.load()
        except native.NativeUnavailable:
            pass  # the optimizers fall back to the reference backend


def _run(args) -> int:
    if args.task == "text":
        return _run_text(args)
    from .sharpness import hessian_spectrum, loss_landscape, plot_landscapes

    resolve(args)
    names = args.optimizer or list(DEFAULT_OPTIMIZERS)
    seeds = list(range(args.seed, args.seed + args.seeds))
    _build_native()
    per_seed, t_start, load_start = [], time.perf_counter(), load()
    for i, seed in enumerate(seeds):
        left = ""
        if i:
            left = f", about {(time.perf_counter() - t_start) / i * (len(seeds) - i):.0f} s left"
        results, models, train_data = run_seed(names, args, seed, f"[seed {seed}, {i + 1}/{len(seeds)}{left}] ")
        per_seed.append(results)
        if i == 0:
            first_models, first_data = models, train_data

    args.out.mkdir(parents=True, exist_ok=True)
    flags = collapses(per_seed)
    radii = {key: per_seed[0][key]["rho"] for key in per_seed[0]}
    labels = {key: label_of(key, radii[key], collapse_word(flags[key])) for key in per_seed[0]}
    # the pictures of the first seed: its own collapse
    first = {key: label_of(key, radii[key], "collapsed" if flags[key][0] else "") for key in per_seed[0]}
    steps = args.landscape_steps
    phase_start, n_models = time.perf_counter(), len(first_models)

    def phase(what: str, k: int, name: str) -> None:  # one line per model of the long phases
        print(f"      {what} (seed {seeds[0]}), {k + 1}/{n_models}: {first[name]} "
              f"[{time.perf_counter() - phase_start:.0f} s]", file=sys.stderr, flush=True)

    one, two = {}, {}
    for k, (n, m) in enumerate(first_models.items()):
        phase("1-D loss landscape", k, n)
        one[n] = loss_landscape(m, F.cross_entropy, first_data, dims=1, steps=steps, span=1.0, seed=seeds[0])
    for k, (n, m) in enumerate(first_models.items()):
        phase("2-D loss landscape", k, n)
        two[n] = loss_landscape(m, F.cross_entropy, first_data, dims=2, steps=max(steps // 2 + 1, 5), span=1.0,
                                seed=seeds[0])
    files = [plot_landscapes({first[n]: l for n, l in one.items()}, args.out / "landscape_1d.png"),
             plot_landscapes({first[n]: l for n, l in two.items()}, args.out / "landscape_2d.png")]
    spectra = {}
    for k, (n, m) in enumerate(first_models.items()):
        phase("Hessian spectrum", k, n)
        spectra[first[n]] = hessian_spectrum(m, F.cross_entropy, first_data, num_probes=2,
                                             lanczos_steps=args.lanczos_steps, seed=seeds[0])
    files.append(_plot_spectra(spectra, args.out / "spectrum.png"))

    summary = summarize(per_seed)
    load_end, cores = load(), cpu_count()
    busy = busy_note(load_start, load_end, cores)
    if "sgd" in summary and len(summary) > 1:
        command = getattr(args, "command_line", None) or "sam-fused compare (called as a function)"
        caption = (f"{command}\n{_radii(labels)}\nseeds {seeds[0]}-{seeds[-1]}; {cpu_name()}, "
                   f"{torch.get_num_threads()} thread(s), {_dt.date.today().isoformat()}")
        files.append(plot_family(summary, args.out / "family.png", caption, busy, labels=labels))
    print(_table(summary, args, seeds, busy, labels))
    print(_verdict(summary, labels))
    for line in warning_lines(per_seed, labels, flags):
        print(line)
    payload = dict(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), sam_fused=__version__,
        torch=torch.__version__, machine=cpu_name(), threads=torch.get_num_threads(), seeds=seeds,
        cores=cores, load_start=load_start, load_end=load_end, busy=busy,
        config=config_used(args, names), labels=labels,
        collapsed={key: [seeds[i] for i, f in enumerate(v) if f] for key, v in flags.items()},
        summary=summary, per_seed=per_seed,
        landscape_1d={n: dict(alphas=l.alphas.tolist(), losses=l.losses.tolist()) for n, l in one.items()},
    )
    (args.out / "compare.json").write_text(json.dumps(payload, indent=1))
    for f in files + [args.out / "compare.json"]:
        print(f"wrote {f}")
    return 0


def _radii(labels: dict) -> str:
    """The radii of a run, for a header or a caption: ``sam rho 0.05, asam rho 0.5 (eta 0.01)``."""
    parts = [label.split(", collapsed")[0] for key, label in labels.items() if "(rho" in label]
    return "radii: " + ("; ".join(parts) if parts else "none (SGD only)")


def warning_lines(per_seed: list[dict], labels: dict, flags: dict) -> list[str]:
    """One line per run that collapsed (training accuracy against SGD's and chance, seed by seed)
    and per run whose first perturbation was above ``LARGE_PERTURBATION`` of the weights' norm."""
    from ..optim.base import LARGE_PERTURBATION

    out = []
    for key, label in labels.items():
        label = label.split(", collapsed")[0]
        fractions = [r[key].get("perturbation_fraction") for r in per_seed]
        fractions = [f for f in fractions if f is not None]
        if fractions and max(fractions) > LARGE_PERTURBATION:
            out.append(f"warning: {label}: the first perturbation is {min(fractions):.3g}-{max(fractions):.3g} of the "
                       f"weights' norm (above {LARGE_PERTURBATION:g}): the gradient is taken that far from w; "
                       "a smaller radius may train better")
        if any(flags[key]):
            acc = [r[key]["train_acc"] for r in per_seed]
            chance = [r[key]["train_chance"] for r in per_seed]
            sgd = f", SGD's {np.mean([r['sgd']['train_acc'] for r in per_seed]):.3f}" if "sgd" in per_seed[0] else ""
            out.append(f"warning: {label}: training collapsed (train accuracy {np.mean(acc):.3f}{sgd}, chance "
                       f"{np.mean(chance):.3f}, the majority class): its Hessian figures and landscapes are those of a "
                       "model that learned little, not of a flat minimum; a smaller radius may train")
    return out


# the options every task and optimizer uses; the others only where named
COMMON_OPTIONS = ("task", "epochs", "batch_size", "lr", "train_size", "test_size", "hessian_samples", "lanczos_steps",
                  "probes", "landscape_steps", "seeds", "seed", "threads", "out", "command_line")
TASK_OPTIONS = {"digits": ("noise", "width")}
OPTIMIZER_OPTIONS = {"sam": ("rho",), "interval": ("rho",), "rst": ("rho",), "gsam": ("rho", "gsam_alpha"),
                     "looksam": ("rho", "looksam_k", "looksam_alpha"), "asam": ("asam_rho",), "msam": ("msam_rho",),
                     "frob": ("lam",), "trace": ("lam",), "det": ("lam",)}


def config_used(args, names: list[str]) -> dict:
    """The options of this run that its task and optimizers use (resolved), for the JSON."""
    keys = list(COMMON_OPTIONS) + list(TASK_OPTIONS.get(args.task, ()))
    for name in names:
        keys += [k for k in OPTIMIZER_OPTIONS.get(name, ()) if k not in keys]
    out = {"task": args.task, "optimizer": list(names)}
    for key in keys:
        if hasattr(args, key):
            value = getattr(args, key)
            out[key] = str(value) if isinstance(value, Path) else value
    return out


# ------------------------------------------------------------------------------------ the text task
# the figures of a text run (throughput_vs_adamw when AdamW ran), and the columns of its table
TEXT_FIGURES = ("val_bpb", "val_bpb_equal_compute", "val_bpb_4bit", "quant_increase", "steps_per_second",
                "throughput_vs_adamw", "train_seconds")
TEXT_OPTIONS = ("task", "steps", "batch_size", "lr", "context", "d_model", "layers", "heads", "seeds", "seed",
                "threads", "out", "command_line")
# the paired comparisons with AdamW: (name in the verdicts, figure)
TEXT_VERDICTS = (("equal steps", "val_bpb"), ("equal compute", "val_bpb_equal_compute"), ("4-bit", "val_bpb_4bit"),
                 ("4-bit increase", "quant_increase"))


def _run_text(args) -> int:
    """Every text run (optimizer, and rho in a sweep) over the seeds; the table, the verdicts
    against AdamW and compare.json."""
    resolve(args)
    names = args.optimizer or list(text.OPTIMIZERS)
    seeds = list(range(args.seed, args.seed + args.seeds))
    _build_native()
    data = text.corpus()
    runs = runs_of(names, args.rho, text.RHO_SWEPT)
    radii = {key: rho if name in text.RHO_SWEPT else args.msam_rho if name == "msam-adamw" else None
             for key, name, rho in runs}
    labels = {key: label_of(key, radii[key]) for key, _, _ in runs}
    per_seed, t_start, load_start = [], time.perf_counter(), load()
    for i, seed in enumerate(seeds):
        left = f", about {(time.perf_counter() - t_start) / i * (len(seeds) - i):.0f} s left" if i else ""
        results = {}
        for key, name, rho in runs:
            print(f"[seed {seed}, {i + 1}/{len(seeds)}{left}] training {labels[key]} for {args.steps} steps ...",
                  file=sys.stderr, flush=True)
            r = text.train_run(name, data, seed, args.steps, args.batch_size, args.lr,
                               args.rho[0] if rho is None else rho, args.msam_rho, args.context, args.d_model,
                               args.layers, args.heads)
            results[key] = dict(r, rho=radii[key])
        if "adamw" in results:  # measured in the same run, seed by seed
            for r in results.values():
                r["throughput_vs_adamw"] = r["steps_per_second"] / results["adamw"]["steps_per_second"]
        per_seed.append(results)
    summary = summarize(per_seed, tuple(f for f in TEXT_FIGURES if f in per_seed[0][runs[0][0]]))
    load_end, cores = load(), cpu_count()
    busy = busy_note(load_start, load_end, cores)
    params = sum(p.numel() for p in text.byte_lm(0, args.context, args.d_model, args.layers, args.heads).parameters())
    print(_text_table(summary, args, seeds, data, params, busy, labels))
    verdicts = text_verdicts(summary)
    print(_text_verdict_lines(summary, verdicts, labels))
    for line in warning_lines(per_seed, labels, {key: [False] * len(seeds) for key in labels}):
        print(line)
    config = {"task": "text", "optimizer": list(names)}
    keys = list(TEXT_OPTIONS) + (["rho"] if set(names) & set(text.RHO_SWEPT) else []) + (
        ["msam_rho"] if "msam-adamw" in names else [])
    for key in keys:
        if hasattr(args, key):
            value = getattr(args, key)
            config[key] = str(value) if isinstance(value, Path) else value
    config.update(weight_decay=text.TEXT.weight_decay, betas=[0.9, 0.95], phase=list(text.PHASE))
    payload = dict(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), sam_fused=__version__,
        torch=torch.__version__, python=sys.version, machine=cpu_name(), threads=torch.get_num_threads(), seeds=seeds,
        cores=cores, load_start=load_start, load_end=load_end, busy=busy, config=config, labels=labels,
        data=data.record(), model=dict(parameters=params, tied_head=True), units="bits per byte",
        summary=summary, verdicts=verdicts, per_seed=per_seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out / 'compare.json'}")
    return 0


def text_verdicts(summary: dict) -> dict:
    """Per method other than AdamW, per figure of ``TEXT_VERDICTS``: the paired differences to
    AdamW's seed by seed (mean, std, seeds lower) and :func:`verdict`; empty without AdamW."""
    if "adamw" not in summary:
        return {}
    out = {}
    for name, figs in summary.items():
        if name == "adamw":
            continue
        out[name] = {}
        for _, key in TEXT_VERDICTS:
            diff = np.array(figs[key]["values"]) - np.array(summary["adamw"][key]["values"])
            std = float(diff.std(ddof=1)) if diff.size > 1 else float("nan")
            out[name][key] = dict(mean=float(diff.mean()), std=std, lower=int((diff < 0).sum()), seeds=int(diff.size),
                                  verdict=verdict(diff))
    return out


def _text_verdict_lines(summary: dict, verdicts: dict, labels: dict) -> str:
    lines = []
    for name, figs in verdicts.items():
        lines.append(f"{labels.get(name, name)} - adamw, per seed (bits per byte, lower is better; paired t-test, "
                     "95%):")
        for what, key in TEXT_VERDICTS:
            v = figs[key]
            word = v["verdict"] if v["verdict"] == "within the seed spread" else f"{v['verdict']} AdamW"
            lines.append(f"    {what:<15} {v['mean']:+.4f} +- {v['std']:.4f} ({v['lower']} of {v['seeds']} seeds "
                         f"lower): {word}")
    return "\n".join(lines)


def _text_table(summary: dict, args, seeds: list[int], data, params: int, busy: str | None, labels: dict) -> str:
    mark = " (!)" if busy else ""
    cols = [("val bpb", "val_bpb", 4), ("val bpb, = compute", "val_bpb_equal_compute", 4),
            ("4-bit bpb", "val_bpb_4bit", 4), ("4-bit increase", "quant_increase", 4),
            ("steps/s / AdamW's" + mark, "throughput_vs_adamw", 2), ("time s" + mark, "train_seconds", 1)]
    cols = [c for c in cols if c[1] in next(iter(summary.values()))]
    cell = lambda f, d: f"{f['mean']:.{d}f} +- {f['std']:.{d}f}"  # noqa: E731
    rows = [[labels.get(name, name)] + [cell(figs[key], d) for _, key, d in cols] for name, figs in summary.items()]
    rec = data.record()
    head = (f"text: byte-level transformer (context {args.context}, d_model {args.d_model}, {args.layers} layers, "
            f"{args.heads} heads, {params} parameters) on the {rec['files']} .py files of Python "
            f"{sys.version.split()[0]}'s standard library ({rec['train_bytes']} / {rec['val_bytes']} bytes, split by "
            f"file), AdamW base, {args.steps} steps of {args.batch_size} windows, lr {args.lr:g}; validation loss in "
            f"bits per byte (= compute: at AdamW's forward/backward count); seeds {seeds[0]}..{seeds[-1]} (mean +- "
            f"standard deviation over {len(seeds)} seeds), {torch.get_num_threads()} thread(s); {_radii(labels)}")
    out = [head] + _grid(["optimizer"] + [c[0] for c in cols], rows)
    if busy:
        out.append(f"(!) {busy}: the times and the throughput relative to AdamW are doubtful")
    return "\n".join(out)


def verdict(diffs) -> str:
    """The one rule by which a difference over seeds is called (here and in the README): paired
    differences (same split, labels, initialization and batch order per seed) whose mean lies
    beyond the 95% confidence interval of a paired t-test, |mean| > t(0.975, n-1) * std / sqrt(n),
    are "above" or "below"; anything else is "within the seed spread", so is any single seed. With
    5 seeds the bound is 1.24 standard deviations: +0.009 +- 0.009 is within, +0.024 +- 0.015 above."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return "within the seed spread"
    bound = float(stats.t.ppf(0.975, d.size - 1)) * float(d.std(ddof=1)) / math.sqrt(d.size)
    mean = float(d.mean())
    return "above" if mean > bound else "below" if mean < -bound else "within the seed spread"


def _verdict(summary: dict, labels: dict | None = None) -> str:
    """Each SAM variant against SGD, seed by seed: the mean of the per-seed differences of test
    accuracy, their standard deviation and :func:`verdict`; ``labels``: the runs' names."""
    labels = labels or {}
    if "sgd" not in summary:
        return ""
    sgd = np.array(summary["sgd"]["test_acc"]["values"])
    lines = []
    for name, figs in summary.items():
        if name == "sgd":
            continue
        diff = np.array(figs["test_acc"]["values"]) - sgd
        mean, std = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else float("nan")
        word = verdict(diff)
        word = f"{word} SGD (paired t-test, 95%)" if word != "within the seed spread" else f"{word} (paired t-test, 95%)"
        lines.append(f"{labels.get(name, name)} - sgd, test accuracy per seed: {mean:+.3f} +- {std:.3f} "
                     f"({int((diff > 0).sum())} of {len(diff)} seeds higher): {word}")
    return "\n".join(lines)


def _table(summary: dict, args, seeds: list[int], busy: str | None = None, labels: dict | None = None) -> str:
    cols = [("train loss", "train_loss", 4), ("train acc", "train_acc", 3), ("test loss", "test_loss", 4),
            ("test acc", "test_acc", 3), ("gap (acc)", "gap_acc", 3), ("lambda_max", "lambda_max", 2),
            ("lambda_min", "lambda_min", 3), ("|max/min|", "lambda_max_over_min", 1), ("l1/l5", "lambda_1_over_5", 2),
            ("trace", "trace", 1), ("time s" + (" (!)" if busy else ""), "train_seconds", 1)]
    cell = lambda f, d: f"{f['mean']:.{d}f} +- {f['std']:.{d}f}"  # noqa: E731
    labels = labels or {}
    rows = [[labels.get(name, name)] + [cell(figs[key], d) for _, key, d in cols] for name, figs in summary.items()]
    headers = ["optimizer"] + [c[0] for c in cols]
    task = TASKS[getattr(args, "task", "digits")]
    what = (f"digits, {args.noise:.0%} of training labels flipped, MLP width {args.width}" if task.name == "digits"
            else f"{task.name}: {task.describe} ({args.train_size} / {args.test_size} examples)")
    hess = f"Hessian on {args.hessian_samples} training examples" if args.hessian_samples else "Hessian on the training set"
    head = (f"{what}, {task.base} base, {args.epochs} epochs, {hess}, "
            f"seeds {seeds[0]}..{seeds[-1]} (mean +- standard deviation over {len(seeds)} seeds), "
            f"{torch.get_num_threads()} thread(s); {_radii(labels or {})}")
    out = [head] + _grid(headers, rows)
    if busy:
        out.append(f"(!) {busy}: the times and the throughput relative to SGD are doubtful")
    return "\n".join(out)


def _grid(headers: list[str], rows: list[list[str]]) -> list[str]:
    """The header line, a rule and the rows: the first column left-aligned, the others right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    out = [line, "-" * len(line)]
    return out + ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]


def family_points(summary: dict) -> dict:
    """Per method other than SGD, seed by seed against SGD: the test-accuracy gain (mean, std and
    :func:`verdict`) and the training throughput relative to SGD (SGD's training time over the
    method's: median, min and max over the seeds), both measured in the same run."""
    sgd_acc = np.array(summary["sgd"]["test_acc"]["values"])
    sgd_time = np.array(summary["sgd"]["train_seconds"]["values"])
    out = {}
    for name, figs in summary.items():
        if name == "sgd":
            continue
        gain = np.array(figs["test_acc"]["values"]) - sgd_acc
        speed = sgd_time / np.array(figs["train_seconds"]["values"])
        out[name] = dict(gain=float(gain.mean()), gain_std=float(gain.std(ddof=1)) if gain.size > 1 else 0.0,
                         verdict=verdict(gain), speed=float(np.median(speed)), speed_min=float(speed.min()),
                         speed_max=float(speed.max()))
    return out


def plot_family(summary: dict, path: Path, caption: str, busy: str | None = None, labels: dict | None = None) -> Path:
    """One point per method: accuracy gain over SGD (mean +- std over seeds) against training
    throughput relative to SGD (median, bars from the slowest to the fastest seed); ``busy`` (a
    busy machine's note) is written across the plot; ``labels``: the methods' names (with their
    radius, and "collapsed")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = family_points(summary)
    labels = labels or {}
    fig, ax = plt.subplots(figsize=(6.8, 4.8))
    for key, pt in points.items():
        name = labels.get(key, key)
        ax.errorbar(pt["speed"], pt["gain"], yerr=pt["gain_std"],
                    xerr=[[pt["speed"] - pt["speed_min"]], [pt["speed_max"] - pt["speed"]]], fmt="o", capsize=3,
                    label=f"{name} ({pt['verdict']})")
        ax.annotate(name, (pt["speed"], pt["gain"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.axvline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("training throughput relative to SGD (SGD = 1)")
    ax.set_ylabel("test accuracy - SGD's, paired by seed")
    ax.set_title("Which SAM: accuracy gained against speed kept"
                 + (f"\n{busy}" if busy else ""), color="black" if not busy else "firebrick")
    if busy:
        ax.text(0.5, 0.5, "BUSY MACHINE", transform=ax.transAxes, ha="center", va="center", fontsize=28,
                color="firebrick", alpha=0.25, rotation=20)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.text(0.01, -0.02, caption, fontsize=7, ha="left", va="top", wrap=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _plot_spectra(spectra: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, spec in spectra.items():
        ax.semilogy(spec.grid, np.maximum(spec.density, 1e-8), label=name)
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_title("Hessian spectral density (stochastic Lanczos quadrature)")
    ax.set_ylim(bottom=1e-6)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
