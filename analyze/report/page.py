"""The HTML page: a header, one section per run family (figures by group, calibration, diagnostics),
the settings, and plotly.js embedded once so the file opens offline."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import pandas as pd

from analyze.report import calibration
from analyze.report.data import ReportData
from analyze.report.diagnostics import MAX_WARNINGS, family_diagnostics, global_warnings
from analyze.report.figures import BY_NAME, CALIBRATION_CAPTION, GROUPS, Plot, draw
from analyze.report.markup import CSS, RESIZE_SCRIPT, esc, slug
from analyze.report.settings import settings_section
from analyze.tables import XCORR_TABLE

REPORT_FILE = "report.html"
TITLE = "Checkpoint dynamics report"
EXPECTED_TABLES = ("training", "evaluate", "llc", "llc_chains", "hessian", "hessian_spectrum", "fim", "hsic",
                   "weights", "calibration", XCORR_TABLE)


def family_plots(data: ReportData, family: str) -> list[Plot]:
    """Every figure of a family's section in page order, the calibration plateau last (if drawn)."""
    plots = [draw(data, family, BY_NAME[name], slug(family)) for _, names in GROUPS for name in names]
    plateau = calibration.plateau(data, family)
    if plateau is not None:
        plots.append(Plot(None, f"fig-{slug(family)}-calibration", plateau))
    return plots


def figure_html(fig, div_id: str, wide: bool, caption: str) -> str:
    height = int(fig.layout.height or 400)
    div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                      default_width="100%", default_height=f"{height}px",
                      config={"displaylogo": False, "responsive": True})
    return (f'<figure class="card{" wide" if wide else ""}" data-kind="{esc(div_id)}">{div}'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def family_section(data: ReportData, family: str, plots: list[Plot]) -> str:
    runs = data.family_runs(family)
    cuts = data.cutoffs(family)
    kind = "swap" if cuts else "standard"
    sub = f"{kind} experiment" + (f", optimizer swapped after epoch {', '.join(map(str, cuts))}" if cuts else "")
    parts = [f'<section class="family" id="family-{slug(family)}"><h2>{esc(family)}</h2>',
             f'<p class="sub">{esc(sub)} · runs: ' +
             " ".join(f'<span class="run" style="border-color:{data.color(r)}">{esc(data.label(r))}'
                      f' <code>{esc(r)}</code></span>' for r in runs) + "</p>"]
    by_kind = {p.kind.name: p for p in plots if p.kind is not None}
    for title, members in GROUPS:
        shown = [by_kind[m] for m in members]
        blocks = [figure_html(p.figure, p.div_id, p.kind.wide, p.kind.caption) for p in shown if p.figure]
        parts.append(f"<h3>{esc(title)}</h3>")
        if blocks:
            parts.append('<div class="grid">' + "".join(blocks) + "</div>")
        parts += [f'<p class="missing">{esc(p.missing)}</p>' for p in shown if p.missing]
    parts.append("<h3>LLC calibration</h3>")
    table = calibration.calibration_table(data, family)
    if table is None:
        parts.append('<p class="missing">calibration: not computed for this family '
                     "(the calibration table sweeps the sampler's step size and localization)</p>")
    else:
        parts += [figure_html(p.figure, p.div_id, False, CALIBRATION_CAPTION) for p in plots if p.kind is None]
        parts.append('<p class="note">Highlighted: the recommended setting.</p>' + table)
    parts.append("<h3>Diagnostics</h3>")
    items = family_diagnostics(data, family)
    if items:
        more = f"<li>... and {len(items) - MAX_WARNINGS} more</li>" if len(items) > MAX_WARNINGS else ""
        parts.append(f'<div class="warn"><strong>{len(items)} warning(s)</strong><ul>' +
                     "".join(f"<li>{esc(i)}</li>" for i in items[:MAX_WARNINGS]) + more + "</ul></div>")
    else:
        checked = [t for t in ("llc", "hessian", "errors") if data.tables.get(t) is not None]
        parts.append(f'<p class="ok">No problems flagged ({esc(", ".join(checked) or "nothing to check")}).</p>')
    parts.append("</section>")
    return "\n".join(parts)


def _header(data: ReportData, source, title: str) -> list[str]:
    families = data.families()
    tables = sorted(k for k, v in data.tables.items() if len(v) and k != "epochs")
    absent = [t for t in EXPECTED_TABLES if t not in tables]
    toc = "".join(f'<li><a href="#family-{slug(f)}">{esc(f)}</a></li>' for f in families)
    toc += '<li><a href="#settings">Settings</a></li>'
    meta = [f"generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}"]
    if source:
        meta.append(f"from <code>{esc(source)}</code>")
    if data.ckpt_dir:
        meta.append(f"checkpoints <code>{esc(data.ckpt_dir)}</code>")
    head = [f"<header><h1>{esc(title)}</h1><p class='sub'>{' · '.join(meta)}</p>",
            f"<p class='sub'>tables: {esc(', '.join(tables) or 'none')}"
            + (f" · not computed: {esc(', '.join(absent))}" if absent else "") + "</p>"]
    head += [f"<p class='note'>{esc(n)}</p>" for n in data.notes]
    warnings = global_warnings(data)
    if warnings:
        head.append('<div class="warn"><ul>' + "".join(f"<li>{esc(i)}</li>" for i in warnings) + "</ul></div>")
    if not families:
        head.append('<p class="missing">No runs found in this analysis folder.</p>')
    head.append(f"<nav><ul>{toc}</ul></nav></header>")
    return head


def render_page(data: ReportData, source: str | Path | None = None, title: str | None = None) -> str:
    """The report's HTML text."""
    title = title or TITLE
    plots = {family: family_plots(data, family) for family in data.families()}
    body = _header(data, source, title)
    body += [family_section(data, family, family_plots_) for family, family_plots_ in plots.items()]
    body.append(settings_section(data))
    body.append("<footer>How to read each figure: docs/report.md of ckpt-dynamics.</footer>")
    script = ""
    if any(p.figure for family_plots_ in plots.values() for p in family_plots_):
        from plotly.offline import get_plotlyjs

        script = f'<script type="text/javascript">{get_plotlyjs()}</script>'
        # figures are drawn while the page is parsed, before the grid has its final column widths
        body.append(RESIZE_SCRIPT)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style>{script}</head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def report_figures(tables: dict[str, pd.DataFrame], ckpt_dir: str | Path | None = None) -> dict:
    """The report's plotly figures by div id (fig-<family>-<kind>), for tests and notebooks."""
    data = ReportData.from_tables(tables, ckpt_dir)
    return {p.div_id: p.figure for family in data.families() for p in family_plots(data, family) if p.figure}


def build_report(tables: dict[str, pd.DataFrame], ckpt_dir: str | Path | None = None,
                 source: str | Path | None = None, title: str | None = None) -> str:
    """The report's HTML text for tables as analyze.load returns them."""
    return render_page(ReportData.from_tables(tables, ckpt_dir), source=source, title=title)


def write_report(out_dir: str | Path, path: str | Path | None = None, ckpt_dir: str | Path | None = None,
                 tables: dict[str, pd.DataFrame] | None = None, title: str | None = None) -> Path:
    """Write the HTML report of an analysis folder (default OUT/report.html) atomically; returns its path.

    ckpt_dir: the checkpoint folder, for per-step update norms (steps.parquet) and run.json settings;
    by default each run's folder recorded in the runs table (runs.path) is used when it exists.
    """
    from analyze.tables import load
    from common.atomic import atomic_write_bytes

    out_dir = Path(out_dir)
    if tables is None:
        tables = load(out_dir)
    text = build_report(tables, ckpt_dir=ckpt_dir, source=out_dir, title=title)
    return atomic_write_bytes(Path(path) if path else out_dir / REPORT_FILE, text.encode("utf-8"))
