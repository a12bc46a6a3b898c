"""HTML pieces of the report: escaping, value formatting, tables, and the page's style sheet."""

from __future__ import annotations

import html
import re
from typing import Any, Iterable

import numpy as np
import pandas as pd

from analyze.tables import present


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-") or "x"


def fmt(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return "" if np.isnan(value) else str(value)
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "[" + ", ".join(fmt(v) for v in list(value)[:8]) + (", ..." if len(value) > 8 else "") + "]"
    if not present(value):
        return ""
    return str(value)


def html_table(frame: pd.DataFrame, highlight: Iterable[bool] | None = None, cls: str = "data") -> str:
    """An escaped HTML table; rows where `highlight` is true get class "hl"."""
    marks = list(highlight) if highlight is not None else [False] * len(frame)
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    body = []
    for mark, row in zip(marks, frame.itertuples(index=False)):
        cells = "".join(f"<td>{esc(fmt(v))}</td>" for v in row)
        body.append(f'<tr class="hl">{cells}</tr>' if mark else f"<tr>{cells}</tr>")
    return (f'<div class="table-wrap"><table class="{cls}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


RESIZE_SCRIPT = """<script>window.addEventListener('load', function () {
  document.querySelectorAll('.plotly-graph-div').forEach(function (d) { Plotly.Plots.resize(d); });
});</script>"""

CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; color: #222;
       margin: 0 auto; padding: 12px 24px 40px; max-width: 1500px; background: #fafafa; }
h1 { font-size: 24px; margin: 8px 0 4px; } h2 { font-size: 20px; margin: 28px 0 4px; border-bottom: 2px solid #ddd; }
h3 { font-size: 16px; margin: 18px 0 6px; color: #333; } h4 { margin: 10px 0 4px; font-size: 14px; }
.sub { color: #555; margin: 2px 0; } .note { color: #555; font-size: 13px; }
nav ul { display: flex; flex-wrap: wrap; gap: 6px 16px; padding: 0; list-style: none; margin: 8px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 14px; }
figure.card { margin: 0; background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; padding: 6px 8px; min-width: 0; }
figure.card.wide { grid-column: 1 / -1; }
figcaption { color: #555; font-size: 12.5px; padding: 2px 6px 4px; }
.missing { color: #777; font-style: italic; margin: 4px 0; }
.warn { background: #fff4e5; border: 1px solid #f0b45a; border-radius: 6px; padding: 6px 12px; margin: 8px 0; }
.warn ul { margin: 4px 0; padding-left: 20px; } .ok { color: #2b7a3b; }
.run { border-left: 4px solid #999; padding: 0 6px; margin-right: 6px; white-space: nowrap; }
.table-wrap { overflow-x: auto; }
table.data { border-collapse: collapse; font-size: 12.5px; background: #fff; margin: 4px 0 10px; }
table.data th, table.data td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap;
       max-width: 420px; overflow: hidden; text-overflow: ellipsis; }
table.data th { background: #f0f0f0; } table.data tr.hl td { background: #e6f4ea; font-weight: 600; }
code { font-size: 12px; color: #444; } footer { margin-top: 30px; color: #777; font-size: 12px; }
"""
