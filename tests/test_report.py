"""The HTML report: built from a synthetic but schema-correct analysis folder, checked as data (figures,
epoch alignment, skipped sections) and rendered in a real headless Chromium (console errors fail the test).

    python tests/test_report.py PNG      writes a screenshot of the synthetic report (e.g. for docs)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyze import load as load_tables
from analyze.report import find_chromium, render, report_figures, screenshot, write_report
from analyze.xcorr import write_xcorr

FAMILY, TRUNK, SGD, NGD = "mlp-2x16", "mlp-2x16-trunk", "mlp-2x16-swap-sgd", "mlp-2x16-swap-ngd"
STD_FAMILY, STD_SGD, STD_NGD = "cnn-1", "cnn-1-sgd", "cnn-1-ngd"
CUT, LAST = 3, 6
STEPS_PER_EPOCH = 10
LAYERS = ("fc1", "relu1", "out")


# ================================================================================ synthetic folder

def _keys(run: str, optimizer: str, epoch: int, step: int, config: str, n: int = 1) -> pd.DataFrame:
    return pd.DataFrame({"run": pd.Series([run] * n, dtype=str), "optimizer": pd.Series([optimizer] * n, dtype=str),
                         "epoch": pd.Series([epoch] * n, dtype="int64"), "step": pd.Series([step] * n, dtype="int64"),
                         "ckpt_hash": pd.Series([f"h-{run}-{epoch}-{step}"] * n, dtype=str),
                         "config_hash": pd.Series([config] * n, dtype=str)})


def _rows(run, optimizer, epoch, step, config, frame: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([_keys(run, optimizer, epoch, step, config, len(frame)), frame.reset_index(drop=True)], axis=1)


def checkpoints():
    """(run, optimizer, epoch, step) of every checkpoint: the swap family, a mid-epoch trunk checkpoint,
    and a standard family."""
    out = [(TRUNK, "sgd", e, STEPS_PER_EPOCH * e) for e in range(CUT + 1)]
    out += [(TRUNK, "sgd", 2, 15)]  # mid-epoch (--ckpt-every-steps): epoch 2, before its end at step 20
    for run, opt in ((SGD, "sgd"), (NGD, "ngd")):
        out += [(run, opt, e, STEPS_PER_EPOCH * e) for e in range(CUT + 1, LAST + 1)]
    return out


def llc_value(run: str, epoch: int) -> float:
    return 2.0 + 1.5 * epoch + (0.8 * (epoch - CUT) if run == NGD else 0.0)


def make_analysis(root: Path, standard: bool = True) -> Path:
    """A realistic analysis folder (parts + task markers, as `analyze` writes them) and a checkpoint folder
    with steps.parquet per run. Returns the analysis folder."""
    rng = np.random.default_rng(0)
    out, ckpts = root / "analysis", root / "ckpts"
    tables: dict[str, list[pd.DataFrame]] = {}

    def add(table, frame):
        tables.setdefault(table, []).append(frame)

    def val_loss(run, e):
        return 2.3 * np.exp(-0.6 * e) + 0.25 + (0.02 * (e - CUT) if run == SGD else 0.0)

    # ---------------------------------------------------------------- runs, training, steps
    spec = json.dumps({"type": "ffnn", "hidden_nodes": 16, "hidden_layers": 2})
    data = json.dumps({"name": "digits", "split_seed": 0})
    runs = [(TRUNK, "trunk", "sgd", None, None, 0, CUT), (SGD, "branch", "sgd", TRUNK, CUT, CUT, LAST),
            (NGD, "branch", "ngd", TRUNK, CUT, CUT, LAST)]
    if standard:
        runs += [(STD_SGD, "standard", "sgd", None, None, 0, 4), (STD_NGD, "standard", "ngd", None, None, 0, 4)]
    run_rows, training = [], []
    for run, role, opt, parent, cut, first, last in runs:
        fam = STD_FAMILY if run.startswith("cnn") else FAMILY
        folder = ckpts / run
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({
            "run": run, "family": fam, "role": role, "optimizer": {"name": opt, "lr": 0.05, "momentum": 0.9,
                                                                  "nesterov": True},
            "config": {"batch_size": 64, "num_epochs": LAST, "cut_off_epochs": CUT}}))
        run_rows.append({"run": run, "family": fam, "role": role, "optimizer": opt,
                         "experiment_type": "standard" if role == "standard" else "swap", "parent_run": parent,
                         "parent_epoch": cut, "status": "complete", "first_epoch": first, "last_epoch": last,
                         "lr": 0.05, "seed": 0, "model_spec": spec, "dataset_spec": data, "path": str(folder)})
        epochs = range(first + (1 if parent else 0), last + 1)
        steps = []
        for e in epochs:
            v = val_loss(run, e)
            training.append({"run": run, "epoch": e, "step": STEPS_PER_EPOCH * e, "train_loss": v - 0.05,
                             "train_acc": 1 - v / 3, "val_loss": v, "val_acc": 1 - v / 2.5, "test_loss": v + 0.01,
                             "test_acc": 1 - v / 2.4, "update_norm_mean": np.nan if e == 0 else 0.1 / e,
                             "seconds": 0.5})
            for k in range(1, STEPS_PER_EPOCH + 1) if e > 0 else ():
                steps.append({"epoch": e, "step": STEPS_PER_EPOCH * (e - 1) + k, "loss": v + rng.normal(0, 0.02),
                              "update_norm": 0.1 / e + rng.normal(0, 0.005), "lr": 0.05})
        pd.DataFrame(steps, columns=["epoch", "step", "loss", "update_norm", "lr"]).to_parquet(folder / "steps.parquet")
    runs_frame = pd.DataFrame(run_rows).astype({"parent_epoch": "Int64", "first_epoch": "Int64",
                                                 "last_epoch": "Int64", "seed": "Int64"})
    training = pd.DataFrame(training)

    # ---------------------------------------------------------------- per-checkpoint tables
    ckpt_list = checkpoints()
    if standard:
        ckpt_list += [(r, o, e, STEPS_PER_EPOCH * e) for r, o in ((STD_SGD, "sgd"), (STD_NGD, "ngd")) for e in range(5)]
    for run, opt, e, step in ckpt_list:
        mid = step != STEPS_PER_EPOCH * e
        v = val_loss(run, e)
        lam = 999.0 if mid else llc_value(run, e)  # a mid-epoch checkpoint must never land on an epoch's point
        if run == STD_NGD and e == 0:
            lam = -30.0  # an untrained checkpoint: the chains find lower loss (no not_at_minimum column: old table)
        diverged = run == NGD and e == LAST
        add("evaluate", _rows(run, opt, e, step, "ev", pd.DataFrame({
            "split": ["train", "val", "test"], "loss": [v - 0.05, v, v + 0.01], "accuracy": [0.9, 0.85, 0.84],
            "n": [1168, 270, 359]})))
        add("llc", _rows(run, opt, e, step, "llc1", pd.DataFrame([{
            "llc_mean": lam, "llc_std": 0.4, "llc_sem": 0.2, "llc_per_chain": [lam - 0.3, lam, lam + 0.3],
            "init_loss": v - 0.05, "mean_sampled_loss": v - 0.05 + lam / 160, "wbic": 1168 * (v - 0.05) + lam,
            "wbic_exact": False, "nbeta": 165.4, "lr": 1e-4, "localization": 100.0, "n_chains": 3, "n_draws": 80,
            "n_burnin": 20, "batch_size": 128, "n": 1168, "rhat": 1.4 if diverged else 1.01, "ess": 150.0,
            "diverged": diverged, "n_diverged": 1 if diverged else 0, "left_basin": False, "chains_left_basin": 0,
            "chance_loss": 2.3026, "backend": "fast", "sampler": "sgld", "seconds": 1.0}])))
        draws = np.arange(-20, 80)
        chains = []
        for c in range(3):
            walk = v - 0.05 + lam / 160 * (1 - np.exp(-(draws + 20) / 15)) + rng.normal(0, 0.01, len(draws))
            chains.append(pd.DataFrame({"chain": c, "draw": draws, "loss": walk, "burnin": draws < 0}))
        add("llc_chains", _rows(run, opt, e, step, "llc1", pd.concat(chains, ignore_index=True)))
        if run.startswith("cnn"):
            continue  # the standard family has no curvature/HSIC estimates
        top = sorted(np.abs(rng.normal(3 + e, 1, 5)), reverse=True)
        rank = 40.0 - 2 * e
        add("hessian", _rows(run, opt, e, step, "hes1", pd.DataFrame([{
            "trace": 30 - e + rng.normal(0, 1), "trace_stderr": 1.5, "trace_method": "hutchpp",
            "trace_exact": 30.0 - e, "n_probes": 12, "top_eigenvalues": list(top), "lambda_max": top[0],
            "rank_estimate": rank, "rank_threshold": 0.01, "rank_method": "slq", "n_params": 610, "n_samples": 1168,
            "backend": "curvlinops", "seconds": 2.0}])))
        spectrum = []
        for r in range(2):
            nodes = np.sort(np.concatenate([rng.normal(0, 0.05, 25), rng.uniform(0.5, top[0], 5)]))
            weights = rng.dirichlet(np.ones(len(nodes)))
            spectrum.append(pd.DataFrame({"slq_run": r, "node": nodes, "weight": weights}))
        add("hessian_spectrum", _rows(run, opt, e, step, "hes1", pd.concat(spectrum, ignore_index=True)))
        if not (run == NGD and e == 5):  # that task failed: an errors row below
            add("fim", _rows(run, opt, e, step, "fim1", pd.DataFrame([{
                "trace_diag": 28.0 - e, "trace_kfac": 29.0 - e, "n_samples": 1168, "seconds": 0.2}])))
        add("hsic", _rows(run, opt, e, step, "hs1", pd.DataFrame({
            "layer": np.arange(len(LAYERS)), "layer_name": list(LAYERS),
            "hsic_x": [0.9 - 0.02 * e * (i + 1) for i in range(len(LAYERS))],
            "hsic_y": [0.3 + 0.05 * e + 0.02 * i for i in range(len(LAYERS))],
            "estimator": "normalized", "kernel": "gaussian", "sigma_x": 8.2, "sigma_y": np.nan, "sigma_t": 9.0,
            "y_source": "labels", "n_probe": 270})))
        add("weights", _rows(run, opt, e, step, "w1", pd.DataFrame({
            "layer": [0, 1], "layer_name": ["fc1", "out"], "shape": ["16x64", "10x16"], "spectral_norm": [2.5, 3.0],
            "frobenius_norm": [5.2, 5.1], "stable_rank": [4.3, 2.9], "alpha": [4.2, np.nan], "n_eigenvalues": [16, 10]})))
    cal = []
    for c in (0.01, 0.03, 0.1):
        for loc in ("10", "100"):
            lr = c / 165.4
            cal.append({"lr_option": f"{c}/nbeta", "localization_option": loc, "lr": lr, "localization": float(loc),
                        "nbeta_option": "n/log n", "nbeta": 165.4, "lr_nbeta": c, "n_draws": round(30 / c),
                        "llc_mean": 5.0 + 10 * c, "llc_std": 0.5, "llc_sem": 0.3, "drift": 0.4, "rhat": 1.02,
                        "ess": 120.0, "diverged": c == 0.1, "left_basin": False, "healthy": c < 0.1,
                        "llc_at_larger_step": 5.1, "agrees_with_larger_step": c == 0.01, "init_loss": 0.3,
                        "mean_sampled_loss": 0.33, "recommended": c == 0.01 and loc == "100"})
    add("calibration", _rows(TRUNK, "sgd", CUT, STEPS_PER_EPOCH * CUT, "cal1", pd.DataFrame(cal)))
    errors = _rows(NGD, "ngd", 5, 50, "fim1", pd.DataFrame([{
        "estimator": "fim", "error": "RuntimeError", "message": "synthetic failure: out of memory",
        "path": str(ckpts / NGD / "epoch-0005.safetensors"), "traceback": "Traceback ..."}]))

    # ---------------------------------------------------------------- write like the store does
    (out / "_tasks").mkdir(parents=True)
    (out / "runs").mkdir()
    (out / "training").mkdir()
    (out / "errors").mkdir()
    runs_frame.to_parquet(out / "runs" / "runs.parquet", index=False)
    training.to_parquet(out / "training" / "epochs.parquet", index=False)
    errors.to_parquet(out / "errors" / "part-failedtask.parquet", index=False)
    for table, frames in tables.items():
        (out / table).mkdir()
        whole = pd.concat(frames, ignore_index=True)
        for (run, step), part in whole.groupby(["run", "step"], sort=False):
            key = f"{table}-{run}-{step}"
            part.to_parquet(out / table / f"part-{key}.parquet", index=False)
            (out / "_tasks" / f"{key}.json").write_text(json.dumps({"estimator": table}))
    return out


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
