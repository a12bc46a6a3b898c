"""Cross-correlation section: Pearson r at lags between per-epoch series."""

from __future__ import annotations

import math

from analyze.report.data import ReportData
from analyze.report.style import style
from analyze.xcorr import DEFAULT_PAIRS

XCORR_PLOT_PAIRS = tuple(p for p in DEFAULT_PAIRS if not p[1].startswith("hsic"))


def xcorr(data: ReportData, family: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    frame = data.xcorr
    if frame is None or not len(frame):
        return None
    runs = data.family_runs(family)
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
            fig.add_trace(go.Scatter(x=g["lag"], y=g["corr"], mode="lines+markers", name=data.label(run),
                                     legendgroup=run, showlegend=run not in shown, customdata=g["n_overlap"],
                                     line=dict(color=data.color(run), width=2), marker=dict(size=5),
                                     hovertemplate="lag %{x}<br>r %{y:.3f}<br>%{customdata} epochs<extra></extra>"),
                          row=row, col=col)
            shown.add(run)
        fig.update_xaxes(title_text="lag L (epochs)", zeroline=True, row=row, col=col)
        fig.update_yaxes(range=[-1.05, 1.05], row=row, col=col)
    fig.update_yaxes(title_text="Pearson r", col=1)
    style(fig, "Cross-correlation r(a[t+L], b[t]) (a peak at L > 0: a follows b)", "", "",
                height=330 * nrows + 100)
    fig.update_layout(margin_t=84)
    fig.update_annotations(font_size=12)
    return fig
