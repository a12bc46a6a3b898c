"""Curvature section: Hessian and Fisher traces, top eigenvalue, Hessian spectral densities."""

from __future__ import annotations

import math

import numpy as np

from analyze.report.data import ReportData
from analyze.report.style import add_val_loss, cut_lines, style

SPECTRUM_GRID = 600
SPECTRUM_BROADENING = 0.01  # Gaussian sigma as a fraction of the spectrum's range


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


def curvature(data: ReportData, family: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = []
    h, f = data.frames["hessian"], data.frames["fim"]
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
        for i, run in enumerate(data.family_runs(family)):
            s = data.joined_metric(run, name)
            if not len(s):
                continue
            err = None
            if name == "hessian_trace" and h is not None and "trace_stderr" in h:
                # where the exact trace is shown, its error is the subsample's (trace_exact_stderr, none in
                # tables written before it existed); elsewhere the stochastic estimate's
                exact = data.joined_column(run, "hessian", "trace_exact")
                se = data.joined_column(run, "hessian", "trace_stderr").reindex(s.index)
                shown_exact = exact.reindex(s.index).notna().to_numpy()
                if "trace_exact_stderr" in h:
                    exact_se = data.joined_column(run, "hessian", "trace_exact_stderr")
                    se[shown_exact] = exact_se.reindex(s.index).to_numpy()[shown_exact]
                else:
                    se[shown_exact] = 0.0
                err = dict(type="data", array=se.fillna(0).to_numpy(), visible=True, thickness=1, width=2)
            fig.add_trace(go.Scatter(x=s.index, y=s.to_numpy(), mode="lines+markers", name=data.label(run),
                                     legendgroup=run, showlegend=col == 1, error_y=err,
                                     line=dict(color=data.color(run), width=2.2), marker=dict(size=5),
                                     hovertemplate=f"epoch %{{x}}<br>{title} %{{y:.4g}}<extra></extra>"),
                          row=1, col=col, secondary_y=False)
            add_val_loss(data, fig, run, showlegend=col == 1, row=1, col=col)
            drawn = True
    if not drawn:
        return None
    for col in range(1, len(panels) + 1):
        fig.update_xaxes(title_text="epoch", row=1, col=col)
        fig.update_yaxes(secondary_y=True, showgrid=False, row=1, col=col,
                         title_text="validation loss" if col == len(panels) else None)
        cut_lines(data, fig, family, row=1, col=col)
    style(fig, "Curvature and validation loss (dashed, right axis)", "", "")
    fig.update_layout(margin_t=84)
    return fig


def spectrum(data: ReportData, family: str):
    import plotly.graph_objects as go

    if not data.has("hessian_spectrum"):
        return None
    fig = go.Figure()
    dashes = ("solid", "dash", "dot", "dashdot", "longdash")
    for i, (run, epoch, label) in enumerate(data.chosen_checkpoints(family, "hessian_spectrum")):
        rows = data.checkpoint_rows("hessian_spectrum", run, epoch)
        rows = rows[np.isfinite(rows["node"].to_numpy(float)) & np.isfinite(rows["weight"].to_numpy(float))]
        if not len(rows):
            continue
        runs = rows["slq_run"].to_numpy() if "slq_run" in rows else None
        grid, density = spectral_density(rows["node"].to_numpy(float), rows["weight"].to_numpy(float), runs)
        floor = max(density.max() * 1e-7, 1e-300)
        fig.add_trace(go.Scatter(x=grid, y=np.maximum(density, floor), mode="lines", name=label,
                                 line=dict(color=data.color(run), dash=dashes[i % len(dashes)], width=1.8),
                                 hovertemplate="λ %{x:.4g}<br>density %{y:.3g}<extra></extra>"))
    if not fig.data:
        return None
    style(fig, "Hessian spectral density", "eigenvalue λ",
                "density (log)")
    fig.update_yaxes(type="log", exponentformat="power")
    return fig
