"""scripts/cutoff_curvature.py, small: the control (a trained deep linear net, a minimum of the empirical loss) and
a stand-in for the study's cut-off (a digits checkpoint from tiny_ckpts), each on a small subset and on the whole
training set; the extreme eigenvalues against the dense Hessian's on the same samples."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from helpers import reference_hessian

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_page_shows_lambda_min_on_growing_subsets_matching_the_dense_hessian(tmp_path, monkeypatch, tiny_ckpts):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("cutoff_curvature", SCRIPTS / "cutoff_curvature.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    suite = sys.modules["validate_llc"]
    cutoff = next(tiny_ckpts.glob("*-trunk")) / "epoch-0002.safetensors"
    monkeypatch.setattr(script, "cutoff_checkpoint", lambda out, data, device: cutoff)
    monkeypatch.setattr(script, "CONTROL", "dln-8x3-r3")  # 8-8-8-8-8, 256 parameters, n = 990
    monkeypatch.setattr(script, "STUDY_SAMPLES", [64, 100_000])
    monkeypatch.setattr(script, "CONTROL_SAMPLES", [64, 990])
    monkeypatch.setattr(script, "LOCALIZATIONS", [10.0, 1000.0])  # below and above -nbeta lambda_min (about 40)
    doc = tmp_path / "docs" / "curvature.md"
    assert script.main(["--out", str(tmp_path / "out"), "--doc", str(doc)]) == 0

    subsets, whole = doc.read_text().split("## On the whole training set")
    rows = [line.split(" | ") for line in subsets.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 4
    control = next(c for c in suite.CASES if c.name == "dln-8x3-r3")
    trained = suite.checkpoints(control, tmp_path / "out" / "llc-truth")["trained"]
    for row, ckpt in zip(rows, [cutoff, cutoff, trained, trained]):
        samples, lambda_min, lambda_max = int(row[1].replace(",", "")), float(row[3]), float(row[4])
        eigenvalues = torch.linalg.eigvalsh(reference_hessian(suite.context_for(ckpt), samples))
        # the page prints 3 significant digits; Lanczos from the bottom is asked for a relative 1e-3
        assert lambda_min == pytest.approx(eigenvalues[0].item(), rel=5e-3, abs=1e-4)
        assert lambda_max == pytest.approx(eigenvalues[-1].item(), rel=5e-3)
    assert "- control: dln-8x3-r3 trained student (a minimum): lambda_min" in subsets

    # the whole training set: at the digits checkpoint gamma 10 leaves a downward direction, 1000 gives a shift;
    # at the control (full-batch gradient descent, near a minimum) the gradient is small and so is the shift
    shifts = [line.split(" | ") for line in whole.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row[3] for row in shifts] == ["10", "1000"] * 2
    assert shifts[0][6].startswith("none: a direction of curvature") and float(shifts[1][6].replace(",", "")) < 0
    assert "- study's cut-off (epoch 30, SGD trunk): gradient norm" in whole and "curves down by more than" in whole
    assert float(shifts[2][5]) < 0.01 and float(shifts[2][6].replace(",", "")) > -1  # LLC 27.5 there

    # --doc-only rebuilds the same page from the saved results, running nothing
    again = tmp_path / "again.md"
    monkeypatch.setattr(script, "cutoff_checkpoint", None)  # would fail if called
    assert script.main(["--out", str(tmp_path / "out"), "--doc", str(again), "--doc-only"]) == 0
    assert again.read_text() == doc.read_text()
