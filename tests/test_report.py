"""The HTML report: built from a synthetic but schema-correct analysis folder, checked as data (figures,
epoch alignment, skipped sections) and rendered in a real headless Chromium (console errors fail the test).

    python tests/test_report.py PNG      writes a screenshot of the synthetic report (e.g. for docs)
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from analyze import load as load_tables
from analyze.report import find_chromium, render, report_figures, screenshot, write_report
from analyze.xcorr import write_xcorr
from synthetic_analysis import (CUT, FAMILY, NGD, STD_FAMILY, STEPS_PER_EPOCH, TRUNK, llc_value,
                                make_analysis)


@pytest.fixture(scope="module")
def analysis(tmp_path_factory) -> Path:
    return make_analysis(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def report(analysis) -> Path:
    write_xcorr(analysis)
    return write_report(analysis)


# ================================================================================ content

EXPECTED_KINDS = ("loss", "update-norms", "llc", "wbic", "curvature", "llc-rank", "spectrum", "chains", "hsic", "xcorr")


def test_report_has_every_section(report, analysis):
    assert report == analysis / "report.html"
    text = report.read_text()
    for kind in EXPECTED_KINDS:
        assert f'id="fig-{FAMILY}-{kind}"' in text, kind
    # plotly.js embedded exactly once, figures without their own copy
    from plotly.offline import get_plotlyjs

    assert text.count(get_plotlyjs()[:300]) == 1
    figures = report_figures(load_tables(analysis))
    assert text.count('class="plotly-graph-div"') == len(figures)
    # calibration table with the recommended row highlighted, diagnostics, settings
    assert "LLC calibration" in text and 'class="hl"' in text
    plateau = figures[f"fig-{FAMILY}-calibration"]  # LLC against the step, one line per localization
    assert len(plateau.data) == 2 and list(plateau.data[0].x) == [0.01, 0.03, 0.1]
    assert list(plateau.data[1].marker.symbol) == ["circle", "circle", "circle-open"]  # the diverged step hollow
    assert "sampler diverged" in text and "R-hat 1.400" in text
    assert text.count("not at a local minimum — the chains found lower loss") == 1 and "(LLC -30 ± 0.2)" in text
    assert "synthetic failure: out of memory" in text
    assert "Settings" in text and "localization" in text and "n_probes" in text and "momentum" in text
    assert "calibration: not computed for this family" in text  # the standard family has none
    assert not list(analysis.glob(".tmp-*"))


def test_epochs_are_aligned_and_branches_start_at_the_cutoff(analysis):
    figs = report_figures(load_tables(analysis))
    llc = {t.name: t for t in figs[f"fig-{FAMILY}-llc"].data}
    trunk = llc["trunk (sgd) LLC"]
    assert list(trunk.x) == [0, 1, 2, 3]  # epoch e's LLC at epoch e; the mid-epoch 999 is not plotted
    np.testing.assert_allclose(trunk.y, [llc_value(TRUNK, e) for e in range(4)])
    ngd = llc["ngd after swap LLC"]
    assert list(ngd.x) == [3, 4, 5, 6]  # drawn from the trunk's cut-off epoch
    np.testing.assert_allclose(ngd.y, [llc_value(TRUNK, 3)] + [llc_value(NGD, e) for e in (4, 5, 6)])
    assert list(llc["ngd after swap val loss"].x) == [3, 4, 5, 6]
    assert np.all(np.asarray(ngd.error_y.array) == pytest.approx(0.2))
    assert set(trunk.marker.symbol) == {"circle"}
    std = next(t for t in figs[f"fig-{STD_FAMILY}-llc"].data if t.name.endswith("LLC") and "ngd" in t.name)
    assert list(std.marker.symbol) == ["circle-open"] + ["circle"] * 4  # epoch 0 is not at a minimum
    # the y-axis spans the estimates at a minimum (with their error bars), not epoch 0's negative LLC
    low, high = figs[f"fig-{STD_FAMILY}-llc"].layout.yaxis.range
    shown = [(t.y[1:] if t.marker.symbol[0] == "circle-open" else t.y, np.asarray(t.error_y.array))
             for t in figs[f"fig-{STD_FAMILY}-llc"].data if t.name.endswith("LLC")]
    assert low > min(t.y[0] for t in figs[f"fig-{STD_FAMILY}-llc"].data if t.name.endswith("LLC"))
    assert low <= min(min(y) for y, _ in shown) - 0.2 and high >= max(max(y) for y, _ in shown) + 0.2

    loss = {t.name: t for t in figs[f"fig-{FAMILY}-loss"].data}
    assert list(loss["trunk (sgd) validation"].x) == [0, 1, 2, 3]
    assert list(loss["sgd after swap train"].x) == [3, 4, 5, 6]

    norms = figs[f"fig-{FAMILY}-update-norms"]
    assert "per step" in norms.layout.title.text  # steps.parquet found through runs.path
    trunk_norm = next(t for t in norms.data if t.name.startswith("trunk"))
    assert len(trunk_norm.x) == CUT * STEPS_PER_EPOCH and trunk_norm.x[-1] == pytest.approx(CUT)

    rank = {t.name: t for t in figs[f"fig-{FAMILY}-llc-rank"].data}
    assert "LLC = rank/2" in rank
    np.testing.assert_allclose(rank["trunk (sgd)"].x, [(40.0 - 2 * e) / 2 for e in range(4)])

    hsic = [t for t in figs[f"fig-{FAMILY}-hsic"].data if t.name == "fc1"]
    assert len(hsic) == 3  # trunk and two branches
    epochs = np.asarray(hsic[0].customdata)[:, 0]  # the trunk: the mid-epoch checkpoint at 1.5
    np.testing.assert_allclose(epochs, [0, 1, 1.5, 2, 3])
    assert np.asarray(hsic[2].customdata)[0, 0] == 3  # a branch starts at the cut-off point

    chains = figs[f"fig-{FAMILY}-chains"]
    titles = " ".join(a.text for a in chains.layout.annotations)
    assert "epoch 0 (first)" in titles and "epoch 3 (cut-off)" in titles and "epoch 6 (last)" in titles
    assert "R̂ 1.400 ⚠" in titles

    spectrum = figs[f"fig-{FAMILY}-spectrum"]
    assert spectrum.layout.yaxis.type == "log" and len(spectrum.data) == 4

    xcorr = figs[f"fig-{FAMILY}-xcorr"]
    assert {a.text for a in xcorr.layout.annotations} >= {"val_loss vs wbic", "val_loss vs llc",
                                                          "llc vs hessian_trace"}
    assert all(np.all(np.abs(np.asarray(t.y)) <= 1 + 1e-9) for t in xcorr.data)


def test_missing_tables_are_skipped_gracefully(tmp_path):
    full = make_analysis(tmp_path / "a", standard=False)
    # only the run list and the training log
    for table in ("llc", "llc_chains", "hessian", "hessian_spectrum", "fim", "hsic", "weights", "calibration",
                  "evaluate", "errors"):
        shutil.rmtree(full / table)
    path = write_report(full)
    text = path.read_text()
    assert f'id="fig-{FAMILY}-loss"' in text and f'id="fig-{FAMILY}-update-norms"' in text
    for kind in ("llc", "wbic", "curvature", "llc-rank", "spectrum", "chains", "hsic"):
        assert f'id="fig-{FAMILY}-{kind}"' not in text
    assert "llc: not computed" in text and "hsic: not computed" in text and "spectrum: not computed" in text
    assert "calibration: not computed" in text

    # no runs table, no training log: families and parents inferred from run names
    only = tmp_path / "b"
    shutil.copytree(make_analysis(tmp_path / "c", standard=False), only)
    for table in ("runs", "training"):
        shutil.rmtree(only / table)
    figs = report_figures(load_tables(only))
    assert f"fig-{FAMILY}-llc" in figs
    ngd = next(t for t in figs[f"fig-{FAMILY}-llc"].data if "ngd" in t.name and "LLC" in t.name)
    assert list(ngd.x) == [3, 4, 5, 6]

    # an empty folder
    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_report(empty).read_text()
    assert "No runs found" in text and "plotly-graph-div" not in text


# ================================================================================ browser

def _chromium_or_skip() -> str:
    binary = find_chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but Chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("Chromium not installed (apt-get install chromium); the report's browser test needs it")
    return binary


def test_report_renders_in_chromium_without_errors(report, tmp_path):
    _chromium_or_skip()
    png = tmp_path / "report.png"
    result = render(report, png, width=1400, height=1100, full_page=True)
    assert not result.timed_out
    assert result.errors == [], result.errors
    assert result.plotly_loaded
    n_divs = report.read_text().count('class="plotly-graph-div"')
    assert len(result.figures) == n_divs >= len(EXPECTED_KINDS)
    assert result.empty_figures == [], [f for f in result.figures if f["id"] in result.empty_figures]
    assert all(f["height"] > 100 and f["width"] > 300 for f in result.figures)
    assert [f["id"] for f in result.figures if f["overflow"]] == []  # every plot fits its card
    # a real picture: large enough and not blank
    assert png.stat().st_size > 50_000
    pixels = _grey_pixels(png)
    assert pixels.shape[1] == 1400 and pixels.shape[0] > 3000  # the whole page
    assert not _looks_blank(pixels)


def _grey_pixels(png: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(png).convert("L"), dtype=float)


def _looks_blank(pixels: np.ndarray) -> bool:
    """Too little contrast or ink for lines, text and markers: a white (or uniform) page."""
    return bool(pixels.std() <= 15 or (pixels < 200).mean() <= 0.01)


def test_a_blank_page_is_detected(tmp_path):
    """The pixel check the report's test relies on says "blank" for a page that draws nothing."""
    _chromium_or_skip()
    page = tmp_path / "blank.html"
    page.write_text("<!DOCTYPE html><html><body style='background:#fafafa'></body></html>")
    result = render(page, tmp_path / "blank.png", width=800, height=600, timeout=20)
    assert result.errors == [] and result.figures == []
    assert _looks_blank(_grey_pixels(tmp_path / "blank.png"))


def test_console_errors_and_empty_figures_are_detected(tmp_path):
    """The capture itself works: an uncaught exception, console.error and an unrendered figure are reported."""
    _chromium_or_skip()
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><div class='plotly-graph-div' id='never-drawn'></div>"
                    "<script>console.error('deliberate console error');</script>"
                    "<script>undefinedFunctionCall();</script></body></html>")
    result = render(page, timeout=20)
    text = "\n".join(result.errors)
    assert "deliberate console error" in text
    assert "undefinedFunctionCall" in text
    assert result.empty_figures == ["never-drawn"]
    assert not result.plotly_loaded


def test_the_browser_leaves_nothing_in_the_temp_folder(tmp_path, monkeypatch):
    """Chromium shuts down cleanly, so the folder it keeps for its singleton socket under $TMPDIR
    (org.chromium.Chromium.*) goes too: one per render used to pile up in /tmp."""
    _chromium_or_skip()
    import tempfile

    # a short $TMPDIR: Chromium refuses a socket path over ~108 characters, which tmp_path can exceed
    temp = Path(tempfile.mkdtemp(prefix="ckpt-chromium-temp-", dir="/tmp"))
    try:
        monkeypatch.setenv("TMPDIR", str(temp))
        monkeypatch.setattr(tempfile, "tempdir", None)  # re-read $TMPDIR
        page = tmp_path / "page.html"
        page.write_text("<!DOCTYPE html><html><body>hello</body></html>")
        assert render(page, timeout=20).errors == []
        assert list(temp.iterdir()) == []
    finally:
        shutil.rmtree(temp)


def test_screenshot_command(report, tmp_path):
    _chromium_or_skip()
    from analyze.report.cli import main

    png = tmp_path / "shot.png"
    assert main(["--screenshot", str(report), str(png), "--width", "1000", "--height", "700"]) == 0
    from PIL import Image

    assert Image.open(png).size == (1000, 700)


if __name__ == "__main__":  # a screenshot of the synthetic report, e.g. python tests/test_report.py docs/report.png
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_analysis(Path(tmp))
        write_xcorr(folder)
        print(screenshot(write_report(folder), sys.argv[1] if len(sys.argv) > 1 else "report.png"))
