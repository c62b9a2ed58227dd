"""The tasks of `sam-fused compare` beyond digits: their data sets (made in the package, seeded),
models and base optimizers; Lanczos at both ends of the Hessian's spectrum against the exact
Hessian; the command end to end on each task at small sizes (one epoch, one seed), with a rho
sweep and members of the efficient and universal families."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

from sam_fused.tools import tasks  # noqa: E402
from sam_fused.tools.cli import main  # noqa: E402
from sam_fused.tools.sharpness import hessian_extremes  # noqa: E402


@pytest.mark.parametrize("name", ["images", "timeseries", "graphs"])
def test_data_sets_are_seeded_and_shaped(name):
    task = tasks.TASKS[name]
    a = task.data(0, 64, 32)
    b = task.data(0, 64, 32)
    c = task.data(1, 64, 32)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    x_tr, y_tr, y_clean, x_te, y_te = a
    assert len(x_tr) == len(y_tr) == len(y_clean) == 64 and len(x_te) == len(y_te) == 32
    model = task.model(0)
    out = model(x_tr[:8])
    assert out.shape == (8, int(y_te.max()) + 1 if name != "images" else 10) or out.shape[0] == 8
    assert torch.isfinite(out).all()


def test_timeseries_class_mix_is_imbalanced():
    _, y, _, _, _ = tasks.timeseries_data(0, 4000, 10)
    share = torch.bincount(y, minlength=5).double() / len(y)
    want = torch.tensor([b[0] for b in tasks.BEATS], dtype=torch.float64)
    assert (share - want).abs().max() < 0.03
    assert share[0] > 5 * share[4]


def test_graph_labels_follow_the_motif():
    x, y_noisy, y_clean, _, _ = tasks.graphs_data(0, 400, 10)
    f = len(tasks.ATOMS)
    for row, label in zip(x, y_clean):
        types = row[:, :f].argmax(1)
        mask = row[:, -1] > 0
        adj = (row[:, f:f + tasks.MAX_NODES] > 0) & ~torch.eye(tasks.MAX_NODES, dtype=torch.bool)
        n_idx, o_idx = tasks.ATOMS.index("N"), tasks.ATOMS.index("O")
        motif = any(int(((types == o_idx) & adj[i] & mask).sum()) >= 2 for i in range(tasks.MAX_NODES)
                    if mask[i] and types[i] == n_idx)
        assert int(motif) == int(label)
    assert 0.4 < float(y_clean.float().mean()) < 0.6
    flipped = float((y_noisy != y_clean).float().mean())
    assert 0.05 < flipped < 0.15  # 10% of the training labels


def test_lanczos_extremes_match_the_exact_hessian():
    """Both ends against torch.autograd.functional.hessian of a small MLP's loss (~160 parameters):
    exact with as many steps as parameters, within 1% of the spectrum's width with 40 steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 6)).double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 6, (40,))
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(v):
        chunks, i = [], 0
        for s in shapes:
            n = int(np.prod(s))
            chunks.append(v[i:i + n].reshape(s))
            i += n
        h = torch.tanh(x @ chunks[0].T + chunks[1])
        return F.cross_entropy(h @ chunks[2].T + chunks[3], y)

    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))
    full = hessian_extremes(model, F.cross_entropy, [(x, y)], steps=flat.numel(), seed=0)
    assert abs(full.lambda_max - float(exact[-1])) < 1e-8 and abs(full.lambda_min - float(exact[0])) < 1e-8
    width = float(exact[-1] - exact[0])
    short = hessian_extremes(model, F.cross_entropy, [(x, y)], steps=40, seed=0)
    assert float(exact[0]) <= short.lambda_min + 1e-12 and short.lambda_max <= float(exact[-1]) + 1e-12
    assert abs(short.lambda_max - float(exact[-1])) < 0.01 * width
    assert abs(short.lambda_min - float(exact[0])) < 0.01 * width
    assert exact[0] < 0  # a negative end to find
    assert full.ratio == pytest.approx(abs(float(exact[-1]) / float(exact[0])), rel=1e-6)


SMALL = ["--epochs", "1", "--seeds", "1", "--train-size", "48", "--test-size", "32", "--hessian-samples", "16",
         "--lanczos-steps", "6", "--probes", "2", "--landscape-steps", "3", "--threads", "2"]


# `make test` runs the series (the efficient family and a sweep on a new task); the Wide ResNet's and
# the graphs' (Frob-SAM's samples) end-to-end runs take 20-40 s each on 2 cores: `make test-full`.
# Their data, models and bases are in the tests above.
@pytest.mark.quick_subset(None, [dict(task="timeseries")])
@pytest.mark.parametrize("task, extra", [
    ("images", ["--optimizer", "sgd", "--optimizer", "sam", "--rho", "0.05,0.5"]),
    ("timeseries", ["--optimizer", "sgd", "--optimizer", "sam", "--optimizer", "looksam", "--optimizer", "msam",
                    "--rho", "0.5,1"]),
    ("graphs", ["--optimizer", "sgd", "--optimizer", "msam", "--optimizer", "frob", "--optimizer", "gsam"]),
])
def test_compare_runs_each_task(tmp_path, capsys, task, extra):
    assert main(["compare", "--task", task, *SMALL, *extra, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["config"]["task"] == task
    runs = set(data["summary"])
    if task == "images":
        assert runs == {"sgd", "sam@0.05", "sam@0.5"}
        assert [data["per_seed"][0][r]["rho"] for r in ("sam@0.05", "sam@0.5")] == [0.05, 0.5]
    if task == "timeseries":  # every optimizer that takes --rho runs once per value
        assert runs == {"sgd", "sam@0.5", "sam@1", "looksam@0.5", "looksam@1", "msam"}
    for r in data["per_seed"][0].values():
        assert r["lambda_max"] >= r["lambda_min"] and r["lambda_max_over_min"] >= 0
        assert 0 <= r["test_acc"] <= 1
    assert "lambda_max" in out and task in out
    if task == "graphs":
        assert data["config"]["lr"] == tasks.TASKS["graphs"].lr and "adam base" in out


def test_each_task_has_its_base():
    from argparse import Namespace

    from sam_fused import FusedSAM
    from sam_fused.tools.compare import make_optimizer, resolve

    for name, base in (("digits", torch.optim.SGD), ("images", torch.optim.SGD), ("graphs", torch.optim.Adam)):
        args = Namespace(task=name, lr=None, rho=None, epochs=None, batch_size=None, train_size=None, test_size=None,
                         hessian_samples=None, probes=None, seed=0, asam_rho=0.5)
        resolve(args)
        assert args.rho == [tasks.TASKS[name].rho]
        opt = make_optimizer("sam", [torch.nn.Parameter(torch.zeros(2))], args)
        assert isinstance(opt, FusedSAM) and type(opt.base_optimizer) is base


# The default compare of each task (its epochs, sizes and radii; one seed, the Hessian figures cut
# down): every optimizer of the default run and Momentum-SAM trains, none collapsed or warned
# about. The digits run is in test_compare_cli.py (`make test`, 24 s); these take 40 s (series),
# 47 s (images) and 147 s (graphs, 200 epochs) on 2 shared cores: `make test-full`.
@pytest.mark.quick_subset(None, [])
@pytest.mark.parametrize("task", ["images", "timeseries", "graphs"])
def test_the_default_compare_trains_on_each_task(tmp_path, capsys, task):
    cheap = ["--seeds", "1", "--hessian-samples", "16", "--lanczos-steps", "5", "--probes", "1",
             "--landscape-steps", "2"]
    names = ["--optimizer", "sgd", "--optimizer", "sam", "--optimizer", "asam", "--optimizer", "msam"]
    assert main(["compare", "--task", task, *cheap, *names, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "compare.json").read_text())
    assert "warning" not in out, out
    assert data["collapsed"] == {k: [] for k in ("sgd", "sam", "asam", "msam")}
    t = tasks.TASKS[task]
    assert f"sam (rho {t.rho:g})" in out and f"msam (rho {t.msam_rho:g})" in out
    for r in data["per_seed"][0].values():
        assert r["train_acc"] > r["train_chance"] + 0.2 and r["test_acc"] > r["train_chance"]
