"""Runs as the tables describe them: lineage (which run a swap branch continues) and per-epoch series.

The xcorr post-processor and the report share these. A swap branch has no checkpoints before its
cut-off: its history is its parent's (the trunk's) up to the cut-off epoch followed by its own epochs.
Per-epoch series use epoch-end checkpoints only (mid-epoch ones are left out): the training log's step
for the epoch where it has one, otherwise the largest step any table holds for that (run, epoch).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from analyze.tables import XCORR_TABLE, most_common_config, present

SERIES_USE = "series use"  # who reads the most common config, for most_common_config's warning
KEY_COLUMNS = ("run", "epoch", "step")
# table -> {column: series name}: per-checkpoint scalars (one row per checkpoint)
SCALAR_SOURCES = {
    "llc": {"llc_mean": "llc", "wbic": "wbic"},
    "hessian": {"lambda_max": "hessian_lambda_max"},
    "fim": {"trace_diag": "fim_trace"},
}
TRAINING_SERIES = {"train_loss": "train_loss", "val_loss": "val_loss", "test_loss": "test_loss", "val_acc": "val_acc"}
EVALUATE_SERIES = {("train", "loss"): "train_loss", ("val", "loss"): "val_loss", ("test", "loss"): "test_loss",
                   ("val", "accuracy"): "val_acc"}




def run_parents(tables: dict[str, pd.DataFrame]) -> dict[str, tuple[str, int]]:
    """run -> (parent run, cut-off epoch) for every swap branch.

    From the `runs` table; without one, a run named `<family>-swap-<opt>` whose `<family>-trunk` has data
    is taken as its branch, cut off at the epoch before the branch's first (the trainer's naming).
    """
    parents: dict[str, tuple[str, int]] = {}
    runs = tables.get("runs")
    if runs is not None and len(runs) and {"run", "parent_run", "parent_epoch"} <= set(runs.columns):
        for row in runs.itertuples(index=False):
            if present(row.parent_run) and present(row.parent_epoch) and str(row.parent_run):
                parents[str(row.run)] = (str(row.parent_run), int(row.parent_epoch))
        return parents
    first: dict[str, int] = {}
    for frame in tables.values():
        if frame is not None and len(frame) and {"run", "epoch"} <= set(frame.columns):
            for run, epoch in frame.groupby("run", observed=True)["epoch"].min().items():
                first[str(run)] = min(first.get(str(run), int(epoch)), int(epoch))
    for run, epoch in first.items():
        m = re.fullmatch(r"(.+)-swap-[^-]+", run)
        if m and f"{m.group(1)}-trunk" in first and epoch > 0:
            parents[run] = (f"{m.group(1)}-trunk", epoch - 1)
    return parents


def lineage(run: str, parents: dict[str, tuple[str, int]]) -> list[tuple[str, int | None, int | None]]:
    """[(run, first epoch taken, last epoch taken)] from the root ancestor to `run`: the segments whose
    concatenation is the run's history (the root from its start, a branch after its parent's cut-off)."""
    chain, seen, current, upto = [], {run}, run, None
    while True:
        parent = parents.get(current)
        chain.append((current, None if parent is None else parent[1] + 1, upto))
        if parent is None or parent[0] in seen:
            break
        seen.add(parent[0])
        current, upto = parent[0], parent[1]
    return chain[::-1]


# ------------------------------------------------------------------------------------------ series

def epoch_end_steps(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """(run, epoch) -> the step of the epoch-end checkpoint.

    The training log's step where it has the epoch (the global step at the end of the epoch); otherwise
    the largest step any table holds for that (run, epoch).
    """
    frames = []
    for name, frame in tables.items():
        if name in ("training", "runs", "epochs", XCORR_TABLE) or frame is None or not len(frame):
            continue
        if set(KEY_COLUMNS) <= set(frame.columns):
            frames.append(frame[list(KEY_COLUMNS)])
    ends = (pd.concat(frames).groupby(["run", "epoch"], observed=True)["step"].max().rename("end_step")
            if frames else pd.Series(dtype="int64", name="end_step"))
    training = tables.get("training")
    if training is not None and len(training) and set(KEY_COLUMNS) <= set(training.columns):
        logged = training.groupby(["run", "epoch"], observed=True)["step"].max().rename("end_step")
        ends = pd.concat([logged, ends[~ends.index.isin(logged.index)]]) if len(ends) else logged
    out = ends.reset_index()
    if not len(out):
        return pd.DataFrame({"run": pd.Series(dtype=str), "epoch": pd.Series(dtype="int64"),
                             "end_step": pd.Series(dtype="int64")})
    out["run"] = out["run"].astype(str)
    return out.astype({"epoch": "int64", "end_step": "int64"})


def epoch_end_rows(frame: pd.DataFrame, ends: pd.DataFrame) -> pd.DataFrame:
    """The rows of a per-checkpoint table that belong to epoch-end checkpoints (mid-epoch ones dropped)."""
    if frame is None or not len(frame):
        return frame
    if "step" not in frame.columns:
        return frame
    keys = frame[["run", "epoch"]].astype({"run": str, "epoch": "int64"})
    merged = keys.merge(ends, on=["run", "epoch"], how="left")
    keep = (merged["end_step"].isna() | (frame["step"].to_numpy() == merged["end_step"].to_numpy()))
    return frame[keep.to_numpy()]




def _long(frame: pd.DataFrame, columns: dict[str, str]) -> list[pd.DataFrame]:
    out = []
    for column, series in columns.items():
        if column in frame.columns:
            part = pd.DataFrame({"run": frame["run"].astype(str).to_numpy(),
                                 "epoch": frame["epoch"].astype("int64").to_numpy(),
                                 "series": series, "value": pd.to_numeric(frame[column], errors="coerce").to_numpy(
                                     dtype=float, na_value=np.nan)})
            out.append(part)
    return out


def own_series(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Every run's own per-epoch series, long: run, epoch, series, value (epoch-end rows, finite values;
    no joining of branches to parents)."""
    ends = epoch_end_steps(tables)
    parts: list[pd.DataFrame] = []
    training = tables.get("training")
    if training is not None and len(training):
        rows = training.sort_values(["run", "epoch", "step"] if "step" in training else ["run", "epoch"])
        rows = rows.drop_duplicates(["run", "epoch"], keep="last")
        parts += _long(rows, TRAINING_SERIES)
    evaluate = tables.get("evaluate")
    if evaluate is not None and len(evaluate) and {"split", "loss"} <= set(evaluate.columns):
        ev = epoch_end_rows(most_common_config(evaluate, "evaluate", SERIES_USE), ends)
        for (split, column), series in EVALUATE_SERIES.items():
            sel = ev[ev["split"] == split]
            if column in sel.columns and len(sel):
                parts += _long(sel.drop_duplicates(["run", "epoch"], keep="last"), {column: series})
    for table, columns in SCALAR_SOURCES.items():
        frame = tables.get(table)
        if frame is not None and len(frame):
            frame = epoch_end_rows(most_common_config(frame, table, SERIES_USE), ends)
            frame = frame.drop_duplicates(["run", "epoch"], keep="last")
            parts += _long(frame, columns)
    hessian = tables.get("hessian")
    if hessian is not None and len(hessian) and ("trace" in hessian or "trace_exact" in hessian):
        h = epoch_end_rows(most_common_config(hessian, "hessian", SERIES_USE), ends)
        h = h.drop_duplicates(["run", "epoch"], keep="last")
        trace = pd.to_numeric(h["trace"], errors="coerce") if "trace" in h else pd.Series(np.nan, index=h.index)
        if "trace_exact" in h:
            exact = pd.to_numeric(h["trace_exact"], errors="coerce")
            trace = exact.where(exact.notna(), trace)
        parts += _long(h.assign(_trace=trace), {"_trace": "hessian_trace"})
        if "lambda_max" not in h and "top_eigenvalues" in h:
            top = h["top_eigenvalues"].map(lambda v: float(v[0]) if present(v) and len(v) else np.nan)
            parts += _long(h.assign(_top=top), {"_top": "hessian_lambda_max"})
    hsic = tables.get("hsic")
    if hsic is not None and len(hsic) and {"hsic_x", "hsic_y"} <= set(hsic.columns):
        hs = epoch_end_rows(most_common_config(hsic, "hsic", SERIES_USE), ends)
        names = hs["layer_name"].astype(str) if "layer_name" in hs else hs["layer"].astype(str)
        for name in pd.unique(names):
            layer_rows = hs[(names == name).to_numpy()].drop_duplicates(["run", "epoch"], keep="last")
            parts += _long(layer_rows, {"hsic_x": f"hsic_x:{name}", "hsic_y": f"hsic_y:{name}"})
    if not parts:
        return pd.DataFrame({"run": pd.Series(dtype=str), "epoch": pd.Series(dtype="int64"),
                             "series": pd.Series(dtype=str), "value": pd.Series(dtype=float)})
    long = pd.concat(parts, ignore_index=True)
    long = long[np.isfinite(long["value"].to_numpy(dtype=float))]
    # the training log wins over `evaluate` for the same series and epoch (first occurrence kept)
    return long.drop_duplicates(["run", "epoch", "series"], keep="first").reset_index(drop=True)


def run_series(tables: dict[str, pd.DataFrame], join_parents: bool = True) -> pd.DataFrame:
    """Per-epoch series of every run, long: run, epoch, series, value, source_run.

    With join_parents, a swap branch's series are its parent's up to the cut-off epoch followed by its
    own (source_run says which run a value comes from). Only epochs that exist are listed.
    """
    own = own_series(tables)
    own["source_run"] = own["run"]
    if not join_parents:
        return own
    parents = run_parents(tables)
    runs = sorted(set(own["run"]) | set(parents))
    by_run = {run: frame for run, frame in own.groupby("run", sort=False)}
    parts = []
    for run in runs:
        for source, first, last in lineage(run, parents):
            frame = by_run.get(source)
            if frame is None:
                continue
            keep = np.ones(len(frame), bool)
            if first is not None:
                keep &= frame["epoch"].to_numpy() >= first
            if last is not None:
                keep &= frame["epoch"].to_numpy() <= last
            parts.append(frame[keep].assign(run=run, source_run=source))
    if not parts:
        return own.iloc[:0]
    return pd.concat(parts, ignore_index=True).sort_values(["run", "series", "epoch"], ignore_index=True)
