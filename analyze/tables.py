"""Reading an analysis folder into pandas: one DataFrame per table, plus the joined `epochs` frame."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd

from analyze.store import ERRORS_TABLE, TASKS_DIR, Store

RUN_EPOCH = ["run", "epoch", "step"]
XCORR_TABLE = "xcorr"  # written by the xcorr post-processor, over the other tables
EPOCHS_USE = "the epochs frame uses"  # for most_common_config's warning
# Per-checkpoint scalars the `epochs` frame picks up from tables that hold one row per checkpoint:
# table -> {column: column in `epochs`}. A new estimator's scalars are one line here.
EPOCH_SCALARS = {
    "llc": {"llc_mean": "llc_mean", "llc_sem": "llc_sem", "wbic": "wbic"},
    "hessian": {"trace": "hessian_trace", "trace_exact": "hessian_trace_exact"},
    "fim": {"trace_diag": "fim_trace_diag"},
}


def read_table(folder: Path, completed: set[str] | None = None) -> pd.DataFrame | None:
    """All parts of a table folder; with `completed`, only parts of complete tasks (a killed run can
    leave a part whose marker was never written; the next run rewrites it)."""
    files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith((".", "_")))
    if completed is not None:
        files = [p for p in files if not p.name.startswith("part-") or p.stem[len("part-"):] in completed]
    if not files:
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        arrow = pq.read_table([str(p) for p in files])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        # parts whose column types differ (say an all-null column, from an older version): read each part
        # and let Arrow promote null to the other parts' types
        arrow = pa.concat_tables([pq.read_table(str(p)) for p in files], promote_options="permissive")
    frame = arrow.to_pandas()
    if set(RUN_EPOCH) <= set(frame.columns):  # parts come in hash order; rows within a part keep theirs
        frame = frame.sort_values(RUN_EPOCH, kind="stable", ignore_index=True)
    return frame


class Tables(dict):
    """A dict of DataFrames (table name -> rows) that shows, in a notebook or with print, a summary of its
    tables, runs, epochs and estimator settings."""

    def __init__(self, path: str | Path = ".", *args, **kwargs):
        super().__init__(*args, **kwargs)  # Tables(path, {...}) also works, as dict({...}) does
        self.path = Path(path)

    def summary(self) -> pd.DataFrame:
        """One row per table: rows, runs, epochs, and the estimator settings of its rows."""
        settings = self._settings()
        rows = []
        for name, frame in self.items():
            runs = frame["run"].nunique() if "run" in frame else None
            epochs = _span(frame["epoch"]) if "epoch" in frame and len(frame) else ""
            configs = frame["config_hash"].dropna().unique() if "config_hash" in frame else []
            text = "; ".join(settings.get((name, c), c) for c in configs[:3]) + ("; ..." if len(configs) > 3 else "")
            rows.append({"table": name, "rows": len(frame), "runs": runs, "epochs": epochs, "settings": text})
        return pd.DataFrame(rows, columns=["table", "rows", "runs", "epochs", "settings"]).set_index("table")

    def _runs_lines(self) -> list[str]:
        runs = self.get("runs")
        if runs is None or not len(runs):
            return []
        epochs = self.get("epochs")
        lines = []
        for r in runs.itertuples():
            span = _span(epochs.loc[epochs["run"] == r.run, "epoch"]) if epochs is not None and "run" in epochs else ""
            branch = isinstance(r.parent_run, str) and r.parent_run  # a missing parent reads back as None or NaN
            parent = f" from {r.parent_run} at epoch {r.parent_epoch}" if branch else ""
            lines.append(f"{r.run}: {r.role}, {r.optimizer}{parent}, epochs {span or '-'}")
        return lines

    def _settings(self) -> dict[tuple[str, str], str]:
        """(table, config_hash) -> "option=value, ..." from the tasks' completion markers (the options that
        differ from the estimator's defaults; "defaults" when none does). Stops reading markers once every
        (table, config) is named, so it stays quick on large folders."""
        import json

        wanted = {(name, c) for name, frame in self.items() if "config_hash" in frame
                  for c in frame["config_hash"].dropna().unique()}
        found: dict[tuple[str, str], str] = {}
        tasks = self.path / TASKS_DIR
        markers = sorted(tasks.glob("*.json")) if tasks.is_dir() else []
        for marker in markers[:5000]:
            if len(found) == len(wanted):
                break
            try:
                record = json.loads(marker.read_text())
                keys = [(table, record["config_hash"]) for table in record.get("tables", {})]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            for key in keys:
                if key in wanted and key not in found:
                    found[key] = f"{record.get('estimator', '?')}: " + _options_text(record)
        return found

    def _text(self) -> str:
        lines = [f"analysis tables in {self.path} (a dict of DataFrames; t[\"llc\"], t[\"epochs\"], ...)"]
        runs = self._runs_lines()
        if runs:
            lines += ["runs:"] + [f"  {line}" for line in runs]
        return "\n".join(lines + ["", self.summary().to_string()])

    def __repr__(self) -> str:
        return self._text()

    __str__ = __repr__

    def _repr_html_(self) -> str:
        import html

        runs = "".join(f"<li>{html.escape(line)}</li>" for line in self._runs_lines())
        return (f"<p>analysis tables in <code>{html.escape(str(self.path))}</code> (a dict of DataFrames)</p>"
                + (f"<p>runs:</p><ul>{runs}</ul>" if runs else "") + self.summary().to_html())


def _span(epochs: pd.Series) -> str:
    if not len(epochs):
        return ""
    lo, hi = int(epochs.min()), int(epochs.max())
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _options_text(record: dict) -> str:
    """A marker's options that differ from the estimator's defaults."""
    options = record.get("options") or {}
    try:
        from analyze.estimators import load_class

        defaults = {o.name: o.default for o in load_class(record["ref"]).options}
    except Exception:  # a plug-in that no longer imports: show every option
        defaults = {}
    order = list(defaults) + sorted(set(options) - set(defaults))  # the estimator's own order, as --help lists them
    changed = [(k, options[k]) for k in order if k in options and (k not in defaults or defaults[k] != options[k])]
    return ", ".join(f"{k}={v}" for k, v in changed) or "defaults"


def load(path: str | Path) -> Tables:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such analysis folder (made by `analyze CKPT_DIR --out {root}`)")
    store = Store(root)
    completed = store.completed()
    tables = Tables(root)
    for name in store.tables():
        frame = read_table(root / name, None if name == ERRORS_TABLE else completed)
        if frame is not None:
            tables[name] = frame
    tables["epochs"] = epochs_frame(tables)
    return tables


def present(value) -> bool:
    """Not None/NaN/NA; lists and arrays count as present."""
    try:
        return not pd.isna(value)
    except (TypeError, ValueError):  # lists and arrays
        return value is not None


def most_common_config(frame: pd.DataFrame, table: str | None = None, use: str = "") -> pd.DataFrame:
    """The rows of the most common estimator config, when a table holds several (say two LLC settings).

    With `table`, a warning names the config that `use` (who reads the rows, e.g. "series use") takes.
    """
    if "config_hash" not in frame.columns:
        return frame
    counts = frame["config_hash"].value_counts()
    if len(counts) > 1:
        if table is not None:
            warnings.warn(f"table {table!r} holds {len(counts)} estimator configs; {use} config_hash "
                          f"{counts.index[0]} (the most common); filter tables[{table!r}] by config_hash for "
                          "the others", stacklevel=3)
        frame = frame[frame["config_hash"] == counts.index[0]]
    return frame


def epoch_estimates(tables: dict[str, pd.DataFrame]) -> pd.DataFrame | None:
    """Per-checkpoint scalars, one row per (run, epoch, step), one column per scalar."""
    wide = []
    evaluate = tables.get("evaluate")
    if evaluate is not None and len(evaluate):
        ev = most_common_config(evaluate, "evaluate", EPOCHS_USE).drop_duplicates(RUN_EPOCH + ["split"], keep="last")
        ev = ev.set_index(RUN_EPOCH + ["split"])[["loss", "accuracy"]].unstack("split")
        order = {s: i for i, s in enumerate(("train", "val", "test"))}
        ev = ev[sorted(ev.columns, key=lambda c: (order.get(c[1], len(order)), c[1], c[0] != "loss"))]
        ev.columns = [f"eval_{split}_{'acc' if value == 'accuracy' else 'loss'}" for value, split in ev.columns]
        wide.append(ev)
    for table, columns in EPOCH_SCALARS.items():
        frame = tables.get(table)
        present = {c: new for c, new in columns.items() if frame is not None and c in frame}
        if present:
            frame = most_common_config(frame, table, EPOCHS_USE).drop_duplicates(RUN_EPOCH, keep="last")
            wide.append(frame.set_index(RUN_EPOCH)[list(present)].rename(columns=present))
    if not wide:
        return None
    return pd.concat(wide, axis=1).reset_index()


def epochs_frame(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Training logs joined with the estimates of epoch-end checkpoints (one row per run and epoch).

    An epoch-end checkpoint's global step is the step its epoch's log row records, so joining on
    (run, epoch, step) leaves mid-epoch checkpoints out.
    """
    training, estimates = tables.get("training"), epoch_estimates(tables)
    if training is None and estimates is None:
        return pd.DataFrame(columns=RUN_EPOCH)
    if estimates is None:
        frame = training.copy()
    else:
        frame = training.merge(estimates, on=RUN_EPOCH, how="left") if training is not None else estimates.iloc[:0]
        unlogged = estimates[~estimates["run"].isin(frame["run"])]  # runs without a training log
        if len(unlogged):
            last = unlogged.groupby(["run", "epoch"])["step"].transform("max") == unlogged["step"]
            frame = pd.concat([frame, unlogged[last]], ignore_index=True)
    runs = tables.get("runs")
    if runs is not None:
        frame = frame.merge(runs[["run", "family", "role", "optimizer"]], on="run", how="left")
        frame = frame[["run", "family", "role", "optimizer"] + [c for c in frame if c not in
                                                               ("run", "family", "role", "optimizer")]]
    return frame.sort_values(["run", "epoch", "step"], ignore_index=True)
