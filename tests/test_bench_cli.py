"""The benchmark CLI runs end to end (tiny settings) and writes what it says it writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sam_fused.tools.bench.measure import bytes_per_param, count_launches, held_bytes
from sam_fused.tools.bench.models import transformer_width, Seq2Seq
from sam_fused.tools.cli import main


def test_bench_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--device", "cpu", "--model", "resnet", "--steps", "2", "--warmup", "1",
               "--backend", "torch", "--batch-size", "2", "--universal", "--efficient", "--host-tensors", "10,30",
               "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Optimizer step alone: resnet" in text and "Training: resnet, custom, batch 2" in text
    data = json.loads(out.read_text())
    env = data["environment"]
    for key in ("date", "torch", "triton", "device_name", "commit", "threads", "cores", "reps", "load_start",
                "load_end", "warnings"):
        assert key in env
    assert "spread" in text and "[quartiles]" in text
    variants = {r["variant"] for r in data["optimizer_step"]}
    assert {"sgd", "sam-baseline", "sam-torch"} <= variants
    for r in data["optimizer_step"]:
        assert r["median_ms"] > 0 and len(r["times_ms"]) == 2 and r["launches"] > 0
        assert r["bytes_per_param"] == (40 if r["variant"].startswith("sam-") else 20)
    for r in data["optimizer_step"] + data["training"]:
        assert r["spread"] >= 0
    train = {r["variant"]: r for r in data["training"]}
    assert train["sgd"]["ratio_vs_sgd"] == 1.0 and train["sgd"]["ratio_vs_sgd_quartiles"] == [1.0, 1.0]
    for r in train.values():  # a paired ratio's median lies within its quartiles
        q1, q3 = r["ratio_vs_sgd_quartiles"]
        assert q1 <= r["ratio_vs_sgd"] <= q3
    assert train["sam-torch"]["extra_bytes_per_param"] == 4.0  # one fp32 backup per parameter
    assert train["sam-baseline"]["extra_bytes_per_param"] == 4.0
    # universal SAM: backup, g0 and sums (fp32): Frob-SAM 4 buffers, Trace- and Det-SAM 3
    assert train["usam-frob"]["extra_bytes_per_param"] == 16.0
    assert train["usam-det"]["extra_bytes_per_param"] == 12.0
    assert "throughput / sam-torch's" in text and "usam-trace" not in {r["variant"] for r in data["optimizer_step"]}
    # interval and randomized SAM: training rows only, no extra memory beyond SAM's backup
    assert {"interval", "rst"} <= set(train) and "rst" not in variants
    assert train["interval"]["extra_bytes_per_param"] == 4.0
    # GSAM: the backup and the saved gradient; LookSAM: backup, g_v and the saved gradient (fp32)
    assert train["gsam"]["extra_bytes_per_param"] == 8.0
    assert train["looksam"]["extra_bytes_per_param"] == 12.0
    # Momentum-SAM: nothing beyond SGD's momentum buffer (its restore is arithmetic)
    assert train["msam"]["extra_bytes_per_param"] == 0.0
    # a 25% SAM phase: SAM's backup; the preconditioned perturbation needs an Adam base (not this run's SGD)
    assert train["phase"]["extra_bytes_per_param"] == 4.0 and "psam" not in train
    # Functional-SAM and SAM-ON: SAM's backup (SAM-ON keeps one for every parameter: see FusedSAM's
    # docstring), and both train: their rows hold a time
    assert train["fsam"]["extra_bytes_per_param"] == 4.0 and train["samon"]["extra_bytes_per_param"] == 4.0
    assert train["fsam"]["median_ms"] > 0 and train["samon"]["median_ms"] > 0
    host = data["host_cost"]
    assert [(r["tensors"], r["grads"]) for r in host] == [(n, g) for n in (10, 30) for g in ("in place", "new", "backward")]
    for r in host:
        assert r["same_addresses"] == {"in place": 1.0, "new": 0.0}.get(r["grads"], r["same_addresses"])
        assert 0.0 <= r["same_addresses"] <= 1.0
        assert r["sam_us_per_tensor"] > 0 and r["sgd_us_per_tensor"] > 0
        assert r["ratio"] == r["sam_us_per_tensor"] / r["sgd_us_per_tensor"]
        assert r["sam_q1"] <= r["sam_us_per_tensor"] <= r["sam_q3"]
    assert "Host cost" in text


def test_default_run_plan_and_busy_warning(monkeypatch, capsys):
    """Without --full the CPU run covers one model and one batch size; a load above the cores makes
    the bench time with one thread and print a warning."""
    import sam_fused.tools.bench.cli as bench

    monkeypatch.setattr(bench, "load", lambda: 99.0)
    before = torch.get_num_threads()
    try:
        rc = main(["bench", "--device", "cpu", "--steps", "2", "--warmup", "0", "--backend", "torch",
                   "--transformer-params", "2e5", "--host-tensors", "none"])
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    captured = capsys.readouterr()
    assert "timing with 1 thread" in captured.err and "s left" in captured.err
    text = captured.out
    assert "WARNING: the machine was busy: load average 99.0" in text
    assert "THE MACHINE WAS BUSY" in text.splitlines()[1]
    titles = [line for line in text.splitlines() if line.startswith(("Optimizer step alone", "Training:", "Bottom line"))]
    assert len(titles) == 3 and all("BUSY MACHINE: timings doubtful" in line for line in titles)
    assert "Training: transformer, compute-heavy" in text and "optimizer-heavy" not in text and "resnet" not in text


def test_spread_warnings():
    from sam_fused.tools.bench.cli import warnings_for
    from sam_fused.tools.bench.measure import paired_ratios, quartiles, rel_spread

    assert rel_spread([1.0, 1.0, 1.0, 1.0]) == 0.0
    assert rel_spread([1.0, 2.0, 3.0, 4.0, 5.0]) == (4.0 - 2.0) / 3.0
    assert quartiles([2.0]) == (2.0, 2.0)
    assert paired_ratios([1.0, 2.0], [2.0, 2.0]) == [2.0, 1.0]
    env = dict(cores=2, device="cpu", load_start=0.5, load_end=0.5)
    calm = dict(model="m", variant="v", spread=0.05, batch_size=1)
    assert warnings_for(env, [calm], [calm], []) == []
    noisy = dict(calm, spread=0.3)
    (w,) = warnings_for(env, [noisy], [calm], [])
    assert "m step v" in w and "15%" in w


def test_bench_help_runs_as_module():
    res = subprocess.run([sys.executable, "-m", "sam_fused", "bench", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--backend" in res.stdout and "--json" in res.stdout


def test_unavailable_backend_is_refused(tmp_path, capsys, monkeypatch):
    line = refused(["bench", "--device", "cpu", "--backend", "no-such", "--no-train"], tmp_path, capsys, monkeypatch,
                   "--backend")
    assert "no-such cannot run on cpu" in line


def test_bytes_formula():
    assert bytes_per_param("sam+sgd", 4) == 40
    assert bytes_per_param("sam+sgd", 4, adaptive=True) == 44
    assert bytes_per_param("sam+adam", 4) == 48
    assert bytes_per_param("sgd", 4) == 20
    assert bytes_per_param("sam+sgd", 2) == 20


def test_op_counter_and_held_bytes():
    a = torch.zeros(10)
    assert count_launches(lambda: a.add_(1).mul_(2), torch.device("cpu")) == 2
    p = torch.nn.Parameter(torch.zeros(100))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(100)
    opt.step()
    assert held_bytes(opt) == 400


def test_transformer_width_hits_the_target():
    d = transformer_width(2e6)
    n = sum(p.numel() for p in Seq2Seq(d, 6).parameters())
    assert 0.6e6 < n < 4e6 and d % 64 == 0


@pytest.mark.parametrize("args", [["--help"], ["bench", "--help"], ["compare", "--help"]])
def test_help_shows_no_markup(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: sam-fused" in text and "``" not in text


def test_roofline_section_writes_a_row_per_pass(tmp_path, capsys):
    """--roofline on the CPU at tiny sizes: every pass of the fused step and torch's fused
    optimizers, for each shape and dtype, with the bytes of the module docstring."""
    from sam_fused.tools.bench import roofline

    out = tmp_path / "bench.json"
    rc = main(["bench", "--device", "cpu", "--no-train", "--host-tensors", "none", "--model", "transformer",
               "--transformer-params", "1e5", "--steps", "2", "--warmup", "1", "--backend", "cpu", "--roofline",
               "--roofline-sizes", "3000", "--roofline-mixes", "resnet50", "--json", str(out)])
    assert rc == 0
    assert "Roofline: each pass alone" in capsys.readouterr().out
    rows = json.loads(out.read_text())["passes"]
    fused = {"norm", "perturb", "dots", "restore+update sgd", "restore+update adamw", "sam step sgd", "msam step sgd",
             "msam step adamw"}
    for shape, tensors in (("1 tensor", 1), ("resnet50", 161)):
        for dtype, elem in (("float32", 4), ("bfloat16", 2)):
            rs = [r for r in rows if r["shape"] == shape and r["dtype"] == dtype]
            assert {r["pass"] for r in rs if r["backend"] == "cpu"} == fused
            for r in rs:
                assert r["tensors"] == tensors and r["median_ms"] > 0
                assert r["bytes_per_param"] == roofline.PASS_ELEMENTS[r["pass"]] * elem
                assert r["fraction_of_copy"] == pytest.approx(r["gbs"] / json.loads(out.read_text())["copy_gbs"])
    assert all(r["params"] <= 3000 + 161 for r in rows if r["shape"] == "resnet50")  # scaled down on the CPU


def test_roofline_mixes_have_the_documented_shapes():
    from sam_fused.tools.bench.roofline import llm_numels, resnet50_numels, transformer_numels

    assert (len(resnet50_numels()), sum(resnet50_numels())) == (161, 25_557_032)  # torchvision's ResNet-50
    assert len(llm_numels()) == 194 and 0.95e9 < sum(llm_numels()) < 1.0e9
    assert len(transformer_numels(2e6)) == 187
    with pytest.raises(SystemExit):
        main(["bench", "--roofline-sizes"])


def test_the_tables_have_a_legend():
    from sam_fused.tools.bench.cli import legend

    lines = legend(["sgd", "sgd-fused", "sam-baseline", "sam-torch", "sam-cpu", "gsam"])
    text = "\n".join(lines)
    assert "oracle" in text and "not to be fast" in text and "Python loop" in text and "fused=True" in text
    assert len(lines) == 6 and legend(["sgd"]) == legend(["adamw"])


# --- the command line refuses bad input before any work -------------------------------------------

def _tree(root):
    return sorted((str(p.relative_to(root)), p.is_dir()) for p in root.rglob("*"))


def tiny(tmp_path):
    return ["bench", "--device", "cpu", "--no-train", "--host-tensors", "none", "--model", "transformer",
            "--transformer-params", "1e5", "--steps", "2", "--warmup", "0", "--backend", "torch",
            "--json", str(tmp_path / "out" / "bench.json")]


def refused(argv, root, capsys, monkeypatch, option):
    """``main(argv)`` exits with argparse's code 2 and one error line naming ``option``, no
    traceback, and nothing under ``root`` (the working folder too) changes."""
    monkeypatch.chdir(root)
    before = _tree(root)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    errors = err.splitlines()  # the error alone, in one line
    assert len(errors) == 1 and errors[0].startswith(f"sam-fused bench: error: argument {option}"), err
    assert _tree(root) == before
    return errors[0]


@pytest.mark.parametrize("option, value", [
    ("--steps", "-1"), ("--steps", "0"), ("--host-tensors", "abc"), ("--device", "foo"), ("--warmup", "-1"),
    ("--transformer-params", "-5"), ("--threads", "0"), ("--batch-size", "0"), ("--host-tensors", "10,0"),
    ("--roofline-sizes", "1e6,-4"), ("--roofline-mixes", "transformer,bert"), ("--roofline-dtypes", "int8"),
    ("--transformer-params", "nan"), ("--device", "mps"),
])
def test_bench_refuses_a_bad_value(tmp_path, capsys, monkeypatch, option, value):
    line = refused([*tiny(tmp_path), option, value], tmp_path, capsys, monkeypatch, option)
    assert repr(value) in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_bench_refuses_cuda_where_there_is_none(tmp_path, capsys, monkeypatch):
    assert "no CUDA device" in refused([*tiny(tmp_path), "--device", "cuda"], tmp_path, capsys, monkeypatch, "--device")


def test_bench_refuses_a_json_path_that_is_a_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "out").mkdir()
    args = [*tiny(tmp_path)[:-1], str(tmp_path / "out")]
    assert "is a folder" in refused(args, tmp_path, capsys, monkeypatch, "--json")


def test_bench_refuses_a_json_path_under_a_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "file.txt").write_text("not a folder")
    args = [*tiny(tmp_path)[:-1], str(tmp_path / "file.txt" / "bench.json")]
    assert "is a file, not a folder" in refused(args, tmp_path, capsys, monkeypatch, "--json")


def test_bench_refuses_a_roofline_without_a_fused_backend(tmp_path, capsys, monkeypatch):
    refused([*tiny(tmp_path), "--roofline"], tmp_path, capsys, monkeypatch, "--roofline")


def test_the_entry_point_line_buffers_stdout(monkeypatch):
    """Piped (``| tee``, a log), each line leaves when printed, not when the process ends."""
    import io

    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    assert not stream.line_buffering
    monkeypatch.setattr(sys, "stdout", stream)
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert stream.line_buffering


def test_bottom_line_says_the_json_figures_in_words(tmp_path, capsys):
    """The bench ends with its answer in words; each number of it is one of the JSON's rows'. The
    JSON's config holds the options this run used, the roofline's not among them."""
    import re

    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--host-tensors", "none", "--model", "transformer", "--transformer-params",
                 "1e5", "--steps", "2", "--warmup", "0", "--backend", "torch", "--batch-size", "2",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    tail = text[text.index("Bottom line"):]
    (entry,) = data["bottom_line"]
    step = {r["variant"]: r for r in data["optimizer_step"]}
    train = {r["variant"]: r for r in data["training"]}
    assert entry["sam"] == "sam-torch" and entry["model"] == "transformer"
    speedup = step["sam-torch"]["speedup_vs_baseline"]
    assert entry["step_speedup_vs_baseline"] == speedup
    (t,) = entry["training"]
    assert (t["sam_vs_sgd"], t["baseline_vs_sgd"]) == (train["sam-torch"]["ratio_vs_sgd"],
                                                         train["sam-baseline"]["ratio_vs_sgd"])
    said = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
    assert f"(sam-torch) is {said} than the common per-parameter SAM loop (sam-baseline)" in tail
    assert (f"runs at {t['sam_vs_sgd']:.2f}x SGD's throughput against {t['baseline_vs_sgd']:.2f}x for the common loop"
            in tail)
    assert entry["text"] in tail and len(re.findall(r"\d+\.\d\dx", entry["text"])) == 3
    # the headers say which way is better
    assert "speedup over sam-baseline [quartiles]" in text and "throughput / SGD's [quartiles]" in text
    assert "higher is better" in text
    config = data["config"]
    assert config["steps"] == 2 and config["warmup"] == 0 and config["backend"] == ["torch"]
    assert config["batch_size"] == {"transformer": {"custom": 2}} and config["transformer_params"] == 1e5
    assert config["host_tensors"] == [] and not [k for k in config if k.startswith("roofline")]


def test_the_preconditioned_row_runs_over_adamw():
    from sam_fused.tools.bench.cli import make_optimizer

    p = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer("psam", [p], "adamw")
    assert opt.precondition and isinstance(opt.base_optimizer, torch.optim.AdamW)
    opt.step(lambda: (p ** 2).sum().backward())
    assert not torch.equal(p.detach(), torch.ones(3))
