"""A synthetic but schema-correct analysis folder for the report's tests: a swap family (trunk, SGD and
NGD branches, a mid-epoch trunk checkpoint, a failed task) and a standard family, with the parts, task
markers and checkpoint folders (steps.parquet) that `analyze` writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

FAMILY, TRUNK, SGD, NGD = "mlp-2x16", "mlp-2x16-trunk", "mlp-2x16-swap-sgd", "mlp-2x16-swap-ngd"
STD_FAMILY, STD_SGD, STD_NGD = "cnn-1", "cnn-1-sgd", "cnn-1-ngd"
CUT, LAST = 3, 6
STEPS_PER_EPOCH = 10
LAYERS = ("fc1", "relu1", "out")


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
