"""HSIC section: each layer's path through the information plane."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analyze.report.data import ReportData
from analyze.report.markup import esc
from analyze.report.style import style
from analyze.series import epoch_end_rows

LAYER_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf")


def hsic_plane(data: ReportData, family: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    hsic = data.tables.get("hsic")
    if hsic is None or not len(hsic) or not {"hsic_x", "hsic_y"} <= set(hsic.columns):
        return None
    hsic = data.main["hsic"].copy()
    hsic["run"] = hsic["run"].astype(str)
    if "layer_name" not in hsic:
        hsic["layer_name"] = hsic["layer"].astype(str)
    runs = [r for r in data.family_runs(family) if (hsic["run"] == r).any()]
    if not runs:
        return None
    cols = min(3, len(runs))
    nrows = int(math.ceil(len(runs) / cols))
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=[data.label(r) for r in runs],
                        horizontal_spacing=0.08, vertical_spacing=0.16)
    layers = hsic.drop_duplicates("layer_name").sort_values("layer" if "layer" in hsic else "layer_name")
    layer_names = list(layers["layer_name"].astype(str))
    shown, all_epochs = set(), []
    for k, run in enumerate(runs):
        row, col = k // cols + 1, k % cols + 1
        rows = hsic[hsic["run"] == run]
        info = data.infos.get(run)
        if info is not None and info.parent is not None and info.cut is not None:
            start = hsic[(hsic["run"] == info.parent) & (hsic["epoch"] == info.cut)]
            start = epoch_end_rows(start, data.ends)
            rows = pd.concat([start.assign(run=run), rows], ignore_index=True)
        for li, name in enumerate(layer_names):
            g = rows[rows["layer_name"].astype(str) == name].sort_values(["epoch", "step"])
            g = g[np.isfinite(g["hsic_x"].to_numpy(float)) & np.isfinite(g["hsic_y"].to_numpy(float))]
            if not len(g):
                continue
            ep = np.array([data.fractional_epoch(run, int(e), int(s)) for e, s in zip(g["epoch"], g["step"])])
            all_epochs.extend(ep.tolist())
            fig.add_trace(go.Scatter(
                x=g["hsic_x"].to_numpy(float), y=g["hsic_y"].to_numpy(float), mode="lines+markers", name=name,
                legendgroup=name, showlegend=name not in shown,
                line=dict(color=LAYER_PALETTE[li % len(LAYER_PALETTE)], width=1.5),
                marker=dict(size=7, color=ep, coloraxis="coloraxis",
                            line=dict(color=LAYER_PALETTE[li % len(LAYER_PALETTE)], width=1)),
                customdata=np.stack([ep, g["step"].to_numpy()], axis=1),
                hovertemplate=f"{esc(name)}<br>epoch %{{customdata[0]:.2f}} (step %{{customdata[1]}})<br>"
                              "HSIC(X,T) %{x:.4g}<br>HSIC(Y,T) %{y:.4g}<extra></extra>"), row=row, col=col)
            shown.add(name)
        fig.update_xaxes(title_text="HSIC(X, T)", row=row, col=col)
        fig.update_yaxes(title_text="HSIC(Y, T)", row=row, col=col)
    if not fig.data:
        return None
    # branches of one trunk share their axes, so the optimizers compare directly
    branches = [k for k, r in enumerate(runs) if data.infos.get(r) is not None and data.infos[r].parent]
    for k in branches[1:]:
        suffix = "" if branches[0] == 0 else str(branches[0] + 1)
        fig.update_xaxes(matches=f"x{suffix}", row=k // cols + 1, col=k % cols + 1)
        fig.update_yaxes(matches=f"y{suffix}", row=k // cols + 1, col=k % cols + 1)
    fig.update_layout(coloraxis=dict(colorscale="Viridis", cmin=min(all_epochs), cmax=max(all_epochs),
                                     colorbar=dict(title=dict(text="epoch"), thickness=12)))
    style(fig, "HSIC information plane (one trajectory per layer; marker colour: epoch)", "", "",
                height=380 * nrows + 100)
    fig.update_layout(margin_t=84)
    return fig
