"""The xcorr post-processor: alignment of swap branches to their trunk, lags, and both methods against
scipy.signal.correlate / np.corrcoef."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import signal

import analyze
from analyze.xcorr import (XCORR_FILE, XCORR_TABLE, compute_xcorr, expand_pairs, pearson_at_lags, raw_correlate,
                           run_series, write_xcorr)

KEYS = dict(optimizer="sgd", ckpt_hash="h", config_hash="c")


def keyed(run: str, epochs, step_of=lambda e: 10 * e, **columns) -> pd.DataFrame:
    epochs = np.asarray(list(epochs), dtype="int64")
    frame = pd.DataFrame({"run": run, "optimizer": KEYS["optimizer"], "epoch": epochs,
                          "step": np.array([step_of(e) for e in epochs], dtype="int64"),
                          "ckpt_hash": [f"{run}-{e}" for e in epochs], "config_hash": KEYS["config_hash"]})
    for name, values in columns.items():
        frame[name] = np.asarray(values, dtype=float)
    return frame


def training(run: str, epochs, val_loss, train_loss=None) -> pd.DataFrame:
    epochs = np.asarray(list(epochs), dtype="int64")
    train_loss = val_loss if train_loss is None else train_loss
    return pd.DataFrame({"run": run, "epoch": epochs, "step": 10 * epochs, "train_loss": np.asarray(train_loss, float),
                         "val_loss": np.asarray(val_loss, float)})


def runs_table(rows) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["run", "family", "role", "optimizer", "parent_run", "parent_epoch"])
    return frame.astype({"parent_epoch": "Int64"})


def rows(frame, run, a, b, method):
    sel = frame[(frame.run == run) & (frame.series_a == a) & (frame.series_b == b) & (frame.method == method)]
    return sel.set_index("lag").sort_index()


@pytest.fixture
def single_run():
    rng = np.random.default_rng(0)
    n = 12
    val = rng.normal(size=n).cumsum()
    llc = rng.normal(size=n).cumsum()
    tables = {"training": training("r", range(n), val),
              "llc": keyed("r", range(n), llc_mean=llc, wbic=rng.normal(size=n))}
    return tables, val, llc


def test_raw_correlate_equals_scipy(single_run):
    tables, val, llc = single_run
    out = rows(compute_xcorr(tables), "r", "val_loss", "llc", "raw_correlate")
    expected = signal.correlate(val, llc, mode="full")
    lags = signal.correlation_lags(len(val), len(llc), mode="full")
    assert list(out.index) == list(lags)
    np.testing.assert_array_equal(out["corr"].to_numpy(), expected)
    np.testing.assert_array_equal(out["n_overlap"].to_numpy(), len(val) - np.abs(lags))
    direct = raw_correlate(pd.Series(val), pd.Series(llc))
    np.testing.assert_array_equal(direct["corr"].to_numpy(), expected)


def test_pearson_lag0_and_shifted_lags_match_corrcoef(single_run):
    tables, val, llc = single_run
    n = len(val)
    out = rows(compute_xcorr(tables), "r", "val_loss", "llc", "pearson")
    # default max_lag: min(10, n - 3) for consecutive epochs
    assert list(out.index) == list(range(-(n - 3), n - 3 + 1))
    assert out.loc[0, "corr"] == pytest.approx(np.corrcoef(val, llc)[0, 1], abs=1e-12)
    assert out.loc[0, "n_overlap"] == n
    for lag in (1, 3, -2, -4):  # lag L pairs a[t + L] with b[t]
        if lag > 0:
            expected = np.corrcoef(val[lag:], llc[:-lag])[0, 1]
        else:
            expected = np.corrcoef(val[:lag], llc[-lag:])[0, 1]
        assert out.loc[lag, "corr"] == pytest.approx(expected, abs=1e-12)
        assert out.loc[lag, "n_overlap"] == n - abs(lag)
    assert out["n_overlap"].min() == 3
    assert out["corr"].notna().all()


def test_lag_convention_matches_scipy():
    """a follows b by 2 epochs (a[t] = b[t - 2]): the peak is at lag +2 in both methods."""
    rng = np.random.default_rng(1)
    b = rng.normal(size=30)
    a = np.concatenate([rng.normal(size=2), b[:-2]])
    sa, sb = pd.Series(a), pd.Series(b)
    pearson = pearson_at_lags(sa, sb, max_lag=5).set_index("lag")["corr"]
    assert pearson.idxmax() == 2 and pearson.loc[2] == pytest.approx(1.0)
    za, zb = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
    raw = raw_correlate(pd.Series(za), pd.Series(zb)).set_index("lag")["corr"]
    assert raw.idxmax() == 2


def test_long_series_default_max_lag_is_10():
    rng = np.random.default_rng(2)
    n = 40
    tables = {"training": training("r", range(n), rng.normal(size=n)),
              "llc": keyed("r", range(n), llc_mean=rng.normal(size=n), wbic=rng.normal(size=n))}
    out = rows(compute_xcorr(tables), "r", "val_loss", "wbic", "pearson")
    assert list(out.index) == list(range(-10, 11))
    out3 = rows(compute_xcorr(tables, max_lag=3), "r", "val_loss", "wbic", "pearson")
    assert list(out3.index) == [-3, -2, -1, 0, 1, 2, 3]


@pytest.fixture
def swap_tables():
    """Trunk epochs 0..3 (SGD), branches epochs 4..8; llc only on the branches; the trunk trained on
    past the cut-off (epochs 4, 5) must not leak into the branches."""
    rng = np.random.default_rng(3)
    trunk_val = rng.normal(size=6)            # epochs 0..5 (4 and 5 are past the cut-off)
    sgd_val, ngd_val = rng.normal(size=5), rng.normal(size=5)
    sgd_llc, ngd_llc = rng.normal(size=5), rng.normal(size=5)
    tables = {
        "runs": runs_table([("f-trunk", "f", "trunk", "sgd", None, None),
                            ("f-swap-sgd", "f", "branch", "sgd", "f-trunk", 3),
                            ("f-swap-ngd", "f", "branch", "ngd", "f-trunk", 3)]),
        "training": pd.concat([training("f-trunk", range(6), trunk_val),
                               training("f-swap-sgd", range(4, 9), sgd_val),
                               training("f-swap-ngd", range(4, 9), ngd_val)], ignore_index=True),
        "llc": pd.concat([keyed("f-swap-sgd", range(4, 9), llc_mean=sgd_llc, wbic=sgd_llc),
                          keyed("f-swap-ngd", range(4, 9), llc_mean=ngd_llc, wbic=ngd_llc)], ignore_index=True),
    }
    return tables, dict(trunk_val=trunk_val, sgd_val=sgd_val, sgd_llc=sgd_llc, ngd_val=ngd_val)


def test_swap_branch_joined_to_trunk_without_padding(swap_tables):
    tables, v = swap_tables
    series = run_series(tables)
    branch_val = series[(series.run == "f-swap-sgd") & (series.series == "val_loss")]
    assert list(branch_val.epoch) == list(range(9))
    assert list(branch_val.source_run) == ["f-trunk"] * 4 + ["f-swap-sgd"] * 5
    joined = np.concatenate([v["trunk_val"][:4], v["sgd_val"]])
    np.testing.assert_array_equal(branch_val.value.to_numpy(), joined)
    assert series["value"].notna().all()

    out = compute_xcorr(tables, pairs=[("val_loss", "llc"), ("val_loss", "train_loss")])
    # a series that exists only on the branch: aligned on epochs 4..8, lags |L| <= 5 - 3
    vl = rows(out, "f-swap-sgd", "val_loss", "llc", "pearson")
    assert list(vl.index) == [-2, -1, 0, 1, 2]
    assert list(vl.n_overlap) == [3, 4, 5, 4, 3]
    assert vl.loc[0, "corr"] == pytest.approx(np.corrcoef(v["sgd_val"], v["sgd_llc"])[0, 1])
    assert vl.loc[1, "corr"] == pytest.approx(np.corrcoef(v["sgd_val"][1:], v["sgd_llc"][:-1])[0, 1])
    assert vl.joined_parent.all()
    raw = rows(out, "f-swap-sgd", "val_loss", "llc", "raw_correlate")
    np.testing.assert_array_equal(raw["corr"].to_numpy(), signal.correlate(v["sgd_val"], v["sgd_llc"]))
    assert list(raw.n_overlap) == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    # both series on trunk + branch: 9 shared epochs
    vt = rows(out, "f-swap-sgd", "val_loss", "train_loss", "pearson")
    assert vt.loc[0, "n_overlap"] == 9 and vt.index.max() == 6
    # the trunk has no llc: no rows, and its own rows are not joined
    assert rows(out, "f-trunk", "val_loss", "llc", "pearson").empty
    assert not out[out.run == "f-trunk"].joined_parent.any()
    assert set(out.run) == {"f-trunk", "f-swap-sgd", "f-swap-ngd"}
    assert out["corr"].notna().all()


def test_branch_joined_by_name_without_runs_table(swap_tables):
    tables, v = swap_tables
    tables = {k: t for k, t in tables.items() if k != "runs"}
    tables["training"] = tables["training"][~((tables["training"].run == "f-trunk") & (tables["training"].epoch > 3))]
    series = run_series(tables)
    ngd = series[(series.run == "f-swap-ngd") & (series.series == "val_loss")]
    assert list(ngd.epoch) == list(range(9))
    np.testing.assert_array_equal(ngd.value.to_numpy(), np.concatenate([v["trunk_val"][:4], v["ngd_val"]]))


def test_fewer_than_three_shared_epochs_give_no_rows():
    rng = np.random.default_rng(4)
    tables = {"training": training("r", range(10), rng.normal(size=10)),
              # llc at 2 epochs only; wbic NaN except at 2 epochs; hessian constant
              "llc": keyed("r", [3, 7], llc_mean=[1.0, 2.0], wbic=[np.nan, 5.0]),
              "hessian": keyed("r", range(10), trace=np.ones(10))}
    out = compute_xcorr(tables, pairs="all")
    assert out[(out.series_a.isin(["llc", "wbic"])) | (out.series_b.isin(["llc", "wbic"]))].empty
    constant = (out.series_a == "hessian_trace") | (out.series_b == "hessian_trace")
    assert out[(out.method == "pearson") & constant].empty  # a constant series: no NaN rows
    # raw values: scipy's 2n - 1 lags, with train_loss and with val_loss
    assert len(out[(out.method == "raw_correlate") & constant]) == 2 * 19
    assert out["corr"].notna().all()
    assert list(out.columns) == ["run", "series_a", "series_b", "method", "lag", "corr", "n_overlap",
                                 "joined_parent"]


def test_gapped_epochs_lag_in_epochs():
    """LLC every 2 epochs: lags count epochs, so odd lags pair nothing and give no rows."""
    rng = np.random.default_rng(5)
    val = rng.normal(size=13)
    epochs = np.arange(0, 13, 2)
    llc = rng.normal(size=len(epochs))
    tables = {"training": training("r", range(13), val), "llc": keyed("r", epochs, llc_mean=llc, wbic=llc)}
    out = rows(compute_xcorr(tables, max_lag=6), "r", "val_loss", "llc", "pearson")
    assert list(out.index) == [-6, -4, -2, 0, 2, 4, 6]
    assert out.loc[2, "corr"] == pytest.approx(np.corrcoef(val[epochs][1:], llc[:-1])[0, 1])
    assert out.loc[2, "n_overlap"] == len(epochs) - 1


def test_mid_epoch_checkpoints_are_left_out():
    rng = np.random.default_rng(6)
    val = rng.normal(size=8)
    llc = rng.normal(size=8)
    ends = keyed("r", range(8), llc_mean=llc, wbic=llc)
    mid = keyed("r", [2, 5], step_of=lambda e: 10 * e - 5, llc_mean=[1e6, -1e6], wbic=[1e6, -1e6])
    tables = {"training": training("r", range(8), val), "llc": pd.concat([mid, ends], ignore_index=True)}
    series = run_series(tables)
    got = series[series.series == "llc"].set_index("epoch")["value"]
    np.testing.assert_array_equal(got.to_numpy(), llc)
    # without a training log, the largest step of the epoch is its end
    series = run_series({"llc": pd.concat([ends, mid], ignore_index=True)})
    np.testing.assert_array_equal(series[series.series == "llc"]["value"].to_numpy(), llc)


def test_hessian_trace_prefers_exact_and_hsic_layers():
    t = keyed("r", range(4), trace=[1.0, 2.0, 3.0, 4.0], trace_exact=[10.0, np.nan, 30.0, np.nan], lambda_max=[1, 2, 3, 5])
    hsic = pd.concat([keyed("r", range(4), layer=np.full(4, i), hsic_x=np.arange(4) + i, hsic_y=np.arange(4) * i)
                      .assign(layer_name=name) for i, name in enumerate(["fc1", "relu1"])], ignore_index=True)
    series = run_series({"hessian": t, "hsic": hsic})
    trace = series[series.series == "hessian_trace"]["value"].to_numpy()
    np.testing.assert_array_equal(trace, [10.0, 2.0, 30.0, 4.0])
    assert {"hsic_x:fc1", "hsic_y:relu1", "hessian_lambda_max"} <= set(series.series)
    assert expand_pairs(series.series, [("hessian_trace", "hsic_y:*")]) == [("hessian_trace", "hsic_y:fc1"),
                                                                            ("hessian_trace", "hsic_y:relu1")]


def test_write_xcorr_is_loaded_by_analyze_load(tmp_path, swap_tables):
    tables, _ = swap_tables
    out = tmp_path / "analysis"
    (out / "runs").mkdir(parents=True)
    (out / "training").mkdir()
    (out / "llc").mkdir()
    (out / "_tasks").mkdir()
    tables["runs"].to_parquet(out / "runs" / "runs.parquet")
    tables["training"].to_parquet(out / "training" / "epochs.parquet")
    tables["llc"].to_parquet(out / "llc" / "part-k1.parquet")
    (out / "_tasks" / "k1.json").write_text(json.dumps({"estimator": "llc"}))
    path = write_xcorr(out)
    assert path == out / XCORR_TABLE / XCORR_FILE
    written = pd.read_parquet(path)
    expected = compute_xcorr(tables)
    pd.testing.assert_frame_equal(written.reset_index(drop=True), expected.reset_index(drop=True),
                                  check_dtype=False)
    loaded = analyze.load(out)
    assert XCORR_TABLE in loaded and len(loaded[XCORR_TABLE]) == len(expected)
    assert not list((out / XCORR_TABLE).glob(".tmp-*"))
    # rewriting (from the loaded tables, which now hold xcorr) gives the same table
    write_xcorr(out)
    assert len(pd.read_parquet(path)) == len(expected)


def test_empty_tables_give_an_empty_typed_frame():
    out = compute_xcorr({})
    assert out.empty and list(out.columns)[:4] == ["run", "series_a", "series_b", "method"]
    assert str(out["lag"].dtype) == "int64"
