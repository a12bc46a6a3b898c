"""Settings section: every run's training settings and every estimator's configs."""

from __future__ import annotations

import json

import pandas as pd

from analyze.report.data import ReportData
from analyze.report.markup import esc, html_table

# estimator settings shown in the summary (those present)
CONFIG_COLUMNS = {
    "llc": ("sampler", "backend", "lr", "localization", "nbeta", "wbic_exact", "n_chains", "n_draws", "n_burnin",
            "batch_size", "n"),
    "hessian": ("backend", "engine", "trace_method", "n_probes", "rank_method", "rank_threshold", "n_samples",
                "n_params"),
    "fim": ("variant", "n_samples", "n_params"),
    "hsic": ("estimator", "kernel", "y_source", "n_probe"),
    "evaluate": ("split", "n"),
    "weights": (),
    "calibration": ("nbeta_option",),
}
OPTIMIZER_KEYS = ("lr", "momentum", "nesterov", "weight_decay", "alpha", "eta", "epsilon", "delta",
                  "refresh")  # NGD's --ngd-refresh, recorded only when not the default (exact)
CONFIG_KEYS = ("batch_size", "num_epochs", "cut_off_epochs", "dataset", "model_type")


def runs_settings(data: ReportData) -> pd.DataFrame:
    rows = []
    for family in data.families():
        for run in data.family_runs(family):
            info = data.infos[run]
            rec = info.record or {}
            opt = rec.get("optimizer") if isinstance(rec.get("optimizer"), dict) else {}
            cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}
            row = {"family": family, "run": run, "role": info.role, "optimizer": info.optimizer,
                   "parent": f"{info.parent} @ epoch {info.cut}" if info.parent else ""}
            runs = data.tables.get("runs")
            base = {}
            if runs is not None and "run" in runs:
                match = runs[runs["run"].astype(str) == run]
                base = match.iloc[0].to_dict() if len(match) else {}
            for key in ("status", "first_epoch", "last_epoch", "seed"):
                if key in base:
                    row[key] = base[key]
            for key in OPTIMIZER_KEYS:
                if key in opt:
                    row[key] = opt[key]
                elif key == "lr" and "lr" in base:
                    row[key] = base["lr"]
            for key in CONFIG_KEYS:
                if key in cfg:
                    row[key] = cfg[key]
            if "model_spec" in base or "model_spec" in rec:
                row["model"] = base.get("model_spec") or json.dumps(rec.get("model_spec"), sort_keys=True)
            if "dataset_spec" in base or "dataset_spec" in rec:
                row["dataset"] = base.get("dataset_spec") or json.dumps(rec.get("dataset_spec"), sort_keys=True)
            rows.append(row)
    return pd.DataFrame(rows)


def estimator_settings(data: ReportData) -> list[tuple[str, pd.DataFrame]]:
    out = []
    for table, columns in CONFIG_COLUMNS.items():
        frame = data.tables.get(table)
        if frame is None or not len(frame):
            continue
        cols = [c for c in columns if c in frame]
        key = ["config_hash"] if "config_hash" in frame else []
        if not key and not cols:
            continue
        g = frame.assign(_ckpt=frame["run"].astype(str) + ":" + frame["step"].astype(str)
                         if "step" in frame else frame["run"].astype(str))
        summary = g.groupby(key + cols, dropna=False, sort=True).agg(checkpoints=("_ckpt", "nunique"),
                                                                  runs=("run", "nunique")).reset_index()
        out.append((table, summary))
    return out


def settings_section(data: ReportData) -> str:
    parts = ['<section id="settings"><h2>Settings</h2><h3>Runs</h3>']
    runs = runs_settings(data)
    parts.append(html_table(runs) if len(runs) else '<p class="missing">no runs</p>')
    parts.append("<h3>Estimators</h3>")
    configs = estimator_settings(data)
    if not configs:
        parts.append('<p class="missing">no estimator tables</p>')
    for table, frame in configs:
        parts.append(f"<h4>{esc(table)}</h4>" + html_table(frame))
    parts.append("</section>")
    return "\n".join(parts)
