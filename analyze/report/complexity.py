"""Complexity section: LLC, WBIC, LLC against rank(H)/2, and the SGLD chains."""

from __future__ import annotations

import math

import numpy as np

from analyze.llc.statistics import DRIFT_MAX, not_at_minimum
from analyze.report.data import ReportData
from analyze.report.style import add_val_loss, cut_lines, secondary_axis_figure, style
from analyze.tables import present

CHAIN_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
MAX_CHAIN_POINTS = 400  # per chain trace in the convergence figure
RHAT_WARN = 1.1


def thin_indices(n: int, limit: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def llc(data: ReportData, family: str):
    import plotly.graph_objects as go

    if data.frames["llc"] is None:
        return None
    fig = secondary_axis_figure()
    at_minimum = []  # (low, high) of every estimate at a local minimum: they set the y-range
    for run in data.family_runs(family):
        values = data.joined_column(run, "llc", "llc_mean")
        if not len(values):
            continue
        sem = data.joined_column(run, "llc", "llc_sem")
        sem = sem.reindex(values.index)
        # hollow markers where w* is not a local minimum (the LLC is undefined there)
        undefined = [not_at_minimum(v, e) for v, e in zip(values.to_numpy(), sem.to_numpy())]
        at_minimum += [(v - np.nan_to_num(e), v + np.nan_to_num(e)) for v, e, u in
                       zip(values.to_numpy(), sem.to_numpy(), undefined) if not u and np.isfinite(v)]
        fig.add_trace(go.Scatter(x=values.index, y=values.to_numpy(), mode="lines+markers",
                                 name=f"{data.label(run)} LLC",
                                 line=dict(color=data.color(run), width=2.5),
                                 marker=dict(size=6, symbol=["circle-open" if u else "circle" for u in undefined]),
                                 error_y=dict(type="data", array=sem.fillna(0).to_numpy(), visible=True,
                                              thickness=1.2, width=3),
                                 customdata=["<br>not at a local minimum" if u else "" for u in undefined],
                                 hovertemplate="epoch %{x}<br>LLC %{y:.4g}%{customdata}<extra></extra>"),
                      secondary_y=False)
        add_val_loss(data, fig, run)
    if not fig.data:
        return None
    cut_lines(data, fig, family)
    style(fig, "LLC (± s.e.m.) and validation loss", "epoch", "LLC  λ̂", secondary=True)
    fig.update_yaxes(title_text="validation loss", secondary_y=True, showgrid=False)
    if at_minimum:
        # the LLC is undefined away from a minimum, and early epochs' large negative values would squash
        # the curves that matter into a line: the axis spans the estimates at a minimum (the others clip)
        low, high = min(lo for lo, _ in at_minimum), max(hi for _, hi in at_minimum)
        pad = 0.05 * (high - low) or 0.05 * abs(high) or 1.0
        fig.update_yaxes(range=[low - pad, high + pad], secondary_y=False)
    return fig


def wbic(data: ReportData, family: str):
    import plotly.graph_objects as go

    if data.frames["llc"] is None or "wbic" not in data.frames["llc"]:
        return None
    fig = secondary_axis_figure()
    for run in data.family_runs(family):
        w = data.joined_column(run, "llc", "wbic")
        if not len(w):
            continue
        fig.add_trace(go.Scatter(x=w.index, y=w.to_numpy(), mode="lines+markers", name=f"{data.label(run)} WBIC",
                                 line=dict(color=data.color(run), width=2.5), marker=dict(size=6),
                                 hovertemplate="epoch %{x}<br>WBIC %{y:.5g}<extra></extra>"), secondary_y=False)
        add_val_loss(data, fig, run)
    if not fig.data:
        return None
    exact = data.frames["llc"].get("wbic_exact")
    note = "" if exact is None else (" (exact)" if bool(exact.all()) else " (localized/tempered)")
    cut_lines(data, fig, family)
    style(fig, "WBIC and validation loss", "epoch", "WBIC" + note, secondary=True)
    fig.update_yaxes(title_text="validation loss", secondary_y=True, showgrid=False)
    return fig


def llc_rank(data: ReportData, family: str):
    import plotly.graph_objects as go

    llc, h = data.frames["llc"], data.frames["hessian"]
    if llc is None or h is None or "rank_estimate" not in h:
        return None
    fig = go.Figure()
    top = 0.0
    n_params = None
    for run in data.family_runs(family):
        lam = data.column(run, "llc", "llc_mean")
        sem = data.column(run, "llc", "llc_sem")
        rank = data.column(run, "hessian", "rank_estimate")
        epochs = lam.index.intersection(rank.index)
        if not len(epochs):
            continue
        x, y = rank.loc[epochs].to_numpy() / 2, lam.loc[epochs].to_numpy()
        top = max(top, float(np.nanmax(x)), float(np.nanmax(y)))
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers+lines", name=data.label(run),
                                 line=dict(color=data.color(run), width=1), opacity=0.9,
                                 marker=dict(size=8, color=data.color(run)), customdata=np.asarray(epochs),
                                 error_y=dict(type="data", array=sem.reindex(epochs).fillna(0).to_numpy(),
                                              visible=True, thickness=1, width=2),
                                 hovertemplate="epoch %{customdata}<br>rank/2 %{x:.4g}<br>LLC %{y:.4g}<extra></extra>"))
        if "n_params" in h:
            p = data.column(run, "hessian", "n_params")
            n_params = int(p.max()) if len(p) else n_params
    if not fig.data:
        return None
    top = top * 1.08 if top > 0 else 1.0
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="LLC = rank/2",
                             line=dict(color="black", dash="dash", width=1), hoverinfo="skip"))
    title = "LLC against rank(H)/2 (SLT: LLC ≥ rank/2)"
    style(fig, title, "rank(Hessian) / 2" + (f"   (d/2 = {n_params / 2:g})" if n_params else ""), "LLC  λ̂")
    return fig


def chains(data: ReportData, family: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not data.has("llc_chains"):
        return None
    picks = data.chosen_checkpoints(family, "llc_chains")
    if not picks:
        return None
    llc = data.frames["llc"]
    titles = []
    for run, epoch, label in picks:
        text = label
        if llc is not None:
            row = llc[(llc["run"] == run) & (llc["epoch"] == epoch)]
            if len(row):
                r = row.iloc[0]
                bits = []
                if "rhat" in r and present(r["rhat"]):
                    flag = " ⚠" if r["rhat"] > RHAT_WARN else ""
                    bits.append(f"R̂ {r['rhat']:.3f}{flag}")
                if "drift" in r and present(r["drift"]):
                    bits.append(f"drift {r['drift']:.2g}" + (" ⚠" if abs(r["drift"]) > DRIFT_MAX else ""))
                if "llc_mean" in r and present(r["llc_mean"]):
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
        rows = data.checkpoint_rows("llc_chains", run, epoch)
        burn_lo = None
        for chain, g in rows.groupby("chain"):
            g = g.sort_values("draw")
            draw, loss = g["draw"].to_numpy(), g["loss"].to_numpy(float)
            kept = draw >= 0
            if "burnin" in g:
                kept = ~g["burnin"].to_numpy(bool)
            color = CHAIN_PALETTE[int(chain) % len(CHAIN_PALETTE)]
            idx = thin_indices(len(draw), MAX_CHAIN_POINTS)
            fig.add_trace(go.Scatter(x=draw[idx], y=loss[idx], mode="lines", line=dict(color=color, width=0.7),
                                     opacity=0.35, name=f"chain {chain} loss", legendgroup=f"raw{chain}",
                                     showlegend=f"raw{chain}" not in shown, hoverinfo="skip"), row=row, col=col)
            shown.add(f"raw{chain}")
            if kept.any():
                d, l = draw[kept], loss[kept]
                running = np.cumsum(l) / np.arange(1, len(l) + 1)
                idx = thin_indices(len(d), MAX_CHAIN_POINTS)
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
            if len(r) and "init_loss" in r and present(r["init_loss"].iloc[0]):
                fig.add_hline(y=float(r["init_loss"].iloc[0]), line=dict(color="black", dash="dot", width=1),
                              row=row, col=col)
        fig.update_xaxes(title_text="draw (burn-in shaded, < 0)", row=row, col=col)
    fig.update_yaxes(title_text="loss", col=1)
    style(fig, "SGLD chains: running-mean loss per chain (dotted: the checkpoint's loss L(w*))",
                "", "", height=330 * nrows + 110)
    fig.update_layout(margin_t=100)
    fig.update_annotations(font_size=11)
    return fig
