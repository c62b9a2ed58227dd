"""`sam-fused compare` end to end in a reduced setting: it trains, measures and writes its files."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from sam_fused.tools.cli import main  # noqa: E402
from sam_fused.tools.compare import load_digits_split  # noqa: E402


def test_compare_writes_json_and_pngs(tmp_path, capsys):
    rc = main(["compare", "--epochs", "2", "--probes", "4", "--landscape-steps", "5", "--width", "16",
               "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "lambda_1" in out and "sgd" in out and "asam" in out
    data = json.loads((tmp_path / "compare.json").read_text())
    assert set(data["results"]) == {"sgd", "sam", "asam"}
    for r in data["results"].values():
        assert 0 <= r["test_acc"] <= 1 and r["lambda_1"] > 0 and len(r["eigenvalues"]) == 5
        assert r["lambda_1_over_5"] >= 1
    for name in ("landscape_1d.png", "landscape_2d.png", "spectrum.png"):
        assert (tmp_path / name).stat().st_size > 5000


def test_label_noise_flips_the_requested_fraction_to_other_classes():
    _, noisy, clean, _, _ = load_digits_split(noise=0.2, seed=0)
    flipped = (noisy != clean).float().mean().item()
    assert 0.15 < flipped < 0.25
    _, noisy, clean, _, _ = load_digits_split(noise=0.0, seed=0)
    assert bool((noisy == clean).all())
