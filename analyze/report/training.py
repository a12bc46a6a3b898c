"""Training section: the loss curves and the optimizer's update norms."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analyze.report.data import ReportData
from analyze.report.style import cut_lines, style

MAX_STEP_POINTS = 3000  # per run in the update-norm figure (block means beyond)


def loss(data: ReportData, family: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    for run in data.family_runs(family):
        for name, dash, width in (("train_loss", "solid", 2.5), ("val_loss", "dot", 2.5)):
            s = data.joined_metric(run, name)
            if len(s):
                fig.add_trace(go.Scatter(x=s.index, y=s.to_numpy(), mode="lines+markers" if len(s) < 30 else "lines",
                                         name=f"{data.label(run)} {'train' if name == 'train_loss' else 'validation'}",
                                         line=dict(color=data.color(run), dash=dash, width=width),
                                         marker=dict(size=5),
                                         hovertemplate="epoch %{x}<br>%{y:.4g}<extra></extra>"))
    if not fig.data:
        return None
    cut_lines(data, fig, family)
    style(fig, "Training and validation loss", "epoch", "loss")
    fig.update_yaxes(rangemode="tozero")
    return fig


def _steps_file(data: ReportData, run: str) -> Path | None:
    info = data.infos.get(run)
    folders = [data.ckpt_dir / run] if data.ckpt_dir else []
    if info is not None and info.path:
        folders.append(Path(info.path))
    for folder in folders:
        if (folder / "steps.parquet").is_file():
            return folder / "steps.parquet"
    return None


def update_norms(data: ReportData, family: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    per_step = False
    for run in data.family_runs(family):
        path = _steps_file(data, run)
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
            name = f"{data.label(run)}"
            if k > 1:  # block means keep the page light
                m = len(y) // k * k
                x, y, s = x[:m].reshape(-1, k).mean(1), y[:m].reshape(-1, k).mean(1), s[:m:k]
                name += f" (mean of {k} steps)"
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=name, customdata=s,
                                       line=dict(color=data.color(run), width=1),
                                       hovertemplate="epoch %{x:.3f} (step %{customdata})<br>"
                                                     "update norm %{y:.4g}<extra></extra>"))
            per_step = True
        else:
            info_epochs = data.tables.get("training")
            if info_epochs is None or "update_norm_mean" not in info_epochs:
                continue
            rows = info_epochs[info_epochs["run"].astype(str) == run].sort_values("epoch")
            rows = rows[np.isfinite(rows["update_norm_mean"].to_numpy(dtype=float, na_value=np.nan))]
            if len(rows):
                fig.add_trace(go.Scatter(x=rows["epoch"], y=rows["update_norm_mean"], mode="lines+markers",
                                         name=f"{data.label(run)} (epoch mean)",
                                         line=dict(color=data.color(run), width=2),
                                         hovertemplate="epoch %{x}<br>mean update norm %{y:.4g}<extra></extra>"))
    if not fig.data:
        return None
    cut_lines(data, fig, family)
    title = "Update norms per step" if per_step else "Update norms (mean per epoch; per step needs the checkpoint folder)"
    style(fig, title, "epoch", "||Δw|| per step")
    return fig
