"""LLC calibration section: the plateau figure and the sweep's table."""

from __future__ import annotations

from analyze.llc.calibration_table import grid_rows
from analyze.report.data import ReportData
from analyze.report.markup import html_table
from analyze.report.style import style


def calibration_table(data: ReportData, family: str) -> str | None:
    """The family's calibration sweep as an HTML table (recommended row highlighted); None if it has none."""
    cal = data.tables.get("calibration")
    if cal is None or not len(cal):
        return None
    cal = cal[cal["run"].astype(str).isin(data.family_runs(family))]
    if not len(cal):
        return None
    order = ["run", "epoch", "stage", "sampler", "lr_option", "localization_option", "lr", "localization",
             "nbeta_option", "nbeta", "n_chains", "n_draws", "n_burnin", "llc_mean", "llc_sem", "llc_std", "drift",
             "rhat", "ess", "diverged", "left_basin", "not_at_minimum", "healthy", "llc_at_larger_step",
             "agrees_with_larger_step", "llc_truth", "init_loss", "mean_sampled_loss", "recommended"]
    cols = [c for c in order if c in cal] + [c for c in cal if c not in order and c not in
                                               ("optimizer", "step", "ckpt_hash", "config_hash")]
    cal = cal.sort_values([c for c in ("run", "epoch", "lr", "localization") if c in cal])
    rec = cal["recommended"].fillna(False).astype(bool) if "recommended" in cal else None
    return html_table(cal[cols].assign(run=cal["run"].map(data.label)), highlight=rec)


def plateau(data: ReportData, family: str):
    """The plateau: LLC +- s.e. against the step (eps x nbeta, log scale), one line per localization."""
    import plotly.graph_objects as go

    cal = data.tables.get("calibration")
    if cal is None:
        return None
    cal = grid_rows(cal[cal["run"].astype(str).isin(data.family_runs(family))])  # confirmation runs: other lengths
    if "lr_nbeta" not in cal or not len(cal):
        return None  # tables from before the equal-time calibration
    fig = go.Figure()
    for (run, epoch, loc), g in cal.groupby(["run", "epoch", "localization_option"], sort=False):
        g = g.sort_values("lr_nbeta")
        healthy = g["healthy"].fillna(False).astype(bool)
        fig.add_trace(go.Scatter(
            x=g["lr_nbeta"], y=g["llc_mean"], error_y=dict(type="data", array=g["llc_sem"], visible=True),
            mode="lines+markers", name=f"{data.label(str(run))} ep {epoch}, γ {loc}",
            marker=dict(size=[12 if r else 8 for r in g["recommended"].fillna(False)],
                        symbol=["circle" if h else "circle-open" for h in healthy]),
            hovertemplate="eps·nbeta %{x:.3g}<br>LLC %{y:.4g}<extra></extra>"))
    fig.update_xaxes(type="log")
    return style(fig, "Calibration: LLC against step size, per localization", "eps × nbeta", "LLC (± s.e.)")
