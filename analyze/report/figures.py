"""The table of the report's figures: what each draws, the tables it needs, its caption and its group.

Each figure is a plain function `(data, family) -> plotly Figure | None` (None: no data for this
family's runs). Adding a figure is one line in FIGURES and its name in a group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from analyze.report import complexity, correlation, curvature, hsic, training
from analyze.report.data import ReportData


@dataclass(frozen=True)
class FigureKind:
    name: str  # the figure's div id is fig-<family>-<name>
    draw: Callable[[ReportData, str], Any]
    needs: tuple[str, ...]  # tables it needs, any of them ("a+b": both); () draws from what it finds
    how: str  # how to compute the tables it needs
    wide: bool  # spans the page's grid
    caption: str


FIGURES = (
    FigureKind("loss", training.loss, ("training", "evaluate"), "the training log (runs/training tables)", False,
               "Solid: training loss (mean over the epoch's minibatches; epoch 0: initial weights); dotted: "
               "validation loss. A swap branch starts at its trunk's cut-off epoch (dotted vertical line)."),
    # per step from steps.parquet, else the training table's epoch means
    FigureKind("update-norms", training.update_norms, (), "", False,
               "Norm of each optimizer update ||Δw||; x is the fractional epoch (step k of an epoch of m "
               "steps at e − 1 + k/m)."),
    FigureKind("llc", complexity.llc, ("llc",), "analyze CKPTS --estimators llc", False,
               "Estimated local learning coefficient λ̂ at each checkpoint, plotted at its own epoch; bars: "
               "standard error over chains; hollow: not at a local minimum (the chains found lower loss than the "
               "checkpoint, so the LLC is undefined there). Dashed (right axis): validation loss."),
    FigureKind("wbic", complexity.wbic, ("llc",), "analyze CKPTS --estimators llc", False,
               "WBIC = n·E_β[L_n(w)] at each checkpoint; dashed (right axis): validation loss."),
    FigureKind("curvature", curvature.curvature, ("hessian", "fim"), "analyze CKPTS --estimators hessian,fim", True,
               "Hessian trace (exact GGN-diagonal/dense value where it applies, else Hutchinson/Hutch++ "
               "with its standard error), top eigenvalue and Fisher trace; dashed: validation loss."),
    FigureKind("llc-rank", complexity.llc_rank, ("llc+hessian",), "analyze CKPTS --estimators llc,hessian", False,
               "Each point is one checkpoint. Singular learning theory bounds λ ≥ rank(H)/2 at a minimum: "
               "points below the dashed line violate it (sampler problems, or not at a minimum)."),
    FigureKind("spectrum", curvature.spectrum, ("hessian_spectrum",), "analyze CKPTS --estimators hessian", False,
               "Hessian eigenvalue density at the first epoch, the cut-off and each run's last epoch "
               "(SLQ nodes and weights broadened by a Gaussian; log scale shows the bulk and the outliers)."),
    FigureKind("chains", complexity.chains, ("llc_chains",), "analyze CKPTS --estimators llc", True,
               "Thin: the loss of each SGLD chain per draw (burn-in shaded); thick: its running mean after "
               "burn-in. Converged chains flatten at a common level; R̂ near 1."),
    FigureKind("hsic", hsic.hsic_plane, ("hsic",), "analyze CKPTS --estimators hsic", True,
               "Each line is one layer's path through the information plane (HSIC with the input vs with the "
               "labels), marker colour = epoch (mid-epoch checkpoints at fractional epochs). A branch starts "
               "from the trunk's cut-off point."),
    # from the xcorr table, or computed for the report from the per-epoch series
    FigureKind("xcorr", correlation.xcorr, (), "", True,
               "Pearson correlation of the z-scored series at lags, on the epochs where both exist (a branch "
               "joined to its trunk). Lag L pairs a at epoch t+L with b at epoch t."),
)
BY_NAME = {kind.name: kind for kind in FIGURES}
GROUPS = (
    ("Training", ("loss", "update-norms")),
    ("Complexity: LLC and WBIC", ("llc", "wbic", "llc-rank", "chains")),
    ("Curvature", ("curvature", "spectrum")),
    ("HSIC information plane", ("hsic",)),
    ("Cross-correlation", ("xcorr",)),
)
CALIBRATION_CAPTION = (
    "Each line: one localization γ at the calibrated checkpoint; x: the drift's effective step "
    "eps × nbeta, every step run for the same sampling time; bars: standard error over chains. "
    "Hollow: not healthy (diverged, left the basin, not at a minimum, R̂ ≥ 1.1 or drifting); "
    "large: recommended. Where the estimate stops changing as the step shrinks is the plateau.")


@dataclass(frozen=True)
class Plot:
    """One figure of a family's section, or why it is absent."""
    kind: FigureKind | None  # None: the calibration plateau (drawn in its own part of the section)
    div_id: str
    figure: Any = None
    missing: str | None = None


def _missing_tables(data: ReportData, needs: tuple[str, ...]) -> bool:
    return bool(needs) and not any(all(data.has(t) for t in need.split("+")) for need in needs)


def draw(data: ReportData, family: str, kind: FigureKind, slug: str) -> Plot:
    div_id = f"fig-{slug}-{kind.name}"
    if _missing_tables(data, kind.needs):
        tables = " / ".join(kind.needs).replace("+", " and ")
        return Plot(kind, div_id, missing=f"{kind.name}: not computed (no {tables} table; {kind.how})")
    figure = kind.draw(data, family)
    if figure is None:
        return Plot(kind, div_id, missing=f"{kind.name}: no data for this family's runs")
    return Plot(kind, div_id, figure)
