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
    assert "sam - sgd, test accuracy per seed" in out
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
