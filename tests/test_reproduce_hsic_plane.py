"""scripts/reproduce_hsic_plane.py end to end in its smoke mode: trains the HSIC study's network for one short
epoch, runs evaluate + hsic (pyglow preset) over its checkpoints and writes the page and its figure.

The smoke run uses scikit-learn's bundled 8x8 digits (the layer list works on 8x8 images), so it needs no
dataset package; the Fashion-MNIST default is exercised by tests/test_fashion_mnist.py's end-to-end test.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "reproduce_hsic_plane.py"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_smoke_run_writes_the_page_the_figure_and_one_hsic_row_per_checkpoint_and_layer(tmp_path):
    if not Path(sys.executable).with_name("train-ckpts").exists():
        pytest.skip("train-ckpts is not installed next to this python (pip install -e .)")
    import analyze

    out, doc = tmp_path / "out", tmp_path / "docs" / "hsic-plane.md"
    done = _run("--smoke", "--dataset", "digits", "--workers", "0", "--out", str(out), "--doc", str(doc), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # --smoke: 1,000 training images, batches of 64 -> 16 steps; a checkpoint every 4 steps plus the initial weights
    hsic = analyze.load(out / "ckpts" / "analysis")["hsic"]
    assert sorted(hsic.step.unique()) == [0, 4, 8, 12, 16]
    # every layer but the last (Y is the output): conv, flatten, dropout, dense, dropout, dense, dropout
    assert len(hsic) == 5 * 7 and hsic.groupby("step").size().eq(7).all()
    assert (hsic.estimator == "pyglow").all() and (hsic.sigma_x == 5).all() and (hsic.n_probe == 960).all()
    assert all(math.isfinite(v) and v > 0 for v in [*hsic.hsic_x, *hsic.hsic_y])

    text = doc.read_text()
    png = doc.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert f"]({png.name})" in text and "(do not edit by hand)" in text
    assert "instead of MNIST" in text and "reduced or modified run" in text
    for heading in ("## What was run", "## Timings on this machine", "| training |", "### conv2d_1 (= flatten_1, "
                    "dropout_1)", "### dense_1 (= dropout_2)"):
        assert heading in text
    assert "timings: training" in done.stdout and "dense_2 (= dropout_3)" in done.stdout

    # bad input: one line on stderr, exit status 2, nothing run
    bad = _run("--epochs", "0", "--out", str(tmp_path / "never"), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--epochs" in bad.stderr
    assert not (tmp_path / "never").exists()
