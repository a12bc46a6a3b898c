"""A self-contained HTML report of an analysis folder (plotly figures, plotly.js embedded once: opens offline).

    from analyze.report import write_report, screenshot
    write_report("OUT")                              # OUT/report.html
    write_report("OUT", ckpt_dir="ckpts")           # per-step update norms from ckpts/<run>/steps.parquet
    screenshot("OUT/report.html", "docs/report.png", width=1400, height=1100)

    python -m analyze.report OUT [-o PATH] [--ckpt-dir DIR]
    python -m analyze.report --screenshot OUT docs/report.png [--width W --height H --full-page]

One section per run family (model): losses, update norms, LLC and WBIC against validation loss, Hessian
and Fisher curvature, LLC against rank(H)/2, Hessian spectral densities, LLC chain convergence, the HSIC
information plane, cross-correlations, calibration, diagnostics; then every run's and estimator's settings.
A swap branch is drawn from its parent's cut-off epoch on (the trunk is shared); every value is plotted at
the epoch of its checkpoint, and per-epoch series use epoch-end checkpoints only. A missing table skips its
figures with a "not computed" note. docs/report.md says how to read each section.

`screenshot` and `render` drive a headless Chromium through the DevTools protocol (a small stdlib
WebSocket client, no extra packages): they wait for every figure to be drawn, collect console errors and
uncaught exceptions, and capture a PNG.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import json
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from analyze.llc_stats import DRIFT_MAX, NOT_AT_MINIMUM_SE, not_at_minimum
from analyze.xcorr import (DEFAULT_PAIRS, XCORR_TABLE, compute_xcorr, epoch_end_rows, epoch_end_steps,
                           lineage, own_series, run_parents)

REPORT_FILE = "report.html"
OPT_COLORS = {"sgd": "rgb(200, 0, 0)", "ngd": "rgb(32, 102, 168)", "adam": "rgb(44, 160, 44)"}
TRUNK_COLOR = "rgb(100, 100, 100)"
PALETTE = ("#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#2ca02c", "#7f7f7f")
LAYER_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf")
CHAIN_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
MAX_STEP_POINTS = 3000       # per run in the update-norm figure (block means beyond)
MAX_CHAIN_POINTS = 400       # per chain trace in the convergence figure
SPECTRUM_GRID = 600
SPECTRUM_BROADENING = 0.01   # Gaussian sigma as a fraction of the spectrum's range
RHAT_WARN = 1.1
MAX_WARNINGS = 40            # listed per family (the count says how many there are)
XCORR_PLOT_PAIRS = tuple(p for p in DEFAULT_PAIRS if not p[1].startswith("hsic"))
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
OPTIMIZER_KEYS = ("lr", "momentum", "nesterov", "weight_decay", "alpha", "eta", "epsilon", "delta")
CONFIG_KEYS = ("batch_size", "num_epochs", "cut_off_epochs", "dataset", "model_type")


def _template():
    import plotly.graph_objects as go
    import plotly.io as pio

    # plotly_white's layout only: the full template repeats ~8 kB of colour scales in every figure
    layout = pio.templates["plotly_white"].layout.to_plotly_json()
    return go.layout.Template(layout=layout)


# =================================================================================== loading

def load_tables(out_dir: str | Path) -> dict[str, pd.DataFrame]:
    """analyze.load(out_dir), or each table folder read with pandas if the loader is unavailable."""
    out_dir = Path(out_dir)
    try:
        import analyze

        return dict(analyze.load(out_dir))
    except (ImportError, AttributeError):
        tables = {}
        for folder in sorted(p for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
            try:
                tables[folder.name] = pd.read_parquet(folder)
            except Exception:
                continue
        return tables


# =================================================================================== small helpers

def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-") or "x"


def _present(value) -> bool:
    try:
        return not pd.isna(value)
    except (TypeError, ValueError):
        return value is not None


def _true(value) -> bool:
    return _present(value) and bool(value)


def _fmt(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return "" if np.isnan(value) else str(value)
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_fmt(v) for v in list(value)[:8]) + (", ..." if len(value) > 8 else "") + "]"
    if not _present(value):
        return ""
    return str(value)


def html_table(frame: pd.DataFrame, highlight: Iterable[bool] | None = None, cls: str = "data") -> str:
    """An escaped HTML table; rows where `highlight` is true get class "hl"."""
    marks = list(highlight) if highlight is not None else [False] * len(frame)
    head = "".join(f"<th>{_esc(c)}</th>" for c in frame.columns)
    body = []
    for mark, row in zip(marks, frame.itertuples(index=False)):
        cells = "".join(f"<td>{_esc(_fmt(v))}</td>" for v in row)
        body.append(f'<tr class="hl">{cells}</tr>' if mark else f"<tr>{cells}</tr>")
    return (f'<div class="table-wrap"><table class="{cls}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _thin_indices(n: int, limit: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def spectral_density(nodes: np.ndarray, weights: np.ndarray, runs: np.ndarray | None = None,
                     grid_size: int = SPECTRUM_GRID, broadening: float = SPECTRUM_BROADENING):
    """Gaussian-broadened density of an SLQ (or exact) spectrum: (grid, density), averaged over SLQ runs.

    Each run's weights sum to 1, so the density integrates to about 1. sigma = broadening * range.
    """
    nodes, weights = np.asarray(nodes, float), np.asarray(weights, float)
    runs = np.zeros(len(nodes), int) if runs is None else np.asarray(runs)
    n_runs = max(len(np.unique(runs)), 1)
    lo, hi = float(nodes.min()), float(nodes.max())
    span = max(hi - lo, 1e-12 * max(abs(hi), 1.0), 1e-12)
    sigma = broadening * span
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size)
    density = np.zeros(grid_size)
    for start in range(0, len(nodes), 2048):
        n, w = nodes[start:start + 2048], weights[start:start + 2048]
        density += (w[None, :] * np.exp(-0.5 * ((grid[:, None] - n[None, :]) / sigma) ** 2)).sum(axis=1)
    density /= n_runs * sigma * math.sqrt(2 * math.pi)
    return grid, density


# =================================================================================== run model

@dataclass
class RunInfo:
    run: str
    family: str
    role: str
    optimizer: str
    parent: str | None = None
    cut: int | None = None
    experiment_type: str = ""
    path: str | None = None
    record: dict = field(default_factory=dict)  # run.json, when the checkpoint folder is readable


def _family_of(run: str, optimizer: str) -> str:
    m = re.fullmatch(r"(.+)-(trunk|swap-[^-]+)", run)
    if m:
        return m.group(1)
    if optimizer and run.endswith("-" + optimizer):
        return run[: -len(optimizer) - 1]
    return run


def run_infos(tables: dict[str, pd.DataFrame], ckpt_dir: str | Path | None = None) -> dict[str, RunInfo]:
    """Every run the tables mention, with its family, role, optimizer and parent (from `runs` if present)."""
    parents = run_parents(tables)
    infos: dict[str, RunInfo] = {}
    runs = tables.get("runs")
    if runs is not None and len(runs) and "run" in runs:
        for row in runs.to_dict("records"):
            run = str(row["run"])
            opt = str(row.get("optimizer")) if _present(row.get("optimizer")) else ""
            fam = str(row.get("family")) if _present(row.get("family")) else _family_of(run, opt)
            role = str(row.get("role")) if _present(row.get("role")) else ("branch" if run in parents else "standard")
            path = str(row.get("path")) if _present(row.get("path")) else None
            infos[run] = RunInfo(run, fam, role, opt, experiment_type=str(row["experiment_type"]) if _present(row.get("experiment_type")) else "", path=path)
    seen_opt: dict[str, str] = {}
    for name, frame in tables.items():
        if frame is None or not len(frame) or "run" not in frame or name in ("runs", XCORR_TABLE):
            continue
        if "optimizer" in frame:
            for run, opt in frame.drop_duplicates("run")[["run", "optimizer"]].itertuples(index=False):
                seen_opt.setdefault(str(run), str(opt))
        for run in pd.unique(frame["run"].astype(str)):
            seen_opt.setdefault(run, "")
    for run, opt in seen_opt.items():
        if run not in infos:
            role = "branch" if run in parents else ("trunk" if run.endswith("-trunk") else "standard")
            infos[run] = RunInfo(run, _family_of(run, opt), role, opt)
        elif not infos[run].optimizer:
            infos[run].optimizer = opt
    for run, (parent, cut) in parents.items():
        if run in infos:
            infos[run].parent, infos[run].cut = parent, cut
    for info in infos.values():
        folder = Path(ckpt_dir) / info.run if ckpt_dir else (Path(info.path) if info.path else None)
        if folder is not None:
            try:
                info.record = json.loads((folder / "run.json").read_text())
                info.path = str(folder)
            except (OSError, ValueError):
                pass
    return infos


# =================================================================================== report builder

class ReportBuilder:
    """Builds the report's sections; `figures` maps each figure's div id to its plotly Figure."""

    def __init__(self, tables: dict[str, pd.DataFrame], ckpt_dir: str | Path | None = None,
                 source: str | Path | None = None, title: str | None = None):
        self.tables = {k: v for k, v in tables.items() if v is not None}
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
        self.source = source
        self.title = title or "Checkpoint dynamics report"
        self.figures: dict[str, Any] = {}
        self.notes: list[str] = []
        self.template = _template()
        self._main_cache: dict[str, pd.DataFrame | None] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "several configs" warnings: the settings table lists them
            self.parents = run_parents(self.tables)
            self.infos = run_infos(self.tables, self.ckpt_dir)
            self.ends = epoch_end_steps(self.tables)
            self.series = own_series(self.tables)
            self.frames = {name: self._epoch_frame(name) for name in ("llc", "hessian", "fim")}
        self._series_index = {key: g.set_index("epoch")["value"].sort_index()
                              for key, g in self.series.groupby(["run", "series"])}
        self._end_index = {(r, int(e)): int(s) for r, e, s in self.ends.itertuples(index=False)}
        self._labels = self._make_labels()

    # ------------------------------------------------------------------ data access
    def _epoch_frame(self, table: str) -> pd.DataFrame | None:
        frame = self.tables.get(table)
        if frame is None or not len(frame):
            return None
        frame = self._main_config(frame)
        frame = epoch_end_rows(frame, self.ends)
        frame = frame.sort_values(["run", "epoch", "step"]).drop_duplicates(["run", "epoch"], keep="last")
        return frame.assign(run=frame["run"].astype(str))

    def _main(self, table: str) -> pd.DataFrame | None:
        """A table's rows of its most common estimator config (cached), None if absent or empty."""
        if table not in self._main_cache:
            frame = self.tables.get(table)
            self._main_cache[table] = None if frame is None or not len(frame) else self._main_config(frame)
        return self._main_cache[table]

    def checkpoint_rows(self, table: str, run: str, epoch: int) -> pd.DataFrame:
        """The rows of the epoch-end checkpoint of (run, epoch) in a table (main config)."""
        frame = self._main(table)
        rows = frame[(frame["run"].astype(str) == run) & (frame["epoch"] == epoch)]
        return epoch_end_rows(rows, self.ends)

    @staticmethod
    def _main_config(frame: pd.DataFrame) -> pd.DataFrame:
        if "config_hash" in frame and frame["config_hash"].nunique() > 1:
            return frame[frame["config_hash"] == frame["config_hash"].value_counts().index[0]]
        return frame

    def metric(self, run: str, name: str) -> pd.Series:
        """A run's own per-epoch series (val_loss, train_loss, llc, ...), indexed by epoch."""
        return self._series_index.get((run, name), pd.Series(dtype=float))

    def column(self, run: str, table: str, col: str) -> pd.Series:
        frame = self.frames.get(table)
        if frame is None or col not in frame:
            return pd.Series(dtype=float)
        rows = frame[frame["run"] == run]
        values = pd.to_numeric(rows[col], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        return pd.Series(values, index=rows["epoch"].astype(int).to_numpy()).dropna().sort_index()

    def joined(self, run: str, values: pd.Series, getter) -> pd.Series:
        """A branch's values with its parent's value at the cut-off epoch in front (the branch starts there)."""
        info = self.infos.get(run)
        if info is None or info.parent is None or info.cut is None:
            return values
        parent = getter(info.parent)
        if info.cut in parent.index and info.cut not in values.index:
            values = pd.concat([parent.loc[[info.cut]], values]).sort_index()
        return values

    def end_step(self, run: str, epoch: int) -> int | None:
        """The global step at the end of `epoch` in run's history (its own or an ancestor's)."""
        for source, first, last in reversed(lineage(run, self.parents)):
            if (first is None or epoch >= first) and (last is None or epoch <= last):
                found = self._end_index.get((source, epoch))
                if found is not None:
                    return found
        return self._end_index.get((run, epoch))

    def fractional_epoch(self, run: str, epoch: int, step: int) -> float:
        end = self.end_step(run, epoch)
        if end is None or step >= end:
            return float(epoch)
        start = self.end_step(run, epoch - 1) if epoch > 0 else None
        if start is None or end <= start:
            return float(epoch)
        return epoch - 1 + max(0.0, (step - start) / (end - start))

    # ------------------------------------------------------------------ families and styling
    def families(self) -> list[str]:
        return sorted({i.family for i in self.infos.values()})

    def family_runs(self, family: str) -> list[str]:
        order = {"trunk": 0, "standard": 1, "branch": 2}
        opt_order = {"sgd": 0, "ngd": 1}
        runs = [i for i in self.infos.values() if i.family == family]
        runs.sort(key=lambda i: (order.get(i.role, 3), opt_order.get(i.optimizer, 9), i.optimizer, i.run))
        return [i.run for i in runs]

    def _make_labels(self) -> dict[str, str]:
        labels = {}
        for info in self.infos.values():
            opt = info.optimizer or "?"
            if info.role == "trunk":
                labels[info.run] = f"trunk ({opt})"
            elif info.parent is not None:
                labels[info.run] = f"{opt} after swap"
            else:
                labels[info.run] = opt
        for family in self.families():  # label clashes within a family: use run names
            runs = self.family_runs(family)
            names = [labels[r] for r in runs]
            for r in runs:
                if names.count(labels[r]) > 1:
                    labels[r] = r
        return labels

    def label(self, run: str) -> str:
        return self._labels.get(run, run)

    def color(self, run: str) -> str:
        info = self.infos.get(run)
        if info is not None and info.role == "trunk":
            return TRUNK_COLOR
        opt = info.optimizer if info else ""
        if opt in OPT_COLORS:
            same = [r for r in self.family_runs(info.family) if self.infos[r].optimizer == opt
                    and self.infos[r].role != "trunk"]
            if len(same) <= 1 or same.index(run) == 0:
                return OPT_COLORS[opt]
        runs = sorted(self.infos)
        return PALETTE[runs.index(run) % len(PALETTE)] if run in runs else PALETTE[0]

    def cutoffs(self, family: str) -> list[int]:
        return sorted({self.infos[r].cut for r in self.family_runs(family) if self.infos[r].cut is not None})

    def _style(self, fig, title: str, xtitle: str, ytitle: str, height: int = 400, legend: bool = True,
               secondary: bool = False):
        fig.update_layout(template=self.template, height=height, hovermode="closest",
                          title=dict(text=title, x=0.01, xanchor="left", font=dict(size=15)),
                          margin=dict(l=60, r=60, t=56, b=40 if not legend else 96),
                          legend=dict(orientation="h", x=0, xanchor="left", y=-0.16, yanchor="top", font=dict(size=11)),
                          showlegend=legend)
        if xtitle:
            fig.update_xaxes(title_text=xtitle)
        if ytitle and secondary:
            fig.update_yaxes(title_text=ytitle, secondary_y=False)
        elif ytitle:
            fig.update_yaxes(title_text=ytitle)
        return fig

    def _cut_lines(self, fig, family: str, **where):
        for cut in self.cutoffs(family):
            fig.add_vline(x=cut, line=dict(color="rgba(0,0,0,0.45)", dash="dot", width=1), **where)
        if self.cutoffs(family) and not where:
            fig.add_annotation(x=self.cutoffs(family)[0], y=1, yref="paper", text="swap", showarrow=False,
                               xanchor="left", yanchor="bottom", font=dict(size=10, color="rgba(0,0,0,0.6)"))

    def _add_val_loss(self, fig, run: str, showlegend: bool = True, **where):
        import plotly.graph_objects as go

        val = self.joined(run, self.metric(run, "val_loss"), lambda r: self.metric(r, "val_loss"))
        if len(val):
            fig.add_trace(go.Scatter(x=val.index, y=val.to_numpy(), mode="lines", name=f"{self.label(run)} val loss",
                                     line=dict(color=self.color(run), dash="dash", width=1.5), opacity=0.75,
                                     legendgroup=f"val-{run}", showlegend=showlegend,
                                     hovertemplate="epoch %{x}<br>val loss %{y:.4g}<extra></extra>"),
                          secondary_y=True, **where)
        return len(val) > 0

    # ------------------------------------------------------------------ figures
    def fig_loss(self, family: str):
        import plotly.graph_objects as go

        fig = go.Figure()
        for run in self.family_runs(family):
            for name, dash, width in (("train_loss", "solid", 2.5), ("val_loss", "dot", 2.5)):
                s = self.joined(run, self.metric(run, name), lambda r, n=name: self.metric(r, n))
                if len(s):
                    fig.add_trace(go.Scatter(x=s.index, y=s.to_numpy(), mode="lines+markers" if len(s) < 30 else "lines",
                                             name=f"{self.label(run)} {'train' if name == 'train_loss' else 'validation'}",
                                             line=dict(color=self.color(run), dash=dash, width=width),
                                             marker=dict(size=5),
                                             hovertemplate="epoch %{x}<br>%{y:.4g}<extra></extra>"))
        if not fig.data:
            return None
        self._cut_lines(fig, family)
        self._style(fig, "Training and validation loss", "epoch", "loss")
        fig.update_yaxes(rangemode="tozero")
        return fig

    def _steps_file(self, run: str) -> Path | None:
        info = self.infos.get(run)
        folders = [self.ckpt_dir / run] if self.ckpt_dir else []
        if info is not None and info.path:
            folders.append(Path(info.path))
        for folder in folders:
            if (folder / "steps.parquet").is_file():
                return folder / "steps.parquet"
        return None

    def fig_update_norms(self, family: str):
        import plotly.graph_objects as go

        fig = go.Figure()
        per_step = False
        for run in self.family_runs(family):
            path = self._steps_file(run)
            steps = None
            if path is not None:
                try:
                    steps = pd.read_parquet(path, columns=["epoch", "step", "update_norm"])
                except Exception:
                    steps = None
            if steps is not None and len(steps):
                steps = steps.sort_values("step")
                steps = steps[np.isfinite(steps["update_norm"].to_numpy(float))]
                # x: fractional epoch, the last step of epoch e at e
                pos = steps.groupby("epoch").cumcount().to_numpy() + 1
                count = steps.groupby("epoch")["step"].transform("size").to_numpy()
                x = steps["epoch"].to_numpy() - 1 + pos / count
                y = steps["update_norm"].to_numpy(float)
                s = steps["step"].to_numpy()
                k = int(math.ceil(len(y) / MAX_STEP_POINTS))
                name = f"{self.label(run)}"
                if k > 1:  # block means keep the page light
                    m = len(y) // k * k
                    x, y, s = x[:m].reshape(-1, k).mean(1), y[:m].reshape(-1, k).mean(1), s[:m:k]
                    name += f" (mean of {k} steps)"
                fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=name, customdata=s,
                                           line=dict(color=self.color(run), width=1),
                                           hovertemplate="epoch %{x:.3f} (step %{customdata})<br>"
                                                         "update norm %{y:.4g}<extra></extra>"))
                per_step = True
            else:
                info_epochs = self.tables.get("training")
                if info_epochs is None or "update_norm_mean" not in info_epochs:
                    continue
                rows = info_epochs[info_epochs["run"].astype(str) == run].sort_values("epoch")
                rows = rows[np.isfinite(rows["update_norm_mean"].to_numpy(dtype=float, na_value=np.nan))]
                if len(rows):
                    fig.add_trace(go.Scatter(x=rows["epoch"], y=rows["update_norm_mean"], mode="lines+markers",
                                             name=f"{self.label(run)} (epoch mean)",
                                             line=dict(color=self.color(run), width=2),
                                             hovertemplate="epoch %{x}<br>mean update norm %{y:.4g}<extra></extra>"))
        if not fig.data:
            return None
        self._cut_lines(fig, family)
        title = "Update norms per step" if per_step else "Update norms (mean per epoch; per step needs the checkpoint folder)"
        self._style(fig, title, "epoch", "||Δw|| per step")
        return fig

    def _secondary_fig(self):
        from plotly.subplots import make_subplots

        return make_subplots(specs=[[{"secondary_y": True}]])

    def fig_llc(self, family: str):
        import plotly.graph_objects as go

        if self.frames["llc"] is None:
            return None
        fig = self._secondary_fig()
        at_minimum = []  # (low, high) of every estimate at a local minimum: they set the y-range
        for run in self.family_runs(family):
            llc = self.joined(run, self.column(run, "llc", "llc_mean"), lambda r: self.column(r, "llc", "llc_mean"))
            if not len(llc):
                continue
            sem = self.joined(run, self.column(run, "llc", "llc_sem"), lambda r: self.column(r, "llc", "llc_sem"))
            sem = sem.reindex(llc.index)
            # hollow markers where w* is not a local minimum (the LLC is undefined there)
            undefined = [not_at_minimum(v, e) for v, e in zip(llc.to_numpy(), sem.to_numpy())]
            at_minimum += [(v - np.nan_to_num(e), v + np.nan_to_num(e)) for v, e, u in
                           zip(llc.to_numpy(), sem.to_numpy(), undefined) if not u and np.isfinite(v)]
            fig.add_trace(go.Scatter(x=llc.index, y=llc.to_numpy(), mode="lines+markers", name=f"{self.label(run)} LLC",
                                     line=dict(color=self.color(run), width=2.5),
                                     marker=dict(size=6, symbol=["circle-open" if u else "circle" for u in undefined]),
                                     error_y=dict(type="data", array=sem.fillna(0).to_numpy(), visible=True,
                                                  thickness=1.2, width=3),
                                     customdata=["<br>not at a local minimum" if u else "" for u in undefined],
                                     hovertemplate="epoch %{x}<br>LLC %{y:.4g}%{customdata}<extra></extra>"),
                          secondary_y=False)
            self._add_val_loss(fig, run)
        if not fig.data:
            return None
        self._cut_lines(fig, family)
        self._style(fig, "LLC (± s.e.m.) and validation loss", "epoch", "LLC  λ̂", secondary=True)
        fig.update_yaxes(title_text="validation loss", secondary_y=True, showgrid=False)
        if at_minimum:
            # the LLC is undefined away from a minimum, and early epochs' large negative values would squash
            # the curves that matter into a line: the axis spans the estimates at a minimum (the others clip)
            low, high = min(lo for lo, _ in at_minimum), max(hi for _, hi in at_minimum)
            pad = 0.05 * (high - low) or 0.05 * abs(high) or 1.0
            fig.update_yaxes(range=[low - pad, high + pad], secondary_y=False)
        return fig

    def fig_wbic(self, family: str):
        import plotly.graph_objects as go

        if self.frames["llc"] is None or "wbic" not in self.frames["llc"]:
            return None
        fig = self._secondary_fig()
        for run in self.family_runs(family):
            w = self.joined(run, self.column(run, "llc", "wbic"), lambda r: self.column(r, "llc", "wbic"))
            if not len(w):
                continue
            fig.add_trace(go.Scatter(x=w.index, y=w.to_numpy(), mode="lines+markers", name=f"{self.label(run)} WBIC",
                                     line=dict(color=self.color(run), width=2.5), marker=dict(size=6),
                                     hovertemplate="epoch %{x}<br>WBIC %{y:.5g}<extra></extra>"), secondary_y=False)
            self._add_val_loss(fig, run)
        if not fig.data:
            return None
        exact = self.frames["llc"].get("wbic_exact")
        note = "" if exact is None else (" (exact)" if bool(exact.all()) else " (localized/tempered)")
        self._cut_lines(fig, family)
        self._style(fig, "WBIC and validation loss", "epoch", "WBIC" + note, secondary=True)
        fig.update_yaxes(title_text="validation loss", secondary_y=True, showgrid=False)
        return fig

    def fig_curvature(self, family: str):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        panels = []
        h, f = self.frames["hessian"], self.frames["fim"]
        if h is not None:
            panels.append(("hessian_trace", "Hessian trace"))
            if "lambda_max" in h or "top_eigenvalues" in h:
                panels.append(("hessian_lambda_max", "top Hessian eigenvalue λ_max"))
        if f is not None and "trace_diag" in f:
            panels.append(("fim_trace", "Fisher trace (diagonal)"))
        if not panels:
            return None
        fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[1] for p in panels],
                            specs=[[{"secondary_y": True}] * len(panels)], horizontal_spacing=0.09)
        drawn = False
        for col, (name, title) in enumerate(panels, start=1):
            for i, run in enumerate(self.family_runs(family)):
                s = self.joined(run, self.metric(run, name), lambda r, n=name: self.metric(r, n))
                if not len(s):
                    continue
                err = None
                if name == "hessian_trace" and h is not None and "trace_stderr" in h:
                    # where the exact trace is shown, its error is the subsample's (trace_exact_stderr, none in
                    # tables written before it existed); elsewhere the stochastic estimate's
                    exact = self.joined(run, self.column(run, "hessian", "trace_exact"),
                                        lambda r: self.column(r, "hessian", "trace_exact"))
                    se = self.joined(run, self.column(run, "hessian", "trace_stderr"),
                                     lambda r: self.column(r, "hessian", "trace_stderr")).reindex(s.index)
                    shown_exact = exact.reindex(s.index).notna().to_numpy()
                    if "trace_exact_stderr" in h:
                        exact_se = self.joined(run, self.column(run, "hessian", "trace_exact_stderr"),
                                               lambda r: self.column(r, "hessian", "trace_exact_stderr"))
                        se[shown_exact] = exact_se.reindex(s.index).to_numpy()[shown_exact]
                    else:
                        se[shown_exact] = 0.0
                    err = dict(type="data", array=se.fillna(0).to_numpy(), visible=True, thickness=1, width=2)
                fig.add_trace(go.Scatter(x=s.index, y=s.to_numpy(), mode="lines+markers", name=self.label(run),
                                         legendgroup=run, showlegend=col == 1, error_y=err,
                                         line=dict(color=self.color(run), width=2.2), marker=dict(size=5),
                                         hovertemplate=f"epoch %{{x}}<br>{title} %{{y:.4g}}<extra></extra>"),
                              row=1, col=col, secondary_y=False)
                self._add_val_loss(fig, run, showlegend=col == 1, row=1, col=col)
                drawn = True
        if not drawn:
            return None
        for col in range(1, len(panels) + 1):
            fig.update_xaxes(title_text="epoch", row=1, col=col)
            fig.update_yaxes(secondary_y=True, showgrid=False, row=1, col=col,
                             title_text="validation loss" if col == len(panels) else None)
            self._cut_lines(fig, family, row=1, col=col)
        self._style(fig, "Curvature and validation loss (dashed, right axis)", "", "")
        fig.update_layout(margin_t=84)
        return fig

    def fig_llc_rank(self, family: str):
        import plotly.graph_objects as go

        llc, h = self.frames["llc"], self.frames["hessian"]
        if llc is None or h is None or "rank_estimate" not in h:
            return None
        fig = go.Figure()
        top = 0.0
        n_params = None
        for run in self.family_runs(family):
            lam = self.column(run, "llc", "llc_mean")
            sem = self.column(run, "llc", "llc_sem")
            rank = self.column(run, "hessian", "rank_estimate")
            epochs = lam.index.intersection(rank.index)
            if not len(epochs):
                continue
            x, y = rank.loc[epochs].to_numpy() / 2, lam.loc[epochs].to_numpy()
            top = max(top, float(np.nanmax(x)), float(np.nanmax(y)))
            fig.add_trace(go.Scatter(x=x, y=y, mode="markers+lines", name=self.label(run),
                                     line=dict(color=self.color(run), width=1), opacity=0.9,
                                     marker=dict(size=8, color=self.color(run)), customdata=np.asarray(epochs),
                                     error_y=dict(type="data", array=sem.reindex(epochs).fillna(0).to_numpy(),
                                                  visible=True, thickness=1, width=2),
                                     hovertemplate="epoch %{customdata}<br>rank/2 %{x:.4g}<br>LLC %{y:.4g}<extra></extra>"))
            if "n_params" in h:
                p = self.column(run, "hessian", "n_params")
                n_params = int(p.max()) if len(p) else n_params
        if not fig.data:
            return None
        top = top * 1.08 if top > 0 else 1.0
        fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="LLC = rank/2",
                                 line=dict(color="black", dash="dash", width=1), hoverinfo="skip"))
        title = "LLC against rank(H)/2 (SLT: LLC ≥ rank/2)"
        self._style(fig, title, "rank(Hessian) / 2" + (f"   (d/2 = {n_params / 2:g})" if n_params else ""), "LLC  λ̂")
        return fig

    def chosen_checkpoints(self, family: str, table: str) -> list[tuple[str, int, str]]:
        """(run, epoch, label) at the first epoch, the cut-off and each run's last epoch, among the epoch-end
        checkpoints present in `table` (the nearest present epoch where the exact one is missing)."""
        frame = self._main(table)
        if frame is None or not len(frame):
            return []
        keys = epoch_end_rows(frame[["run", "epoch", "step"]].drop_duplicates(), self.ends)
        present = {r: sorted(set(g["epoch"].astype(int))) for r, g in keys.groupby(keys["run"].astype(str))}
        runs = [r for r in self.family_runs(family) if r in present]
        if not runs:
            return []
        wanted: list[tuple[str, int, str]] = []
        has_children = {self.infos[r].parent for r in self.infos if self.infos[r].parent}
        for run in runs:
            info = self.infos[run]
            if info.parent is None:
                wanted.append((run, present[run][0], "first"))
            if run in has_children:
                cut = [self.infos[c].cut for c in self.infos if self.infos[c].parent == run]
                wanted.append((run, int(cut[0]), "cut-off"))
            else:
                wanted.append((run, present[run][-1], "last"))
        out = []
        for run, epoch, what in wanted:
            epochs = present[run]
            nearest = min(epochs, key=lambda e: (abs(e - epoch), e))
            item = (run, nearest, f"{self.label(run)}, epoch {nearest} ({what})")
            if all((o[0], o[1]) != (run, nearest) for o in out):
                out.append(item)
        return out

    def fig_spectrum(self, family: str):
        import plotly.graph_objects as go

        if self._main("hessian_spectrum") is None:
            return None
        fig = go.Figure()
        dashes = ("solid", "dash", "dot", "dashdot", "longdash")
        for i, (run, epoch, label) in enumerate(self.chosen_checkpoints(family, "hessian_spectrum")):
            rows = self.checkpoint_rows("hessian_spectrum", run, epoch)
            rows = rows[np.isfinite(rows["node"].to_numpy(float)) & np.isfinite(rows["weight"].to_numpy(float))]
            if not len(rows):
                continue
            runs = rows["slq_run"].to_numpy() if "slq_run" in rows else None
            grid, density = spectral_density(rows["node"].to_numpy(float), rows["weight"].to_numpy(float), runs)
            floor = max(density.max() * 1e-7, 1e-300)
            fig.add_trace(go.Scatter(x=grid, y=np.maximum(density, floor), mode="lines", name=label,
                                     line=dict(color=self.color(run), dash=dashes[i % len(dashes)], width=1.8),
                                     hovertemplate="λ %{x:.4g}<br>density %{y:.3g}<extra></extra>"))
        if not fig.data:
            return None
        self._style(fig, "Hessian spectral density", "eigenvalue λ",
                    "density (log)")
        fig.update_yaxes(type="log", exponentformat="power")
        return fig

    def fig_chains(self, family: str):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        if self._main("llc_chains") is None:
            return None
        picks = self.chosen_checkpoints(family, "llc_chains")
        if not picks:
            return None
        llc = self.frames["llc"]
        titles = []
        for run, epoch, label in picks:
            text = label
            if llc is not None:
                row = llc[(llc["run"] == run) & (llc["epoch"] == epoch)]
                if len(row):
                    r = row.iloc[0]
                    bits = []
                    if "rhat" in r and _present(r["rhat"]):
                        flag = " ⚠" if r["rhat"] > RHAT_WARN else ""
                        bits.append(f"R̂ {r['rhat']:.3f}{flag}")
                    if "drift" in r and _present(r["drift"]):
                        bits.append(f"drift {r['drift']:.2g}" + (" ⚠" if abs(r["drift"]) > DRIFT_MAX else ""))
                    if "llc_mean" in r and _present(r["llc_mean"]):
                        bits.append(f"LLC {r['llc_mean']:.3g} ± {r.get('llc_sem', float('nan')):.2g}")
                    text += "<br>" + " · ".join(bits)
            titles.append(text)
        cols = min(3, len(picks))
        nrows = int(math.ceil(len(picks) / cols))
        fig = make_subplots(rows=nrows, cols=cols, subplot_titles=titles, horizontal_spacing=0.07,
                            vertical_spacing=0.22 if nrows > 1 else 0.1)
        shown = set()
        for k, (run, epoch, _) in enumerate(picks):
            row, col = k // cols + 1, k % cols + 1
            rows = self.checkpoint_rows("llc_chains", run, epoch)
            burn_lo = None
            for chain, g in rows.groupby("chain"):
                g = g.sort_values("draw")
                draw, loss = g["draw"].to_numpy(), g["loss"].to_numpy(float)
                kept = draw >= 0
                if "burnin" in g:
                    kept = ~g["burnin"].to_numpy(bool)
                color = CHAIN_PALETTE[int(chain) % len(CHAIN_PALETTE)]
                idx = _thin_indices(len(draw), MAX_CHAIN_POINTS)
                fig.add_trace(go.Scatter(x=draw[idx], y=loss[idx], mode="lines", line=dict(color=color, width=0.7),
                                         opacity=0.35, name=f"chain {chain} loss", legendgroup=f"raw{chain}",
                                         showlegend=f"raw{chain}" not in shown, hoverinfo="skip"), row=row, col=col)
                shown.add(f"raw{chain}")
                if kept.any():
                    d, l = draw[kept], loss[kept]
                    running = np.cumsum(l) / np.arange(1, len(l) + 1)
                    idx = _thin_indices(len(d), MAX_CHAIN_POINTS)
                    fig.add_trace(go.Scatter(x=d[idx], y=running[idx], mode="lines", line=dict(color=color, width=2.2),
                                             name=f"chain {chain} running mean", legendgroup=f"run{chain}",
                                             showlegend=f"run{chain}" not in shown,
                                             hovertemplate="draw %{x}<br>running mean loss %{y:.5g}<extra></extra>"),
                                  row=row, col=col)
                    shown.add(f"run{chain}")
                if (~kept).any():
                    burn_lo = min(burn_lo if burn_lo is not None else 0, int(draw[~kept].min()))
            if burn_lo is not None:
                fig.add_vrect(x0=burn_lo, x1=0, fillcolor="rgba(120,120,120,0.15)", line_width=0, row=row, col=col)
            if llc is not None:
                r = llc[(llc["run"] == run) & (llc["epoch"] == epoch)]
                if len(r) and "init_loss" in r and _present(r["init_loss"].iloc[0]):
                    fig.add_hline(y=float(r["init_loss"].iloc[0]), line=dict(color="black", dash="dot", width=1),
                                  row=row, col=col)
            fig.update_xaxes(title_text="draw (burn-in shaded, < 0)", row=row, col=col)
        fig.update_yaxes(title_text="loss", col=1)
        self._style(fig, "SGLD chains: running-mean loss per chain (dotted: the checkpoint's loss L(w*))",
                    "", "", height=330 * nrows + 110)
        fig.update_layout(margin_t=100)
        fig.update_annotations(font_size=11)
        return fig

    def fig_hsic(self, family: str):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        hsic = self.tables.get("hsic")
        if hsic is None or not len(hsic) or not {"hsic_x", "hsic_y"} <= set(hsic.columns):
            return None
        hsic = self._main_config(hsic).copy()
        hsic["run"] = hsic["run"].astype(str)
        if "layer_name" not in hsic:
            hsic["layer_name"] = hsic["layer"].astype(str)
        runs = [r for r in self.family_runs(family) if (hsic["run"] == r).any()]
        if not runs:
            return None
        cols = min(3, len(runs))
        nrows = int(math.ceil(len(runs) / cols))
        fig = make_subplots(rows=nrows, cols=cols, subplot_titles=[self.label(r) for r in runs],
                            horizontal_spacing=0.08, vertical_spacing=0.16)
        layers = hsic.drop_duplicates("layer_name").sort_values("layer" if "layer" in hsic else "layer_name")
        layer_names = list(layers["layer_name"].astype(str))
        shown, all_epochs = set(), []
        for k, run in enumerate(runs):
            row, col = k // cols + 1, k % cols + 1
            rows = hsic[hsic["run"] == run]
            info = self.infos.get(run)
            if info is not None and info.parent is not None and info.cut is not None:
                start = hsic[(hsic["run"] == info.parent) & (hsic["epoch"] == info.cut)]
                start = epoch_end_rows(start, self.ends)
                rows = pd.concat([start.assign(run=run), rows], ignore_index=True)
            for li, name in enumerate(layer_names):
                g = rows[rows["layer_name"].astype(str) == name].sort_values(["epoch", "step"])
                g = g[np.isfinite(g["hsic_x"].to_numpy(float)) & np.isfinite(g["hsic_y"].to_numpy(float))]
                if not len(g):
                    continue
                ep = np.array([self.fractional_epoch(run, int(e), int(s)) for e, s in zip(g["epoch"], g["step"])])
                all_epochs.extend(ep.tolist())
                fig.add_trace(go.Scatter(
                    x=g["hsic_x"].to_numpy(float), y=g["hsic_y"].to_numpy(float), mode="lines+markers", name=name,
                    legendgroup=name, showlegend=name not in shown,
                    line=dict(color=LAYER_PALETTE[li % len(LAYER_PALETTE)], width=1.5),
                    marker=dict(size=7, color=ep, coloraxis="coloraxis",
                                line=dict(color=LAYER_PALETTE[li % len(LAYER_PALETTE)], width=1)),
                    customdata=np.stack([ep, g["step"].to_numpy()], axis=1),
                    hovertemplate=f"{_esc(name)}<br>epoch %{{customdata[0]:.2f}} (step %{{customdata[1]}})<br>"
                                  "HSIC(X,T) %{x:.4g}<br>HSIC(Y,T) %{y:.4g}<extra></extra>"), row=row, col=col)
                shown.add(name)
            fig.update_xaxes(title_text="HSIC(X, T)", row=row, col=col)
            fig.update_yaxes(title_text="HSIC(Y, T)", row=row, col=col)
        if not fig.data:
            return None
        # branches of one trunk share their axes, so the optimizers compare directly
        branches = [k for k, r in enumerate(runs) if self.infos.get(r) is not None and self.infos[r].parent]
        for k in branches[1:]:
            suffix = "" if branches[0] == 0 else str(branches[0] + 1)
            fig.update_xaxes(matches=f"x{suffix}", row=k // cols + 1, col=k % cols + 1)
            fig.update_yaxes(matches=f"y{suffix}", row=k // cols + 1, col=k % cols + 1)
        fig.update_layout(coloraxis=dict(colorscale="Viridis", cmin=min(all_epochs), cmax=max(all_epochs),
                                         colorbar=dict(title=dict(text="epoch"), thickness=12)))
        self._style(fig, "HSIC information plane (one trajectory per layer; marker colour: epoch)", "", "",
                    height=380 * nrows + 100)
        fig.update_layout(margin_t=84)
        return fig

    def xcorr_table(self) -> pd.DataFrame:
        if not hasattr(self, "_xcorr"):
            frame = self.tables.get(XCORR_TABLE)
            if frame is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    frame = compute_xcorr(self.tables)
                self.notes.append("xcorr: computed for this report (no xcorr table in the folder)")
            self._xcorr = frame
        return self._xcorr

    def fig_xcorr(self, family: str):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        frame = self.xcorr_table()
        if frame is None or not len(frame):
            return None
        runs = self.family_runs(family)
        frame = frame[frame["run"].astype(str).isin(runs) & (frame["method"] == "pearson")]
        pairs = [p for p in XCORR_PLOT_PAIRS
                 if ((frame["series_a"] == p[0]) & (frame["series_b"] == p[1])).any()][:6]
        if not pairs:
            return None
        cols = min(3, len(pairs))
        nrows = int(math.ceil(len(pairs) / cols))
        fig = make_subplots(rows=nrows, cols=cols, subplot_titles=[f"{a} vs {b}" for a, b in pairs],
                            horizontal_spacing=0.07, vertical_spacing=0.2 if nrows > 1 else 0.1)
        shown = set()
        for k, (a, b) in enumerate(pairs):
            row, col = k // cols + 1, k % cols + 1
            for run in runs:
                g = frame[(frame["run"] == run) & (frame["series_a"] == a) & (frame["series_b"] == b)].sort_values("lag")
                if not len(g):
                    continue
                fig.add_trace(go.Scatter(x=g["lag"], y=g["corr"], mode="lines+markers", name=self.label(run),
                                         legendgroup=run, showlegend=run not in shown, customdata=g["n_overlap"],
                                         line=dict(color=self.color(run), width=2), marker=dict(size=5),
                                         hovertemplate="lag %{x}<br>r %{y:.3f}<br>%{customdata} epochs<extra></extra>"),
                              row=row, col=col)
                shown.add(run)
            fig.update_xaxes(title_text="lag L (epochs)", zeroline=True, row=row, col=col)
            fig.update_yaxes(range=[-1.05, 1.05], row=row, col=col)
        fig.update_yaxes(title_text="Pearson r", col=1)
        self._style(fig, "Cross-correlation r(a[t+L], b[t]) (a peak at L > 0: a follows b)", "", "",
                    height=330 * nrows + 100)
        fig.update_layout(margin_t=84)
        fig.update_annotations(font_size=12)
        return fig

    # ------------------------------------------------------------------ tables
    def family_calibration(self, family: str) -> str | None:
        cal = self.tables.get("calibration")
        if cal is None or not len(cal):
            return None
        cal = cal[cal["run"].astype(str).isin(self.family_runs(family))]
        if not len(cal):
            return None
        order = ["run", "epoch", "sampler", "lr_option", "localization_option", "lr", "localization", "nbeta_option",
                 "nbeta", "n_draws", "llc_mean", "llc_sem", "llc_std", "drift", "rhat", "ess", "diverged", "left_basin",
                 "not_at_minimum", "healthy", "llc_at_larger_step", "agrees_with_larger_step", "llc_truth",
                 "init_loss", "mean_sampled_loss", "recommended"]
        cols = [c for c in order if c in cal] + [c for c in cal if c not in order and c not in
                                                   ("optimizer", "step", "ckpt_hash", "config_hash")]
        cal = cal.sort_values([c for c in ("run", "epoch", "lr", "localization") if c in cal])
        rec = cal["recommended"].fillna(False).astype(bool) if "recommended" in cal else None
        table = html_table(cal[cols].assign(run=cal["run"].map(self.label)), highlight=rec)
        return table

    def fig_calibration(self, family: str):
        """The plateau: LLC +- s.e. against the step (eps x nbeta, log scale), one line per localization."""
        import plotly.graph_objects as go

        cal = self.tables["calibration"]
        cal = cal[cal["run"].astype(str).isin(self.family_runs(family))]
        if "lr_nbeta" not in cal or not len(cal):
            return None  # tables from before the equal-time calibration
        fig = go.Figure()
        for (run, epoch, loc), g in cal.groupby(["run", "epoch", "localization_option"], sort=False):
            g = g.sort_values("lr_nbeta")
            healthy = g["healthy"].fillna(False).astype(bool)
            fig.add_trace(go.Scatter(
                x=g["lr_nbeta"], y=g["llc_mean"], error_y=dict(type="data", array=g["llc_sem"], visible=True),
                mode="lines+markers", name=f"{self.label(str(run))} ep {epoch}, γ {loc}",
                marker=dict(size=[12 if r else 8 for r in g["recommended"].fillna(False)],
                            symbol=["circle" if h else "circle-open" for h in healthy]),
                hovertemplate="eps·nbeta %{x:.3g}<br>LLC %{y:.4g}<extra></extra>"))
        fig.update_xaxes(type="log")
        return self._style(fig, "Calibration: LLC against step size, per localization", "eps × nbeta",
                           "LLC (± s.e.)")

    def family_diagnostics(self, family: str) -> list[str]:
        runs = set(self.family_runs(family))
        items = []
        llc = self._main("llc")  # every checkpoint, mid-epoch ones too
        if llc is not None:
            for r in llc[llc["run"].astype(str).isin(runs)].sort_values(["run", "step"]).to_dict("records"):
                where = self._where(r)
                if _true(r.get("diverged")):
                    n = r.get("n_diverged")
                    items.append(f"LLC {where}: sampler diverged" + (f" ({n} chain(s))" if _present(n) else "") +
                                 " — lower --llc-lr or raise --llc-localization")
                if _true(r.get("left_basin")):
                    n = r.get("chains_left_basin")
                    items.append(f"LLC {where}: chains left the basin" + (f" ({n})" if _present(n) else "") +
                                 " — sampled loss near chance; the estimate is not local")
                rhat = r.get("rhat")
                high_rhat = _present(rhat) and rhat > RHAT_WARN
                # from the estimates rather than the column, so tables written before the flag existed get it too
                if _present(r.get("llc_mean")) and not_at_minimum(r["llc_mean"], r.get("llc_sem", math.nan)):
                    # R-hat is high here because the chains descend; more draws would not fix it
                    items.append(f"LLC {where}: not at a local minimum — the chains found lower loss than the "
                                 f"checkpoint (LLC {r['llc_mean']:.3g} ± {r['llc_sem']:.2g}); the LLC is not defined here"
                                 + (f" (R-hat {rhat:.3f} reflects the descent)" if high_rhat else ""))
                else:
                    if high_rhat:
                        items.append(f"LLC {where}: R-hat {rhat:.3f} > {RHAT_WARN} — chains disagree; more draws or chains")
                    if _present(r.get("drift")) and abs(r["drift"]) > DRIFT_MAX:
                        items.append(f"LLC {where}: drift {r['drift']:.2g} — the second half of the draws differs from "
                                     f"the first by more than {DRIFT_MAX:g} standard errors; a longer --llc-burnin")
                    if _present(r.get("llc_mean")) and r["llc_mean"] < 0:
                        items.append(f"LLC {where}: negative LLC {r['llc_mean']:.3g}, within {NOT_AT_MINIMUM_SE:g} "
                                     "standard errors of 0")
        h = self._main("hessian")
        if h is not None and "lambda_max" in h:
            for r in h[h["run"].astype(str).isin(runs)].sort_values(["run", "step"]).to_dict("records"):
                if _present(r.get("lambda_max")) and r["lambda_max"] <= 0:
                    items.append(f"Hessian {self._where(r)}: no positive curvature "
                                 f"(λ_max {r['lambda_max']:.3g}); rank undefined")
        errors = self.tables.get("errors")
        if errors is not None and len(errors) and "run" in errors:
            for r in errors[errors["run"].astype(str).isin(runs)].to_dict("records"):
                items.append(f"error in {r.get('estimator', '?')} at {self.label(str(r['run']))}, epoch "
                             f"{r.get('epoch', '?')}: {r.get('error', '')}: {str(r.get('message', ''))[:300]}")
        return items

    def _where(self, row: dict) -> str:
        run, epoch, step = str(row["run"]), int(row["epoch"]), row.get("step")
        text = f"{self.label(run)}, epoch {epoch}"
        end = self.end_step(run, epoch)
        if _present(step) and end is not None and int(step) != end:
            text += f" (mid-epoch, step {int(step)})"
        return text

    def runs_settings(self) -> pd.DataFrame:
        rows = []
        for family in self.families():
            for run in self.family_runs(family):
                info = self.infos[run]
                rec = info.record or {}
                opt = rec.get("optimizer") if isinstance(rec.get("optimizer"), dict) else {}
                cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}
                row = {"family": family, "run": run, "role": info.role, "optimizer": info.optimizer,
                       "parent": f"{info.parent} @ epoch {info.cut}" if info.parent else ""}
                runs = self.tables.get("runs")
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

    def estimator_settings(self) -> list[tuple[str, pd.DataFrame]]:
        out = []
        for table, columns in CONFIG_COLUMNS.items():
            frame = self.tables.get(table)
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

    # ------------------------------------------------------------------ page
    FIGURE_KINDS = (
        # kind, method, tables it needs (any of), how to compute it, wide
        ("loss", "fig_loss", ("training", "evaluate"), "the training log (runs/training tables)", False),
        ("update-norms", "fig_update_norms", ("training",), "the training log or steps.parquet", False),
        ("llc", "fig_llc", ("llc",), "analyze CKPTS --estimators llc", False),
        ("wbic", "fig_wbic", ("llc",), "analyze CKPTS --estimators llc", False),
        ("curvature", "fig_curvature", ("hessian", "fim"), "analyze CKPTS --estimators hessian,fim", True),
        ("llc-rank", "fig_llc_rank", ("llc+hessian",), "analyze CKPTS --estimators llc,hessian", False),
        ("spectrum", "fig_spectrum", ("hessian_spectrum",), "analyze CKPTS --estimators hessian", False),
        ("chains", "fig_chains", ("llc_chains",), "analyze CKPTS --estimators llc", True),
        ("hsic", "fig_hsic", ("hsic",), "analyze CKPTS --estimators hsic", True),
        ("xcorr", "fig_xcorr", ("xcorr",), "per-epoch series with at least 3 shared epochs", True),
    )
    GROUPS = (
        ("Training", ("loss", "update-norms")),
        ("Complexity: LLC and WBIC", ("llc", "wbic", "llc-rank", "chains")),
        ("Curvature", ("curvature", "spectrum")),
        ("HSIC information plane", ("hsic",)),
        ("Cross-correlation", ("xcorr",)),
    )
    CAPTIONS = {
        "loss": "Solid: training loss (mean over the epoch's minibatches; epoch 0: initial weights); dotted: "
                "validation loss. A swap branch starts at its trunk's cut-off epoch (dotted vertical line).",
        "update-norms": "Norm of each optimizer update ||Δw||; x is the fractional epoch (step k of an epoch of m "
                        "steps at e − 1 + k/m).",
        "llc": "Estimated local learning coefficient λ̂ at each checkpoint, plotted at its own epoch; bars: "
               "standard error over chains; hollow: not at a local minimum (the chains found lower loss than the "
               "checkpoint, so the LLC is undefined there). Dashed (right axis): validation loss.",
        "wbic": "WBIC = n·E_β[L_n(w)] at each checkpoint; dashed (right axis): validation loss.",
        "curvature": "Hessian trace (exact GGN-diagonal/dense value where it applies, else Hutchinson/Hutch++ "
                     "with its standard error), top eigenvalue and Fisher trace; dashed: validation loss.",
        "llc-rank": "Each point is one checkpoint. Singular learning theory bounds λ ≥ rank(H)/2 at a minimum: "
                    "points below the dashed line violate it (sampler problems, or not at a minimum).",
        "spectrum": "Hessian eigenvalue density at the first epoch, the cut-off and each run's last epoch "
                    "(SLQ nodes and weights broadened by a Gaussian; log scale shows the bulk and the outliers).",
        "chains": "Thin: the loss of each SGLD chain per draw (burn-in shaded); thick: its running mean after "
                  "burn-in. Converged chains flatten at a common level; R̂ near 1.",
        "hsic": "Each line is one layer's path through the information plane (HSIC with the input vs with the "
                "labels), marker colour = epoch (mid-epoch checkpoints at fractional epochs). A branch starts "
                "from the trunk's cut-off point.",
        "calibration": "Each line: one localization γ at the calibrated checkpoint; x: the drift's effective step "
                       "eps × nbeta, every step run for the same sampling time; bars: standard error over chains. "
                       "Hollow: not healthy (diverged, left the basin, not at a minimum, R̂ ≥ 1.1 or drifting); "
                       "large: recommended. Where the estimate stops changing as the step shrinks is the plateau.",
        "xcorr": "Pearson correlation of the z-scored series at lags, on the epochs where both exist (a branch "
                 "joined to its trunk). Lag L pairs a at epoch t+L with b at epoch t.",
    }

    def _missing(self, needs: tuple[str, ...]) -> bool:
        for need in needs:
            names = need.split("+")
            if all(self.tables.get(n) is not None and len(self.tables[n]) for n in names):
                return False
        return True

    def figure_html(self, fig, div_id: str, wide: bool, caption: str) -> str:
        self.figures[div_id] = fig
        height = int(fig.layout.height or 400)
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                          default_width="100%", default_height=f"{height}px",
                          config={"displaylogo": False, "responsive": True})
        return (f'<figure class="card{" wide" if wide else ""}" data-kind="{_esc(div_id)}">{div}'
                f"<figcaption>{_esc(caption)}</figcaption></figure>")

    def family_section(self, family: str) -> str:
        runs = self.family_runs(family)
        slug = _slug(family)
        cuts = self.cutoffs(family)
        kind = "swap" if cuts else "standard"
        sub = f"{kind} experiment" + (f", optimizer swapped after epoch {', '.join(map(str, cuts))}" if cuts else "")
        parts = [f'<section class="family" id="family-{slug}"><h2>{_esc(family)}</h2>',
                 f'<p class="sub">{_esc(sub)} · runs: ' +
                 " ".join(f'<span class="run" style="border-color:{self.color(r)}">{_esc(self.label(r))}'
                           f' <code>{_esc(r)}</code></span>' for r in runs) + "</p>"]
        kinds = {k[0]: k for k in self.FIGURE_KINDS}
        for title, members in self.GROUPS:
            blocks, missing = [], []
            for name in members:
                _, method, needs, how, wide = kinds[name]
                if name == "xcorr":
                    fig = getattr(self, method)(family)
                elif name == "update-norms":
                    fig = getattr(self, method)(family)
                elif self._missing(needs):
                    missing.append(f"{name}: not computed (no {' / '.join(needs).replace('+', ' and ')} table; "
                                   f"{how})")
                    continue
                else:
                    fig = getattr(self, method)(family)
                if fig is None:
                    missing.append(f"{name}: no data for this family's runs")
                    continue
                blocks.append(self.figure_html(fig, f"fig-{slug}-{name}", wide, self.CAPTIONS.get(name, "")))
            parts.append(f"<h3>{_esc(title)}</h3>")
            if blocks:
                parts.append('<div class="grid">' + "".join(blocks) + "</div>")
            for m in missing:
                parts.append(f'<p class="missing">{_esc(m)}</p>')
        parts.append("<h3>LLC calibration</h3>")
        cal = self.family_calibration(family)
        if cal is None:
            parts.append('<p class="missing">calibration: not computed for this family '
                         "(the calibration table sweeps the sampler's step size and localization)</p>")
        else:
            plateau = self.fig_calibration(family)
            if plateau is not None:
                parts.append(self.figure_html(plateau, f"fig-{slug}-calibration", False, self.CAPTIONS["calibration"]))
            parts.append('<p class="note">Highlighted: the recommended setting.</p>' + cal)
        parts.append("<h3>Diagnostics</h3>")
        items = self.family_diagnostics(family)
        if items:
            more = f"<li>... and {len(items) - MAX_WARNINGS} more</li>" if len(items) > MAX_WARNINGS else ""
            parts.append(f'<div class="warn"><strong>{len(items)} warning(s)</strong><ul>' +
                         "".join(f"<li>{_esc(i)}</li>" for i in items[:MAX_WARNINGS]) + more + "</ul></div>")
        else:
            checked = [t for t in ("llc", "hessian", "errors") if self.tables.get(t) is not None]
            parts.append(f'<p class="ok">No problems flagged ({_esc(", ".join(checked) or "nothing to check")}).</p>')
        parts.append("</section>")
        return "\n".join(parts)

    def global_warnings(self) -> list[str]:
        items = []
        errors = self.tables.get("errors")
        if errors is not None and len(errors):
            known = set(self.infos)
            stray = errors[~errors["run"].astype(str).isin(known)] if "run" in errors else errors
            for r in stray.to_dict("records"):
                items.append(f"error in {r.get('estimator', '?')}: {r.get('error', '')}: {str(r.get('message', ''))[:300]}")
            if len(errors):
                items.insert(0, f"{len(errors)} task(s) failed (the errors table); see each family's diagnostics")
        return items

    def settings_section(self) -> str:
        parts = ['<section id="settings"><h2>Settings</h2><h3>Runs</h3>']
        runs = self.runs_settings()
        parts.append(html_table(runs) if len(runs) else '<p class="missing">no runs</p>')
        parts.append("<h3>Estimators</h3>")
        configs = self.estimator_settings()
        if not configs:
            parts.append('<p class="missing">no estimator tables</p>')
        for table, frame in configs:
            parts.append(f"<h4>{_esc(table)}</h4>" + html_table(frame))
        parts.append("</section>")
        return "\n".join(parts)

    def build(self) -> str:
        families = self.families()
        sections = [self.family_section(f) for f in families]
        settings = self.settings_section()
        present = sorted(k for k, v in self.tables.items() if v is not None and len(v) and k != "epochs")
        expected = ("training", "evaluate", "llc", "llc_chains", "hessian", "hessian_spectrum", "fim", "hsic",
                    "weights", "calibration", XCORR_TABLE)
        absent = [t for t in expected if t not in present]
        head_notes = self.global_warnings()
        toc = "".join(f'<li><a href="#family-{_slug(f)}">{_esc(f)}</a></li>' for f in families)
        toc += '<li><a href="#settings">Settings</a></li>'
        meta = [f"generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}"]
        if self.source:
            meta.append(f"from <code>{_esc(self.source)}</code>")
        if self.ckpt_dir:
            meta.append(f"checkpoints <code>{_esc(self.ckpt_dir)}</code>")
        body = [f"<header><h1>{_esc(self.title)}</h1><p class='sub'>{' · '.join(meta)}</p>",
                f"<p class='sub'>tables: {_esc(', '.join(present) or 'none')}"
                + (f" · not computed: {_esc(', '.join(absent))}" if absent else "") + "</p>"]
        for n in self.notes:
            body.append(f"<p class='note'>{_esc(n)}</p>")
        if head_notes:
            body.append('<div class="warn"><ul>' + "".join(f"<li>{_esc(i)}</li>" for i in head_notes) + "</ul></div>")
        if not families:
            body.append('<p class="missing">No runs found in this analysis folder.</p>')
        body.append(f"<nav><ul>{toc}</ul></nav></header>")
        body += sections
        body.append(settings)
        body.append("<footer>How to read each figure: docs/report.md of ckpt-dynamics.</footer>")
        script = ""
        if self.figures:
            from plotly.offline import get_plotlyjs

            script = f'<script type="text/javascript">{get_plotlyjs()}</script>'
            # figures are drawn while the page is parsed, before the grid has its final column widths
            body.append(RESIZE_SCRIPT)
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{_esc(self.title)}</title><style>{CSS}</style>{script}</head>\n<body>\n"
                + "\n".join(body) + "\n</body></html>\n")


RESIZE_SCRIPT = """<script>window.addEventListener('load', function () {
  document.querySelectorAll('.plotly-graph-div').forEach(function (d) { Plotly.Plots.resize(d); });
});</script>"""

CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; color: #222;
       margin: 0 auto; padding: 12px 24px 40px; max-width: 1500px; background: #fafafa; }
h1 { font-size: 24px; margin: 8px 0 4px; } h2 { font-size: 20px; margin: 28px 0 4px; border-bottom: 2px solid #ddd; }
h3 { font-size: 16px; margin: 18px 0 6px; color: #333; } h4 { margin: 10px 0 4px; font-size: 14px; }
.sub { color: #555; margin: 2px 0; } .note { color: #555; font-size: 13px; }
nav ul { display: flex; flex-wrap: wrap; gap: 6px 16px; padding: 0; list-style: none; margin: 8px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 14px; }
figure.card { margin: 0; background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; padding: 6px 8px; min-width: 0; }
figure.card.wide { grid-column: 1 / -1; }
figcaption { color: #555; font-size: 12.5px; padding: 2px 6px 4px; }
.missing { color: #777; font-style: italic; margin: 4px 0; }
.warn { background: #fff4e5; border: 1px solid #f0b45a; border-radius: 6px; padding: 6px 12px; margin: 8px 0; }
.warn ul { margin: 4px 0; padding-left: 20px; } .ok { color: #2b7a3b; }
.run { border-left: 4px solid #999; padding: 0 6px; margin-right: 6px; white-space: nowrap; }
.table-wrap { overflow-x: auto; }
table.data { border-collapse: collapse; font-size: 12.5px; background: #fff; margin: 4px 0 10px; }
table.data th, table.data td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap;
       max-width: 420px; overflow: hidden; text-overflow: ellipsis; }
table.data th { background: #f0f0f0; } table.data tr.hl td { background: #e6f4ea; font-weight: 600; }
code { font-size: 12px; color: #444; } footer { margin-top: 30px; color: #777; font-size: 12px; }
"""


def report_figures(tables: dict[str, pd.DataFrame], ckpt_dir: str | Path | None = None) -> dict[str, Any]:
    """The report's plotly figures by div id (fig-<family>-<kind>), for tests and notebooks."""
    builder = ReportBuilder(tables, ckpt_dir=ckpt_dir)
    builder.build()
    return builder.figures


def build_report(tables: dict[str, pd.DataFrame], ckpt_dir: str | Path | None = None,
                 source: str | Path | None = None, title: str | None = None) -> str:
    """The report's HTML text for tables as analyze.load returns them."""
    return ReportBuilder(tables, ckpt_dir=ckpt_dir, source=source, title=title).build()


def write_report(out_dir: str | Path, path: str | Path | None = None, ckpt_dir: str | Path | None = None,
                 tables: dict[str, pd.DataFrame] | None = None, title: str | None = None) -> Path:
    """Write the HTML report of an analysis folder (default OUT/report.html) atomically; returns its path.

    ckpt_dir: the checkpoint folder, for per-step update norms (steps.parquet) and run.json settings;
    by default each run's folder recorded in the runs table (runs.path) is used when it exists.
    """
    from trainer.atomic import atomic_write_bytes

    out_dir = Path(out_dir)
    if tables is None:
        tables = load_tables(out_dir)
    text = build_report(tables, ckpt_dir=ckpt_dir, source=out_dir, title=title)
    return atomic_write_bytes(Path(path) if path else out_dir / REPORT_FILE, text.encode("utf-8"))


# =================================================================================== headless Chromium

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """$CHROMIUM, else /usr/bin/chromium (Debian's), else the first Chromium/Chrome on PATH; None if none."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if (os.path.isfile(env) and os.access(env, os.X_OK)) or shutil.which(env) else None
    if os.path.isfile("/usr/bin/chromium") and os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    pass


class _WebSocket:
    """A minimal RFC 6455 client (text frames, client masking, fragmentation, ping): enough for DevTools."""

    def __init__(self, url: str, timeout: float):
        u = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        self.buf = bytearray()
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise BrowserError("DevTools closed the connection during the WebSocket handshake")
            self.buf += chunk
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0] + b" ":
            raise BrowserError(f"DevTools WebSocket handshake failed: {head.splitlines()[0]!r}")
        self.buf = bytearray(rest)

    def settimeout(self, seconds: float) -> None:
        self.sock.settimeout(max(seconds, 0.01))

    def _frame(self, opcode: int, payload: bytes) -> None:
        header = bytearray([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header.append(0x80 | n)
        elif n < 1 << 16:
            header.append(0x80 | 126)
            header += struct.pack(">H", n)
        else:
            header.append(0x80 | 127)
            header += struct.pack(">Q", n)
        mask = os.urandom(4)
        body = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes() if n else b""
        self.sock.sendall(bytes(header) + mask + body)

    def send(self, text: str) -> None:
        self._frame(0x1, text.encode())

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(1 << 16, n - len(self.buf)))
            if not chunk:
                raise BrowserError("DevTools closed the connection")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def recv(self) -> str:
        message = bytearray()
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            data = self._read(n)
            if mask:
                data = (np.frombuffer(data, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
            if opcode == 0x8:
                raise BrowserError("DevTools closed the WebSocket")
            if opcode == 0x9:
                self._frame(0xA, data)
                continue
            if opcode == 0xA:
                continue
            message += data
            if b0 & 0x80:
                return message.decode("utf-8", errors="replace")

    def close(self) -> None:
        try:
            self._frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


@dataclass
class RenderResult:
    """What a headless Chromium saw: console errors and uncaught exceptions, and every plotly figure's
    state (id; svg: rendered .main-svg count; traces; points: data points; drawn: rendered trace groups;
    height, width in px; overflow: the plot sticks out of its card)."""
    errors: list[str]
    warnings: list[str]
    figures: list[dict]
    plotly_loaded: bool
    screenshot: Path | None = None
    timed_out: bool = False

    @property
    def empty_figures(self) -> list[str]:
        return [f["id"] for f in self.figures if f["svg"] < 1 or f["points"] < 1 or f["drawn"] < 1]


FIGURE_STATE_JS = """JSON.stringify({plotly: typeof window.Plotly !== 'undefined', ready: document.readyState,
 figures: Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => {
  const svg = d.querySelector('svg.main-svg');
  const box = (d.closest('figure') || d.parentElement).getBoundingClientRect();
  return {id: d.id,
   svg: d.querySelectorAll('svg.main-svg').length,
   traces: (d._fullData || []).length,
   points: (d._fullData || []).reduce((s, t) => s + Math.max((t.x && t.x.length) || 0, (t.y && t.y.length) || 0), 0),
   drawn: d.querySelectorAll('g.trace').length,
   height: Math.round(d.getBoundingClientRect().height),
   width: svg ? Math.round(svg.getBoundingClientRect().width) : 0,
   overflow: !!svg && svg.getBoundingClientRect().right > box.right + 1};
 })})"""


class Chromium:
    """A headless Chromium process and a DevTools session on its page (use as a context manager)."""

    def __init__(self, binary: str | None = None, timeout: float = 60.0):
        self.binary = binary or find_chromium()
        if not self.binary:
            raise BrowserError("Chromium not found (apt-get install chromium, or set $CHROMIUM)")
        self.timeout = timeout
        self.events: list[dict] = []
        self._id = 0
        self.proc = None
        self.ws = None

    def __enter__(self) -> "Chromium":
        self.profile = tempfile.mkdtemp(prefix="report-chromium-")
        self.log = open(os.path.join(self.profile, "chromium.log"), "wb")
        args = [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-extensions", "--hide-scrollbars",
                "--mute-audio", f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                     start_new_session=True)
        try:
            port = self._devtools_port()
            ws_url = self._page_target(port)
            self.ws = _WebSocket(ws_url, self.timeout)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _devtools_port(self) -> int:
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"Chromium exited with status {self.proc.returncode}: {self._log_tail()}")
            try:
                text = marker.read_text().split()
                if text:
                    return int(text[0])
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise BrowserError(f"Chromium did not open its DevTools port within {self.timeout:.0f} s: {self._log_tail()}")

    def _page_target(self, port: int) -> str:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    targets = json.loads(r.read())
                pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise BrowserError("Chromium has no page target")

    def _log_tail(self) -> str:
        try:
            self.log.flush()
            return Path(self.log.name).read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def __exit__(self, *exc) -> None:
        if self.ws is not None:
            # Browser.close exits cleanly, which also removes the folder Chromium keeps for its singleton socket
            # under $TMPDIR (org.chromium.Chromium.*); a signal leaves that folder behind
            try:
                self.call("Browser.close", timeout=5)
                self.proc.wait(10)
            except (BrowserError, OSError, subprocess.TimeoutExpired):
                pass
            self.ws.close()
            self.ws = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)  # the browser and its helper processes (our own session)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(getattr(self, "profile", ""), ignore_errors=True)

    # ------------------------------------------------------------------ protocol
    def call(self, method: str, timeout: float | None = None, **params) -> dict:
        self._id += 1
        ident = self._id
        self.ws.settimeout(timeout or self.timeout)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"DevTools {method}: no answer")
            self.ws.settimeout(remaining)
            try:
                msg = json.loads(self.ws.recv())
            except socket.timeout:
                raise BrowserError(f"DevTools {method}: no answer within the timeout") from None
            if msg.get("id") == ident:
                if "error" in msg:
                    raise BrowserError(f"DevTools {method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, name: str, timeout: float) -> dict | None:
        for i, e in enumerate(self.events):
            if e["method"] == name:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.ws.settimeout(deadline - time.monotonic())
            try:
                msg = json.loads(self.ws.recv())
            except socket.timeout:
                return None
            if msg.get("method") == name:
                return msg
            if "method" in msg:
                self.events.append(msg)
        return None

    def evaluate(self, expression: str, await_promise: bool = False):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in result:
            raise BrowserError(f"evaluate failed: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.ws.settimeout(deadline - time.monotonic())
            try:
                msg = json.loads(self.ws.recv())
            except socket.timeout:
                return
            if "method" in msg:
                self.events.append(msg)

    def console_messages(self) -> tuple[list[str], list[str]]:
        """(errors, warnings) from uncaught exceptions, console.error/assert/warn and the browser log."""
        errors, warns = [], []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                desc = (d.get("exception") or {}).get("description") or d.get("text", "exception")
                errors.append(f"uncaught: {desc} ({d.get('url', '')}:{d.get('lineNumber', '?')})")
            elif e["method"] == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                if p.get("type") in ("error", "assert"):
                    errors.append(f"console.{p['type']}: {text}")
                elif p.get("type") == "warning":
                    warns.append(f"console.warn: {text}")
            elif e["method"] == "Log.entryAdded":
                entry = p.get("entry", {})
                text = f"{entry.get('source', '')}: {entry.get('text', '')} {entry.get('url', '')}".strip()
                if entry.get("level") == "error":
                    errors.append(text)
                elif entry.get("level") == "warning":
                    warns.append(text)
        return errors, warns


def render(html_path: str | Path, png_path: str | Path | None = None, width: int = 1400, height: int = 1100,
           full_page: bool = False, timeout: float = 60.0, chromium: str | None = None) -> RenderResult:
    """Open an HTML file in headless Chromium, wait until every plotly figure is drawn (or `timeout`), and
    report console errors, uncaught exceptions and each figure's state; with png_path, save a screenshot
    (the viewport, or the whole page with full_page)."""
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(html_path)
    with Chromium(chromium, timeout=timeout) as browser:
        browser.call("Runtime.enable")
        browser.call("Log.enable")
        browser.call("Page.enable")
        browser.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                     mobile=False)
        browser.call("Page.navigate", url=html_path.as_uri())
        loaded = browser.wait_event("Page.loadEventFired", timeout) is not None
        state, deadline, timed_out = None, time.monotonic() + timeout, not loaded
        while loaded:
            state = json.loads(browser.evaluate(FIGURE_STATE_JS))
            if state["ready"] == "complete" and (not state["plotly"] or all(f["svg"] > 0 for f in state["figures"])):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            browser.drain(0.2)
        # two animation frames and a short pause: late errors (e.g. in plotly's async steps) are reported
        browser.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(1))))",
                         await_promise=True)
        browser.drain(0.3)
        state = json.loads(browser.evaluate(FIGURE_STATE_JS))
        shot = None
        if png_path is not None:
            if full_page:
                metrics = browser.call("Page.getLayoutMetrics")
                size = metrics.get("cssContentSize") or metrics.get("contentSize")
                browser.call("Emulation.setDeviceMetricsOverride", width=width,
                             height=int(min(max(size["height"], height), 16000)), deviceScaleFactor=1, mobile=False)
                browser.drain(0.5)
            data = browser.call("Page.captureScreenshot", format="png")["data"]
            shot = Path(png_path)
            shot.parent.mkdir(parents=True, exist_ok=True)
            from trainer.atomic import atomic_write_bytes

            atomic_write_bytes(shot, base64.b64decode(data))
        errors, warns = browser.console_messages()
    return RenderResult(errors, warns, state["figures"] if state else [], bool(state and state["plotly"]), shot,
                        timed_out)


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1400, height: int = 1100,
               full_page: bool = False, timeout: float = 60.0) -> Path:
    """Save a PNG of an HTML report as headless Chromium renders it; BrowserError on JavaScript errors."""
    result = render(html_path, png_path, width=width, height=height, full_page=full_page, timeout=timeout)
    if result.errors:
        raise BrowserError("JavaScript errors while rendering:\n" + "\n".join(result.errors))
    return result.screenshot


# =================================================================================== command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analyze.report",
                                description="Write the HTML report of an analysis folder, or a PNG screenshot of it.")
    p.add_argument("out", metavar="OUT", help="analysis folder (or, with --screenshot, an HTML file)")
    p.add_argument("png", nargs="?", help="with --screenshot: the PNG to write")
    p.add_argument("-o", "--output", help="report path (default OUT/report.html)")
    p.add_argument("--ckpt-dir", help="checkpoint folder (per-step update norms, run settings)")
    p.add_argument("--screenshot", action="store_true",
                   help="write the report (unless OUT is an HTML file) and save a screenshot to PNG")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1100)
    p.add_argument("--full-page", action="store_true", help="screenshot the whole page, not the first screen")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.screenshot and not a.png:
        p.error("--screenshot needs the PNG path: python -m analyze.report --screenshot OUT docs/report.png")
    if out.is_file() and out.suffix.lower() in (".html", ".htm"):
        html_file = out
    elif out.is_dir():
        html_file = write_report(out, a.output, ckpt_dir=a.ckpt_dir)
        print(f"report: {html_file}")
    else:
        p.error(f"{out}: not an analysis folder or an HTML file")
    if a.screenshot:
        try:
            result = render(html_file, a.png, width=a.width, height=a.height, full_page=a.full_page)
        except BrowserError as e:
            print(f"screenshot failed: {e}", file=sys.stderr)
            return 1
        for err in result.errors:
            print(f"javascript error: {err}", file=sys.stderr)
        print(f"screenshot: {result.screenshot} ({len(result.figures)} figures)")
        return 1 if result.errors or result.empty_figures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
