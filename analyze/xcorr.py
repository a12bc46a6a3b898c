"""Cross-correlation between per-epoch series of a run: the `xcorr` post-processor.

    from analyze.xcorr import compute_xcorr, write_xcorr
    frame = compute_xcorr(analyze.load("OUT"))     # tidy: run, series_a, series_b, method, lag, corr, ...
    write_xcorr("OUT")                              # OUT/xcorr/xcorr.parquet

Series (one value per run and epoch, epoch-end checkpoints only; mid-epoch checkpoints are left out):
`train_loss`, `val_loss`, `test_loss`, `val_acc` (the training log, or the `evaluate` table where the log
lacks them), `llc`, `wbic` (`llc` table), `hessian_trace` (trace_exact where it applies, else the
stochastic trace), `hessian_lambda_max`, `fim_trace` (trace_diag), and per layer `hsic_x:<layer>`,
`hsic_y:<layer>`; whichever exist.

A swap branch has no checkpoints before its cut-off: its series is its parent's (the trunk's) up to the
cut-off epoch followed by its own epochs after it (`joined_parent` True). Two series are aligned on the
epochs where both exist: nothing is ever padded.

Lag convention (both methods, scipy.signal.correlate's): lag L pairs a at epoch t + L with b at epoch t.
A peak at L > 0 means a follows b by L epochs (b leads); at L < 0, a leads b.

- method "pearson": both series restricted to their shared epochs and z-scored there; the Pearson
  correlation of the pairs (a[t + L], b[t]) over the shared epochs t with t + L also shared; `n_overlap`
  counts them. Lags run over -max_lag..max_lag (in epochs); a lag with fewer than MIN_OVERLAP pairs, or
  where either side is constant, gives no row. For series on consecutive epochs
  this is np.corrcoef(a[L:], b[:n - L]) (L >= 0) on the aligned arrays, and the lags kept are
  |L| <= min(max_lag, n - 3).
- method "raw_correlate": scipy.signal.correlate(a, b, mode="full") of the raw (not normalized) values
  on the shared epochs, with scipy.signal.correlation_lags; this is what the study plotted, kept for
  comparison. Its lag counts positions in the aligned arrays (epochs, when the shared epochs are
  consecutive), all 2n - 1 lags are kept, and n_overlap = n - |L|. Raw values mix scale and
  correlation: read the "pearson" rows.

A pair with fewer than MIN_OVERLAP shared epochs gives no rows at all.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

XCORR_TABLE = "xcorr"
XCORR_FILE = "xcorr.parquet"  # not part-*.parquet: analyze.load() reads part-* files only of completed tasks
MIN_OVERLAP = 3
DEFAULT_MAX_LAG = 10
COLUMNS = ("run", "series_a", "series_b", "method", "lag", "corr", "n_overlap", "joined_parent")
DTYPES = {"run": str, "series_a": str, "series_b": str, "method": str, "lag": "int64", "corr": "float64",
          "n_overlap": "int64", "joined_parent": bool}

# Pairs computed by default; fnmatch patterns over series names (each matching pair once).
DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (
    ("val_loss", "wbic"),
    ("val_loss", "llc"),
    ("llc", "hessian_trace"),
    ("val_loss", "hessian_trace"),
    ("llc", "hessian_lambda_max"),
    ("llc", "fim_trace"),
    ("hessian_trace", "fim_trace"),
    ("train_loss", "llc"),
    ("val_loss", "hsic_x:*"),
    ("val_loss", "hsic_y:*"),
)

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


# ------------------------------------------------------------------------------------------ runs

def _present(value) -> bool:
    try:
        return not pd.isna(value)
    except (TypeError, ValueError):  # lists and arrays
        return value is not None


def run_parents(tables: dict[str, pd.DataFrame]) -> dict[str, tuple[str, int]]:
    """run -> (parent run, cut-off epoch) for every swap branch.

    From the `runs` table; without one, a run named `<family>-swap-<opt>` whose `<family>-trunk` has data
    is taken as its branch, cut off at the epoch before the branch's first (the trainer's naming).
    """
    parents: dict[str, tuple[str, int]] = {}
    runs = tables.get("runs")
    if runs is not None and len(runs) and {"run", "parent_run", "parent_epoch"} <= set(runs.columns):
        for row in runs.itertuples(index=False):
            if _present(row.parent_run) and _present(row.parent_epoch) and str(row.parent_run):
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


def main_config(frame: pd.DataFrame, table: str) -> pd.DataFrame:
    """The rows of the most common estimator config, when a table holds several (say two LLC settings)."""
    if "config_hash" not in frame.columns:
        return frame
    counts = frame["config_hash"].value_counts()
    if len(counts) > 1:
        warnings.warn(f"table {table!r} holds {len(counts)} estimator configs; series use config_hash "
                      f"{counts.index[0]} (the most common)", stacklevel=3)
        frame = frame[frame["config_hash"] == counts.index[0]]
    return frame


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
        ev = epoch_end_rows(main_config(evaluate, "evaluate"), ends)
        for (split, column), series in EVALUATE_SERIES.items():
            sel = ev[ev["split"] == split]
            if column in sel.columns and len(sel):
                parts += _long(sel.drop_duplicates(["run", "epoch"], keep="last"), {column: series})
    for table, columns in SCALAR_SOURCES.items():
        frame = tables.get(table)
        if frame is not None and len(frame):
            frame = epoch_end_rows(main_config(frame, table), ends).drop_duplicates(["run", "epoch"], keep="last")
            parts += _long(frame, columns)
    hessian = tables.get("hessian")
    if hessian is not None and len(hessian) and ("trace" in hessian or "trace_exact" in hessian):
        h = epoch_end_rows(main_config(hessian, "hessian"), ends).drop_duplicates(["run", "epoch"], keep="last")
        trace = pd.to_numeric(h["trace"], errors="coerce") if "trace" in h else pd.Series(np.nan, index=h.index)
        if "trace_exact" in h:
            exact = pd.to_numeric(h["trace_exact"], errors="coerce")
            trace = exact.where(exact.notna(), trace)
        parts += _long(h.assign(_trace=trace), {"_trace": "hessian_trace"})
        if "lambda_max" not in h and "top_eigenvalues" in h:
            top = h["top_eigenvalues"].map(lambda v: float(v[0]) if _present(v) and len(v) else np.nan)
            parts += _long(h.assign(_top=top), {"_top": "hessian_lambda_max"})
    hsic = tables.get("hsic")
    if hsic is not None and len(hsic) and {"hsic_x", "hsic_y"} <= set(hsic.columns):
        hs = epoch_end_rows(main_config(hsic, "hsic"), ends)
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


# ------------------------------------------------------------------------------------------ maths

def align(a: pd.Series, b: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(epochs, a values, b values) on the epochs where both series exist, in epoch order."""
    a, b = a.dropna(), b.dropna()
    epochs = np.array(sorted(set(a.index) & set(b.index)), dtype=np.int64)
    return epochs, a.loc[epochs].to_numpy(float), b.loc[epochs].to_numpy(float)


def zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def pearson_at_lags(a: pd.Series, b: pd.Series, max_lag: int = DEFAULT_MAX_LAG,
                    min_overlap: int = MIN_OVERLAP) -> pd.DataFrame:
    """Pearson correlation of (a at epoch t + lag, b at epoch t) for lag in -max_lag..max_lag.

    a, b: values indexed by epoch. Both are restricted to the epochs they share and z-scored there; at
    each lag the correlation is taken over the shared epochs t with t + lag also shared (n_overlap of
    them). Lags with fewer than min_overlap pairs, or with a constant side (undefined correlation), are
    left out. Columns: lag, corr, n_overlap.
    """
    epochs, x, y = align(a, b)
    rows = []
    if len(epochs) >= min_overlap:
        za, zb = zscore(x), zscore(y)
        position = {int(e): i for i, e in enumerate(epochs)}
        for lag in range(-max_lag, max_lag + 1):
            pairs = [(position[e + lag], i) for i, e in enumerate(epochs) if e + lag in position]
            if len(pairs) < min_overlap:
                continue
            ia, ib = np.array(pairs).T
            u, v = za[ia], zb[ib]
            if np.ptp(u) <= 0 or np.ptp(v) <= 0:
                continue
            corr = float(np.corrcoef(u, v)[0, 1])
            if np.isfinite(corr):
                rows.append((lag, corr, len(pairs)))
    return pd.DataFrame(rows, columns=["lag", "corr", "n_overlap"]).astype({"lag": "int64", "corr": float,
                                                                             "n_overlap": "int64"})


def raw_correlate(a: pd.Series, b: pd.Series, min_overlap: int = MIN_OVERLAP) -> pd.DataFrame:
    """scipy.signal.correlate(a, b, mode="full") of the raw values on the shared epochs, with
    scipy.signal.correlation_lags; n_overlap = n - |lag|. Columns: lag, corr, n_overlap."""
    from scipy import signal

    _, x, y = align(a, b)
    if len(x) < min_overlap:
        return pd.DataFrame({"lag": pd.Series(dtype="int64"), "corr": pd.Series(dtype=float),
                             "n_overlap": pd.Series(dtype="int64")})
    corr = signal.correlate(x, y, mode="full")
    lags = signal.correlation_lags(len(x), len(y), mode="full")
    return pd.DataFrame({"lag": lags.astype("int64"), "corr": corr.astype(float),
                         "n_overlap": (len(x) - np.abs(lags)).astype("int64")})


# ------------------------------------------------------------------------------------------ table

def expand_pairs(names: Iterable[str], pairs: str | Sequence[tuple[str, str]] | None) -> list[tuple[str, str]]:
    """Concrete (a, b) pairs of the available series names: "all" (every unordered pair), "default"/None
    (DEFAULT_PAIRS), or a list of (pattern, pattern) with fnmatch wildcards such as ("val_loss", "hsic_y:*")."""
    names = sorted(set(names))
    if isinstance(pairs, str) and pairs == "all":
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    if pairs is None or (isinstance(pairs, str) and pairs == "default"):
        pairs = DEFAULT_PAIRS
    if isinstance(pairs, str):
        raise ValueError(f"pairs: expected 'all', 'default' or a list of (a, b) patterns, not {pairs!r}")
    out: list[tuple[str, str]] = []
    for pa, pb in pairs:
        for a in [n for n in names if fnmatch.fnmatchcase(n, pa)]:
            for b in [n for n in names if fnmatch.fnmatchcase(n, pb)]:
                if a != b and (a, b) not in out and (b, a) not in out:
                    out.append((a, b))
    return out


def empty_xcorr() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=DTYPES[c]) for c in COLUMNS})


def compute_xcorr(tables: dict[str, pd.DataFrame], max_lag: int = DEFAULT_MAX_LAG,
                  pairs: str | Sequence[tuple[str, str]] | None = "default",
                  methods: Sequence[str] = ("pearson", "raw_correlate"), runs: Iterable[str] | None = None,
                  min_overlap: int = MIN_OVERLAP) -> pd.DataFrame:
    """The tidy `xcorr` table of an analysis folder's tables (as analyze.load returns them).

    For every run (a swap branch joined to its parent's trunk up to the cut-off) and every pair of series
    (`pairs`: "default", "all", or (pattern, pattern) tuples), the rows of each method: run, series_a,
    series_b, method, lag, corr, n_overlap, joined_parent. See the module docstring for the lag convention.
    """
    if max_lag < 0:
        raise ValueError("max_lag must be >= 0")
    unknown = set(methods) - {"pearson", "raw_correlate"}
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}: use 'pearson' and/or 'raw_correlate'")
    series = run_series(tables)
    parents = run_parents(tables)
    wanted = None if runs is None else set(runs)
    frames = []
    for run, frame in series.groupby("run", sort=True):
        if wanted is not None and run not in wanted:
            continue
        joined = run in parents
        values = {name: g.set_index("epoch")["value"].sort_index() for name, g in frame.groupby("series")}
        for a, b in expand_pairs(values, pairs):
            for method in methods:
                if method == "pearson":
                    rows = pearson_at_lags(values[a], values[b], max_lag=max_lag, min_overlap=min_overlap)
                else:
                    rows = raw_correlate(values[a], values[b], min_overlap=min_overlap)
                if len(rows):
                    frames.append(rows.assign(run=run, series_a=a, series_b=b, method=method,
                                              joined_parent=joined))
    if not frames:
        return empty_xcorr()
    out = pd.concat(frames, ignore_index=True)[list(COLUMNS)]
    return out.astype(DTYPES)


def _load_tables(out_dir: Path) -> dict[str, pd.DataFrame]:
    try:
        import analyze

        return dict(analyze.load(out_dir))
    except (ImportError, AttributeError):
        tables = {}
        for folder in sorted(p for p in Path(out_dir).iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
            try:
                tables[folder.name] = pd.read_parquet(folder)
            except Exception:  # an empty or foreign folder
                continue
        return tables


def write_xcorr(out_dir: str | Path, tables: dict[str, pd.DataFrame] | None = None, **options) -> Path:
    """Compute the xcorr table of an analysis folder and write OUT/xcorr/xcorr.parquet atomically
    (replacing the previous one). `options` go to compute_xcorr. Returns the file's path."""
    from trainer.atomic import atomic_write_parquet

    out_dir = Path(out_dir)
    if tables is None:
        tables = _load_tables(out_dir)
    frame = compute_xcorr({k: v for k, v in tables.items() if k != XCORR_TABLE}, **options)
    return atomic_write_parquet(out_dir / XCORR_TABLE / XCORR_FILE, frame)
