"""The look every figure shares: template, title and legend layout, swap cut-off lines, validation loss."""

from __future__ import annotations

import functools

from analyze.report.data import ReportData


@functools.cache
def _template_layout() -> dict:
    import plotly.io as pio

    # plotly_white's layout only: the full template repeats ~8 kB of colour scales in every figure
    return pio.templates["plotly_white"].layout.to_plotly_json()


def template():
    import plotly.graph_objects as go

    return go.layout.Template(layout=_template_layout())


def style(fig, title: str, xtitle: str, ytitle: str, height: int = 400, legend: bool = True,
          secondary: bool = False):
    fig.update_layout(template=template(), height=height, hovermode="closest",
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


def secondary_axis_figure():
    from plotly.subplots import make_subplots

    return make_subplots(specs=[[{"secondary_y": True}]])


def cut_lines(data: ReportData, fig, family: str, **where) -> None:
    """Dotted vertical lines at the family's swap cut-off epochs (labelled "swap" on a single plot)."""
    cuts = data.cutoffs(family)
    for cut in cuts:
        fig.add_vline(x=cut, line=dict(color="rgba(0,0,0,0.45)", dash="dot", width=1), **where)
    if cuts and not where:
        fig.add_annotation(x=cuts[0], y=1, yref="paper", text="swap", showarrow=False,
                           xanchor="left", yanchor="bottom", font=dict(size=10, color="rgba(0,0,0,0.6)"))


def add_val_loss(data: ReportData, fig, run: str, showlegend: bool = True, **where) -> bool:
    """The run's validation loss, dashed, on the secondary axis; False if it has none."""
    import plotly.graph_objects as go

    val = data.joined_metric(run, "val_loss")
    if len(val):
        fig.add_trace(go.Scatter(x=val.index, y=val.to_numpy(), mode="lines", name=f"{data.label(run)} val loss",
                                 line=dict(color=data.color(run), dash="dash", width=1.5), opacity=0.75,
                                 legendgroup=f"val-{run}", showlegend=showlegend,
                                 hovertemplate="epoch %{x}<br>val loss %{y:.4g}<extra></extra>"),
                      secondary_y=True, **where)
    return len(val) > 0
