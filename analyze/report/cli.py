"""`python -m analyze.report OUT` writes OUT/report.html; with --screenshot, a PNG of it as Chromium draws it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analyze.report.browser import BrowserError, render
from analyze.report.page import write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analyze.report",
                                description="Write the HTML report of an analysis folder, or a PNG screenshot of it.")
    p.add_argument("out", metavar="OUT", help="analysis folder (or, with --screenshot, an HTML file)")
    p.add_argument("png", nargs="?", help="with --screenshot: the PNG to write")
    p.add_argument("-o", "--output", help="report path (default OUT/report.html)")
    p.add_argument("--ckpt-dir", help="checkpoint folder (per-step update norms, run settings)")
    p.add_argument("--screenshot", action="store_true",
                   help="write the report (unless OUT is an HTML file) and save a screenshot to PNG")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1100)
    p.add_argument("--full-page", action="store_true", help="screenshot the whole page, not the first screen")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.screenshot and not a.png:
        p.error("--screenshot needs the PNG path: python -m analyze.report --screenshot OUT docs/report.png")
    if out.is_file() and out.suffix.lower() in (".html", ".htm"):
        html_file = out
    elif out.is_dir():
        html_file = write_report(out, a.output, ckpt_dir=a.ckpt_dir)
        print(f"report: {html_file}")
    else:
        p.error(f"{out}: not an analysis folder or an HTML file")
    if a.screenshot:
        try:
            result = render(html_file, a.png, width=a.width, height=a.height, full_page=a.full_page)
        except BrowserError as e:
            print(f"screenshot failed: {e}", file=sys.stderr)
            return 1
        for err in result.errors:
            print(f"javascript error: {err}", file=sys.stderr)
        print(f"screenshot: {result.screenshot} ({len(result.figures)} figures)")
        return 1 if result.errors or result.empty_figures else 0
    return 0
