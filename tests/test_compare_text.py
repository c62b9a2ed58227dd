"""`sam-fused compare --task text`: the standard library's sources as data (a fixed file list,
split by file), the 4-bit round-to-nearest quantizer, the equal-compute evaluation step, and the
command end to end at tiny sizes, with its refusals."""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

pytest.importorskip("scipy")

from sam_fused.tools import text  # noqa: E402
from sam_fused.tools.cli import main  # noqa: E402
from test_compare_cli import refused  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])


# --- the data -------------------------------------------------------------------------------------

def test_the_file_list_is_fixed_sorted_and_top_level_only(tmp_path):
    files = text.stdlib_files()
    assert files == text.stdlib_files() and len(files) >= 100
    assert [f.name for f in files] == sorted(f.name for f in files)
    assert all(f.parent == STDLIB and f.suffix == ".py" for f in files)
    assert {"os.py", "argparse.py"} <= {f.name for f in files}
    # in another folder: only the .py files directly in it, in name order whatever the creation order
    for name in ("zeta.py", "alpha.py", "notes.txt", "mid.py"):
        (tmp_path / name).write_text(f"# {name}\n")
    for sub in ("test", "site-packages", "idlelib"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "inner.py").write_text("x = 1\n")
    assert [f.name for f in text.stdlib_files(tmp_path)] == ["alpha.py", "mid.py", "zeta.py"]


def test_the_split_is_by_file_every_tenth_to_validation():
    files = text.stdlib_files()
    train, val = text.split_files(files)
    assert not set(train) & set(val) and sorted(train + val) == sorted(files)
    assert val == files[9::10] and len(val) == len(files) // 10
    assert train == [f for i, f in enumerate(files) if i % 10 != 9]


def test_the_data_are_the_bytes_of_the_stdlib_sources():
    data = text.corpus()
    train, val = text.split_files(text.stdlib_files())
    assert bytes(data.train.numpy()) == b"".join(f.read_bytes() for f in train)
    assert bytes(data.val.numpy()) == b"".join(f.read_bytes() for f in val)
    assert data.train_files == tuple(f.name for f in train) and data.val_files == tuple(f.name for f in val)
    rec = data.record()
    assert rec["files"] == len(train) + len(val) and rec["val_bytes"] == data.val.numel() > 10_000
    assert rec["python"] == sys.version and rec["root"] == str(STDLIB)
    first = val[0].read_bytes()
    assert bytes(data.val[:len(first)].numpy()) == first  # file after file, nothing in between
    x, y = text.batch(data.train, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one byte
    window = bytes(torch.cat([x[0], y[0, -1:]]).to(torch.uint8).numpy())
    assert window in bytes(data.train.numpy())


# --- the 4-bit quantizer --------------------------------------------------------------------------

def test_4bit_rounding_is_per_row_with_at_most_16_levels_and_half_a_step_of_error():
    torch.manual_seed(0)
    # rows of very different scales: one scale for the whole matrix would round the small rows to 0
    w = torch.randn(6, 200) * torch.tensor([1e-3, 0.02, 1.0, 10.0, 0.5, 3.0])[:, None]
    q = text.quantize_rows(w)
    for row, qrow in zip(w, q):
        step = row.abs().max() / 7
        assert qrow.unique().numel() <= 16
        assert (qrow - row).abs().max() <= step / 2 * (1 + 1e-6)
        assert torch.allclose(qrow / step, (qrow / step).round(), atol=1e-4)  # on the row's own grid
    assert (q[0] != 0).any()


def test_4bit_rounding_is_exact_on_the_grid_and_keeps_zero_rows():
    torch.manual_seed(1)
    k = torch.randint(-7, 8, (5, 40)).float()
    k[:, 0] = 7.0  # the largest magnitude of each row is 7 steps
    steps = torch.tensor([0.125, 0.5, 2.0, 1 / 64, 4.0])[:, None]
    w = k * steps
    assert torch.equal(text.quantize_rows(w), w)
    assert torch.equal(text.quantize_rows(torch.zeros(3, 8)), torch.zeros(3, 8))


def test_the_quantized_model_rounds_every_linear_and_embedding_weight_only():
    model = text.byte_lm(0, context=8, d=16, layers=1, heads=2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)) and m.bias is not None:
                m.bias.normal_()  # nonzero, so that keeping them is seen
    q = text.quantized(model)
    before, after = dict(model.named_parameters()), dict(q.named_parameters())
    assert set(before) == set(after)
    for name, p in before.items():
        module = q.get_submodule(name.rsplit(".", 1)[0])
        if name.endswith("weight") and isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            assert torch.equal(after[name], text.quantize_rows(p.detach())) and not torch.equal(after[name], p)
            assert max(r.unique().numel() for r in after[name]) <= 16
        else:  # biases and LayerNorms kept
            assert torch.equal(after[name], p)
    assert "embed.weight" in after and not [n for n in after if "head" in n]  # the head is the embedding: one matrix


# --- equal compute ---------------------------------------------------------------------------------

def test_the_equal_compute_step_counts_forward_backward_passes():
    assert text.equal_compute_step([2] * 10) == 5 and text.equal_compute_step([2] * 9) == 4
    assert text.equal_compute_step([1] * 10) == 10
    assert text.equal_compute_step([1] * 75 + [2] * 25) == 87  # 75 + 2 * 12 = 99 passes; one more is 101
    model = text.byte_lm(0, context=8, d=16, layers=1, heads=2)
    for name in text.OPTIMIZERS:
        opt = text.make_optimizer(name, model, 100, 1e-3, 0.05, 0.3)
        passes = text.passes_per_step(opt, 100)
        half = text.equal_compute_step(passes)
        if name in ("adamw", "msam-adamw"):
            assert passes == [1] * 100 and half == 100
        elif name == "sam-phase":  # SAM on the last 25% of the steps
            assert passes == [1] * 75 + [2] * 25 and half == 87
        else:
            assert passes == [2] * 100 and half == 50


@pytest.mark.parametrize("name", text.OPTIMIZERS)
def test_the_pass_count_is_the_forwards_the_step_runs(name):
    """Counted in the model: every forward and every backward through it, step by step."""
    model = text.byte_lm(0, context=8, d=16, layers=1, heads=2)
    steps = 8
    opt = text.make_optimizer(name, model, steps, 1e-3, 0.05, 0.3)
    counts = {"forward": 0, "backward": 0}
    model.register_forward_pre_hook(lambda *_: counts.__setitem__("forward", counts["forward"] + 1))
    model.embed.weight.register_hook(lambda g: counts.__setitem__("backward", counts["backward"] + 1))
    seen = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        before = dict(counts)
        x, y = text.batch(text.corpus().train, 2, 8, gen)
        text.train_step(name, opt, model, x, y)
        assert counts["forward"] - before["forward"] == counts["backward"] - before["backward"]
        seen.append(counts["forward"] - before["forward"])
    assert seen == text.passes_per_step(opt, steps)


@pytest.mark.parametrize("name", ["sam-adamw", "fsam-p"])
def test_the_equal_compute_figure_is_the_run_of_half_the_steps(name):
    """Two passes per step: the figure at equal compute is taken at the halfway step, and with a
    constant learning rate it is exactly what a run of half the steps ends with."""
    args = dict(data=text.corpus(), seed=3, batch_size=4, lr=3e-3, rho=0.05, msam_rho=0.3, context=16, d_model=16,
                layers=1, heads=2)
    full = text.train_run(name, steps=10, **args)
    half = text.train_run(name, steps=5, **args)
    assert full["equal_compute_step"] == 5 and full["passes_at_equal_compute"] == 10 and full["passes"] == 20
    assert full["val_bpb_equal_compute"] == half["val_bpb"] and full["val_bpb"] != half["val_bpb"]


# --- the command end to end ------------------------------------------------------------------------

TINY = ["compare", "--task", "text", "--steps", "8", "--batch-size", "4", "--context", "16", "--d-model", "16",
        "--layers", "1", "--heads", "2"]
COLUMNS = ("val_bpb", "val_bpb_equal_compute", "val_bpb_4bit", "quant_increase", "steps_per_second",
           "throughput_vs_adamw", "train_seconds")


def test_compare_text_writes_every_optimizer_and_column(tmp_path, capsys):
    from sam_fused.tools.compare import verdict

    assert main([*TINY, "--seeds", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "compare.json").read_text())
    assert sorted(tmp_path.iterdir()) == [tmp_path / "compare.json"]
    assert list(data["summary"]) == list(text.OPTIMIZERS) and data["seeds"] == [0, 1]
    assert data["python"] and data["machine"] and data["units"] == "bits per byte"
    assert data["data"]["files"] == len(text.stdlib_files()) and data["data"]["train_bytes"] > 1_000_000
    assert data["config"]["steps"] == 8 and data["config"]["rho"] == [text.TEXT.rho]
    assert data["config"]["msam_rho"] == text.TEXT.msam_rho
    for seed in data["per_seed"]:
        for name, r in seed.items():
            assert set(COLUMNS) <= set(r)
            assert 0 < r["val_bpb"] < 8.5 and r["quant_increase"] == pytest.approx(r["val_bpb_4bit"] - r["val_bpb"])
            want = {"adamw": 8, "msam-adamw": 8, "sam-phase": 7}.get(name, 4)  # sam-phase: SAM on steps 6 and 7
            assert r["equal_compute_step"] == want and r["passes_at_equal_compute"] <= 8
        assert seed["adamw"]["throughput_vs_adamw"] == 1.0
        assert seed["adamw"]["val_bpb_equal_compute"] == seed["adamw"]["val_bpb"]
    for name, figs in data["verdicts"].items():  # compare's one rule, on the paired differences of the JSON
        for key, v in figs.items():
            s = data["summary"]
            diff = [a - b for a, b in zip(s[name][key]["values"], s["adamw"][key]["values"])]
            assert v["verdict"] == verdict(diff) and v["mean"] == pytest.approx(sum(diff) / 2)
    assert set(data["verdicts"]) == set(text.OPTIMIZERS) - {"adamw"}
    for header in ("val bpb", "val bpb, = compute", "4-bit bpb", "4-bit increase", "steps/s / AdamW's", "time s"):
        assert header in out
    assert f"\nsam-adamw (rho {text.TEXT.rho:g}) " in out and f"\nmsam-adamw (rho {text.TEXT.msam_rho:g}) " in out
    assert f"radii: sam-adamw (rho {text.TEXT.rho:g})" in out
    assert f"sam-phase (rho {text.TEXT.rho:g}) - adamw, per seed" in out and "    equal compute " in out


def test_compare_text_is_deterministic_for_a_seed(tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / str(i)
        assert main([*TINY, "--seeds", "1", "--seed", "4", "--optimizer", "adamw", "--optimizer", "fsam",
                     "--optimizer", "msam-adamw", "--out", str(out)]) == 0
        data = json.loads((out / "compare.json").read_text())
        timing = {"train_seconds", "steps_per_second", "throughput_vs_adamw"}
        runs.append([{k: v for k, v in r.items() if k not in timing}
                     for seed in data["per_seed"] for r in seed.values()])
    assert runs[0] == runs[1]
    assert runs[0][0]["val_bpb"] != runs[0][1]["val_bpb"]  # the optimizers differ


def test_compare_text_sweeps_rho(tmp_path):
    assert main([*TINY, "--seeds", "1", "--optimizer", "adamw", "--optimizer", "psam", "--rho", "0.01,0.1",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "compare.json").read_text())
    assert list(data["summary"]) == ["adamw", "psam@0.01", "psam@0.1"]
    assert [data["per_seed"][0][k]["rho"] for k in ("psam@0.01", "psam@0.1")] == [0.01, 0.1]


# --- refusals: one line, exit code 2, nothing written ------------------------------------------------

@pytest.mark.parametrize("argv, option, says", [
    (["--task", "text", "--optimizer", "sgd"], "--optimizer", "'sgd' is not an optimizer of --task text"),
    (["--task", "text", "--optimizer", "adamw", "--optimizer", "msam"], "--optimizer", "'msam' is not an optimizer"),
    (["--optimizer", "adamw"], "--optimizer", "'adamw' is not an optimizer of --task digits"),
    (["--task", "images", "--optimizer", "fsam"], "--optimizer", "'fsam' is not an optimizer of --task images"),
    (["--task", "text", "--epochs", "3"], "--epochs", "not an option of --task text (it trains for --steps)"),
    (["--task", "text", "--noise", "0.3"], "--noise", "not an option of --task text"),
    (["--task", "text", "--lanczos-steps", "7"], "--lanczos-steps", "not an option of --task text"),
    (["--steps", "10"], "--steps", "an option of --task text only"),
    (["--task", "graphs", "--d-model", "32"], "--d-model", "an option of --task text only"),
    (["--task", "text", "--heads", "3"], "--heads", "3 heads do not divide --d-model 64"),
    (["--task", "text", "--steps", "3"], "--steps", "expected an integer of at least 4, got '3'"),
    (["--task", "text", "--context", "1"], "--context", "expected an integer of at least 2"),
    (["--task", "text", "--d-model", "0"], "--d-model", "expected a positive integer"),
    (["--task", "text", "--layers", "x"], "--layers", "expected a positive integer"),
    (["--task", "text", "--rho", "0.05,-1"], "--rho", "expected comma-separated finite non-negative numbers"),
    (["--task", "text", "--msam-rho", "nan"], "--msam-rho", "expected a finite non-negative number"),
    (["--task", "text", "--optimizer", "sam-phase", "--batch-size", "0"], "--batch-size", "expected a positive"),
])
def test_compare_text_refuses_bad_arguments(tmp_path, capsys, monkeypatch, argv, option, says):
    line = refused(["compare", *argv, "--out", str(tmp_path / "out")], tmp_path, capsys, monkeypatch, option)
    assert says in line


def test_compare_text_refuses_an_out_file_that_is_a_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "out" / "compare.json").mkdir(parents=True)
    line = refused([*TINY, "--out", str(tmp_path / "out")], tmp_path, capsys, monkeypatch, "--out")
    assert "compare.json is a folder" in line
