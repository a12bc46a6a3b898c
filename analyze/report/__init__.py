"""A self-contained HTML report of an analysis folder (plotly figures, plotly.js embedded once: opens offline).

    from analyze.report import write_report, screenshot
    write_report("OUT")                              # OUT/report.html
    write_report("OUT", ckpt_dir="ckpts")           # per-step update norms from ckpts/<run>/steps.parquet
    screenshot("OUT/report.html", "docs/report.png", width=1400, height=1100)   # needs the [screenshot] extra

    python -m analyze.report OUT [-o PATH] [--ckpt-dir DIR]
    python -m analyze.report --screenshot OUT docs/report.png [--width W --height H --full-page]

One section per run family (model): losses, update norms, LLC and WBIC against validation loss, Hessian
and Fisher curvature, LLC against rank(H)/2, Hessian spectral densities, LLC chain convergence, the HSIC
information plane, cross-correlations, calibration, diagnostics; then every run's and estimator's settings.
A swap branch is drawn from its parent's cut-off epoch on (the trunk is shared); every value is plotted at
the epoch of its checkpoint, and per-epoch series use epoch-end checkpoints only. A missing table skips its
figures with a "not computed" note. docs/report.md says how to read each section.

Layout: `data` (ReportData: tables, lineage, series, computed once), one module per section's figures
(`training`, `complexity`, `curvature`, `hsic`, `correlation`, `calibration`), `figures` (the table of
figure functions), `diagnostics`, `settings`, `page` (HTML assembly), `browser` (headless Chromium).
"""

from analyze.report.browser import BrowserError, RenderResult, find_chromium, render, screenshot
from analyze.report.curvature import spectral_density
from analyze.report.data import ReportData, RunInfo, run_infos
from analyze.report.markup import html_table
from analyze.report.page import REPORT_FILE, build_report, report_figures, write_report

__all__ = ["BrowserError", "REPORT_FILE", "RenderResult", "ReportData", "RunInfo", "build_report", "find_chromium",
           "html_table", "render", "report_figures", "run_infos", "screenshot", "spectral_density", "write_report"]
