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
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from analyze.series import run_parents, run_series
from analyze.tables import XCORR_TABLE, load

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


def write_xcorr(out_dir: str | Path, tables: dict[str, pd.DataFrame] | None = None, **options) -> Path:
    """Compute the xcorr table of an analysis folder and write OUT/xcorr/xcorr.parquet atomically
    (replacing the previous one). `options` go to compute_xcorr. Returns the file's path."""
    from common.atomic import atomic_write_parquet

    out_dir = Path(out_dir)
    if tables is None:
        tables = load(out_dir)
    frame = compute_xcorr({k: v for k, v in tables.items() if k != XCORR_TABLE}, **options)
    return atomic_write_parquet(out_dir / XCORR_TABLE / XCORR_FILE, frame)
