"""`sam-fused compare` end to end in a reduced setting: it trains, measures and writes its files."""

from __future__ import annotations

import json

import torch

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from sam_fused.tools.cli import main  # noqa: E402
from sam_fused.tools.compare import load_digits_split  # noqa: E402


SMALL = ["--epochs", "2", "--probes", "4", "--landscape-steps", "5", "--width", "16", "--seeds", "2"]


def test_compare_writes_json_and_pngs(tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    rc = main(["compare", *SMALL, "--out", str(tmp_path)])
    assert rc == 0
    assert torch.get_num_threads() == threads  # the thread count is given back
    out = capsys.readouterr().out
    assert "lambda_max" in out and "lambda_min" in out and "sgd" in out and "asam" in out and "+-" in out and "seeds 0..1" in out
    assert "sam (rho 0.05) - sgd, test accuracy per seed" in out and "radii: sam (rho 0.05)" in out
    assert "\nsam (rho 0.05) " in out and "\nasam (rho 0.5, eta 0.01) " in out  # the rows name their radius
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["seeds"] == [0, 1] and data["machine"]
    assert set(data["summary"]) == {"sgd", "sam", "asam"}
    for per_seed in data["per_seed"]:
        for r in per_seed.values():
            assert 0 <= r["test_acc"] <= 1 and r["lambda_1"] > 0 and len(r["eigenvalues"]) == 5
            assert r["lambda_1_over_5"] >= 1
    for figs in data["summary"].values():
        acc = figs["test_acc"]
        assert len(acc["values"]) == 2 and abs(acc["mean"] - sum(acc["values"]) / 2) < 1e-12 and acc["std"] >= 0
    for name in ("landscape_1d.png", "landscape_2d.png", "spectrum.png", "family.png"):
        assert (tmp_path / name).stat().st_size > 5000
    from sam_fused.tools.compare import family_points

    points = family_points(data["summary"])
    assert set(points) == {"sam", "asam"}
    for name, pt in points.items():  # the picture's numbers are the paired ones of the JSON
        s = data["summary"]
        gains = [a - b for a, b in zip(s[name]["test_acc"]["values"], s["sgd"]["test_acc"]["values"])]
        assert abs(pt["gain"] - sum(gains) / 2) < 1e-12
        times = [a / b for a, b in zip(s["sgd"]["train_seconds"]["values"], s[name]["train_seconds"]["values"])]
        assert (pt["speed_min"], pt["speed_max"]) == (min(times), max(times)) and pt["speed"] > 0


def test_compare_is_deterministic_for_a_seed(tmp_path):
    """Two runs with the same seeds and thread count give the same figures, bit for bit."""
    runs = []
    for i in range(2):
        out = tmp_path / str(i)
        assert main(["compare", *SMALL, "--optimizer", "sgd", "--optimizer", "sam", "--out", str(out)]) == 0
        data = json.loads((out / "compare.json").read_text())
        runs.append([{k: v for k, v in r.items() if k != "train_seconds"} for seed in data["per_seed"] for r in seed.values()])
    assert runs[0] == runs[1]


def test_label_noise_flips_the_requested_fraction_to_other_classes():
    _, noisy, clean, _, _ = load_digits_split(noise=0.2, seed=0)
    flipped = (noisy != clean).float().mean().item()
    assert 0.15 < flipped < 0.25
    _, noisy, clean, _, _ = load_digits_split(noise=0.0, seed=0)
    assert bool((noisy == clean).all())


def test_compare_trains_gsam_and_looksam(tmp_path):
    small = [a if a != "2" or i != SMALL.index("--seeds") + 1 else "1" for i, a in enumerate(SMALL)]
    args = ["compare", *small, "--landscape-steps", "3", "--optimizer", "gsam", "--optimizer", "looksam"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "compare.json").read_text())
    assert set(data["summary"]) == {"gsam", "looksam"}
    for r in data["per_seed"][0].values():
        assert 0 <= r["test_acc"] <= 1 and r["lambda_1"] > 0


def test_one_verdict_rule_for_differences_over_seeds():
    """The README's figures, called by the rule the README states: a paired t-test at 95%."""
    from sam_fused.tools.compare import verdict

    def seeds(mean, std):  # five values with exactly this mean and sample deviation
        base = torch.tensor([-1.2649, -0.6325, 0.0, 0.6325, 1.2649], dtype=torch.float64)
        base = base / base.std()
        return (mean + std * base).tolist()

    assert verdict(seeds(0.009, 0.009)) == "within the seed spread"  # 4 of 5 seeds higher is not enough
    assert verdict(seeds(0.024, 0.015)) == "above"
    assert verdict(seeds(-0.024, 0.015)) == "below"
    assert verdict([0.5]) == "within the seed spread"  # one seed proves nothing
    bound = 2.7764451051977987 * 0.01 / 5 ** 0.5  # t(0.975, 4) * std / sqrt(5)
    assert verdict(seeds(bound * 1.01, 0.01)) == "above" and verdict(seeds(bound * 0.99, 0.01)) == "within the seed spread"


# --- the command line refuses bad input before any work -------------------------------------------

ONE_SEED = [a if a != "2" or i != SMALL.index("--seeds") + 1 else "1" for i, a in enumerate(SMALL)] + [
    "--landscape-steps", "3", "--optimizer", "sgd"]


def _tree(root):
    return sorted((str(p.relative_to(root)), p.is_dir()) for p in root.rglob("*"))


def refused(argv, root, capsys, monkeypatch, option, command="compare"):
    """``main(argv)`` exits with argparse's code 2 and one error line naming ``option``, no
    traceback, and nothing under ``root`` (the working folder too) changes."""
    monkeypatch.chdir(root)
    before = _tree(root)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    errors = err.splitlines()  # the error alone, in one line
    assert len(errors) == 1 and errors[0].startswith(f"sam-fused {command}: error: argument {option}"), err
    assert _tree(root) == before
    return errors[0]


@pytest.mark.parametrize("option, value", [
    ("--threads", "0"), ("--msam-rho", "-1"), ("--looksam-k", "0"), ("--gsam-alpha", "nan"), ("--batch-size", "0"),
    ("--noise", "1.5"), ("--epochs", "0"), ("--epochs", "-1"), ("--rho", "0.05,abc"), ("--lr", "inf"),
    ("--seeds", "0"), ("--seed", "-1"), ("--width", "0"), ("--train-size", "0"), ("--hessian-samples", "-1"),
    ("--lanczos-steps", "1"), ("--probes", "0"), ("--landscape-steps", "1"), ("--lam", "-0.1"), ("--asam-rho", "x"),
    ("--looksam-alpha", "-1"), ("--test-size", "-3"),
])
def test_compare_refuses_a_bad_value(tmp_path, capsys, monkeypatch, option, value):
    line = refused(["compare", *ONE_SEED, "--out", str(tmp_path / "out"), option, value], tmp_path, capsys,
                   monkeypatch, option)
    assert "expected" in line and repr(value) in line


def test_compare_refuses_an_out_folder_under_a_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "file.txt").write_text("not a folder")
    line = refused(["compare", *ONE_SEED, "--out", str(tmp_path / "file.txt" / "out")], tmp_path, capsys, monkeypatch,
                   "--out")
    assert "file.txt is a file, not a folder" in line


def test_compare_refuses_an_out_file_that_is_a_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "out" / "compare.json").mkdir(parents=True)
    line = refused(["compare", *ONE_SEED, "--out", str(tmp_path / "out")], tmp_path, capsys, monkeypatch, "--out")
    assert "compare.json is a folder" in line


def test_compare_json_records_the_options_it_uses_and_a_busy_machine(tmp_path, capsys, monkeypatch):
    """The config holds the task's and the chosen optimizers' options only; a load above the cores
    marks the table, the JSON and the throughput picture."""
    import sam_fused.tools.compare as compare

    monkeypatch.setattr(compare, "load", lambda: 99.0)
    seen = {}
    plot = compare.plot_family

    def spy(summary, path, caption, busy=None, labels=None):
        seen["busy"] = busy
        return plot(summary, path, caption, busy, labels)

    monkeypatch.setattr(compare, "plot_family", spy)
    small = [a for a in ONE_SEED if a != "sgd" and a != "--optimizer"]
    assert main(["compare", *small, "--optimizer", "sgd", "--optimizer", "gsam", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    config = json.loads((tmp_path / "compare.json").read_text())["config"]
    assert config["optimizer"] == ["sgd", "gsam"] and config["task"] == "digits"
    assert {"gsam_alpha", "rho", "noise", "width", "epochs", "seeds", "threads"} <= set(config)
    assert not {"asam_rho", "msam_rho", "looksam_k", "looksam_alpha", "lam", "func", "check"} & set(config)
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["busy"] and "99.0" in data["busy"] and data["load_start"] == 99.0
    assert "time s (!)" in out and "(!) machine busy (load average up to 99.0" in out
    assert seen["busy"] == data["busy"]


def test_compare_json_of_another_task_leaves_digits_options_out(tmp_path):
    from argparse import Namespace

    from sam_fused.tools.compare import config_used

    args = Namespace(task="graphs", noise=0.2, width=128, epochs=1, batch_size=64, lr=0.01, rho=[0.05], asam_rho=0.5,
                     msam_rho=3.0, lam=None, gsam_alpha=0.4, looksam_k=5, looksam_alpha=0.7, train_size=1, test_size=1,
                     hessian_samples=0, lanczos_steps=5, probes=1, landscape_steps=3, seeds=1, seed=0, threads=1,
                     out=tmp_path)
    config = config_used(args, ["sgd", "msam"])
    assert "noise" not in config and "width" not in config and "rho" not in config and config["msam_rho"] == 3.0
    assert config["out"] == str(tmp_path)
    config = config_used(args, ["gsam", "looksam"])
    assert {"rho", "gsam_alpha", "looksam_k", "looksam_alpha"} <= set(config) and "msam_rho" not in config


# --- radii in every label, and runs that collapsed ---------------------------------------------------

def test_collapse_rule_and_labels():
    """A run collapsed when its training accuracy is at chance (the majority class's share) or lost
    more than half of SGD's distance from chance; the label then says so, with the seeds."""
    from sam_fused.tools.compare import collapse_word, collapses, is_collapsed, label_of

    assert is_collapsed(0.11, chance=0.10) and is_collapsed(0.10, chance=0.10, sgd_train_acc=1.0)
    assert is_collapsed(0.54, chance=0.55, sgd_train_acc=0.98)  # below the majority class
    assert is_collapsed(0.50, chance=0.10, sgd_train_acc=1.0)  # 0.50 < 1.0 - 0.45
    assert not is_collapsed(0.56, chance=0.10, sgd_train_acc=1.0) and not is_collapsed(0.93, 0.55, 0.98)
    assert not is_collapsed(0.30, chance=0.10)  # without SGD: only chance counts
    assert not is_collapsed(0.40, chance=0.10, sgd_train_acc=0.45)  # SGD itself fits little
    seed = lambda sgd, sam: {"sgd": dict(train_acc=sgd, train_chance=0.1), "sam": dict(train_acc=sam, train_chance=0.1)}  # noqa: E731
    flags = collapses([seed(1.0, 0.12), seed(1.0, 0.99), seed(0.95, 0.3)])
    assert flags == {"sgd": [False, False, False], "sam": [True, False, True]}
    assert collapse_word(flags["sam"]) == "collapsed in 2 of 3 seeds" and collapse_word([True]) == "collapsed"
    assert collapse_word(flags["sgd"]) == ""
    assert label_of("sam@0.5", 0.5) == "sam (rho 0.5)" and label_of("sgd", None) == "sgd"
    assert label_of("sam", 2.0, "collapsed") == "sam (rho 2), collapsed"
    assert label_of("asam", 0.5) == "asam (rho 0.5, eta 0.01)"


def test_a_collapsed_run_is_named_in_the_table_the_warnings_and_the_pictures(tmp_path, capsys, monkeypatch):
    """SAM at rho 5 on the digits MLP (||w|| ~ 4.5 at width 16) trains to chance: the table, a
    warning line, the JSON and every picture call it collapsed, with its radius; so is the
    perturbation's fraction of the weights' norm."""
    import sam_fused.tools.compare as compare

    drawn = {}
    for name in ("plot_landscapes", "_plot_spectra", "plot_family"):
        original = getattr(compare, name, None)
        if original is None:  # plot_landscapes is imported inside _run
            continue

        def spy(data, path, *a, _name=name, _original=original, **kw):
            drawn.setdefault(_name, []).append(list(kw.get("labels", {}).values()) if _name == "plot_family" else list(data))
            return _original(data, path, *a, **kw)

        monkeypatch.setattr(compare, name, spy)
    import sam_fused.tools.sharpness as sharpness

    plot = sharpness.plot_landscapes

    def spy_landscapes(data, path, *a, **kw):
        drawn.setdefault("plot_landscapes", []).append(list(data))
        return plot(data, path, *a, **kw)

    monkeypatch.setattr(sharpness, "plot_landscapes", spy_landscapes)
    small = [a for a in ONE_SEED if a not in ("sgd", "--optimizer")]
    assert main(["compare", *small, "--epochs", "3", "--optimizer", "sgd", "--optimizer", "sam", "--optimizer", "msam",
                 "--rho", "5", "--msam-rho", "0.3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\nsam (rho 5), collapsed " in out and "\nmsam (rho 0.3) " in out
    assert "radii: sam (rho 5); msam (rho 0.3)" in out
    assert "warning: sam (rho 5): training collapsed (train accuracy" in out
    assert "warning: sam (rho 5): the first perturbation is" in out and "of the weights' norm (above 0.1)" in out
    assert "warning: msam" not in out and "warning: sgd" not in out
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["collapsed"] == {"sgd": [], "sam": [0], "msam": []}
    assert data["labels"]["sam"] == "sam (rho 5), collapsed"
    assert data["per_seed"][0]["sam"]["perturbation_fraction"] > 0.1 and data["per_seed"][0]["msam"]["rho"] == 0.3
    assert len(drawn["plot_landscapes"]) == 2
    for labels in drawn["plot_landscapes"] + drawn["_plot_spectra"] + drawn["plot_family"]:
        assert "sam (rho 5), collapsed" in labels and "msam (rho 0.3)" in labels


def test_the_default_compare_trains_on_digits(tmp_path, capsys):
    """The defaults of the digits task (100 epochs, the default radii, one seed): SGD, SAM, ASAM and
    Momentum-SAM all train, none collapsed and none warned about."""
    cheap = ["--seeds", "1", "--hessian-samples", "64", "--lanczos-steps", "5", "--probes", "1",
             "--landscape-steps", "2"]
    names = ["--optimizer", "sgd", "--optimizer", "sam", "--optimizer", "asam", "--optimizer", "msam"]
    assert main(["compare", *cheap, *names, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "compare.json").read_text())
    assert "warning" not in out and data["collapsed"] == {k: [] for k in ("sgd", "sam", "asam", "msam")}
    for r in data["per_seed"][0].values():
        assert r["train_acc"] > 0.9 and r["test_acc"] > 0.7  # chance is ~0.1


def test_the_long_phases_report_progress(tmp_path, capsys):
    """The landscapes and spectra say which model they are at, one line each, as they go."""
    assert main(["compare", *SMALL, "--optimizer", "sgd", "--optimizer", "sam", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    for what in ("1-D loss landscape", "2-D loss landscape", "Hessian spectrum"):
        assert err.count(what) == 2, err
