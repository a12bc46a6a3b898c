"""Open a report in the system's headless Chromium (driven by Playwright): console errors, uncaught
exceptions, each figure's drawn state, and a PNG screenshot.

Playwright is an optional extra (`pip install 'ckpt-dynamics[screenshot]'`, also in `[test]`); it
drives the Chromium already on the machine (`executable_path`), so no browser is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
MISSING_PLAYWRIGHT = "the report's screenshot needs Playwright: pip install 'ckpt-dynamics[screenshot]'"
SETTLE_MS = 300  # after the figures are drawn: late errors (e.g. in plotly's async steps) get reported

# every plotly figure's state (id; svg: rendered .main-svg count; traces; points: data points; drawn:
# rendered trace groups; height, width in px; overflow: the plot sticks out of its card)
FIGURE_STATE_JS = """() => JSON.stringify({plotly: typeof window.Plotly !== 'undefined', ready: document.readyState,
 figures: Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => {
  const svg = d.querySelector('svg.main-svg');
  const box = (d.closest('figure') || d.parentElement).getBoundingClientRect();
  return {id: d.id,
   svg: d.querySelectorAll('svg.main-svg').length,
   traces: (d._fullData || []).length,
   points: (d._fullData || []).reduce((s, t) => s + Math.max((t.x && t.x.length) || 0, (t.y && t.y.length) || 0), 0),
   drawn: d.querySelectorAll('g.trace').length,
   height: Math.round(d.getBoundingClientRect().height),
   width: svg ? Math.round(svg.getBoundingClientRect().width) : 0,
   overflow: !!svg && svg.getBoundingClientRect().right > box.right + 1};
 })})"""
# the page has loaded and, if plotly is there, every figure has its svg
ALL_DRAWN_JS = """() => document.readyState === 'complete' && (typeof window.Plotly === 'undefined' ||
 Array.from(document.querySelectorAll('.plotly-graph-div')).every(d => d.querySelector('svg.main-svg')))"""
TWO_FRAMES_JS = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(1))))"


class BrowserError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """$CHROMIUM, else /usr/bin/chromium (Debian's), else the first Chromium/Chrome on PATH; None if none."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if (os.path.isfile(env) and os.access(env, os.X_OK)) or shutil.which(env) else None
    if os.path.isfile("/usr/bin/chromium") and os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class RenderResult:
    """What headless Chromium saw: console errors and uncaught exceptions, warnings, and every plotly
    figure's state (see FIGURE_STATE_JS)."""
    errors: list[str]
    warnings: list[str]
    figures: list[dict]
    plotly_loaded: bool
    screenshot: Path | None = None
    timed_out: bool = False

    @property
    def empty_figures(self) -> list[str]:
        return [f["id"] for f in self.figures if f["svg"] < 1 or f["points"] < 1 or f["drawn"] < 1]


def _console_collector(errors: list[str], warns: list[str]):
    def on_console(message) -> None:
        text = f"console.{message.type}: {message.text}"
        if message.type in ("error", "assert"):
            errors.append(text)
        elif message.type == "warning":
            warns.append(text)
    return on_console


def render(html_path: str | Path, png_path: str | Path | None = None, width: int = 1400, height: int = 1100,
           full_page: bool = False, timeout: float = 60.0, chromium: str | None = None) -> RenderResult:
    """Open an HTML file in headless Chromium, wait until every plotly figure is drawn (or `timeout`), and
    report console errors, uncaught exceptions and each figure's state; with png_path, save a screenshot
    (the viewport, or the whole page with full_page)."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise BrowserError(MISSING_PLAYWRIGHT) from None
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(html_path)
    binary = chromium or find_chromium()
    if not binary:
        raise BrowserError("Chromium not found (apt-get install chromium, or set $CHROMIUM)")
    errors: list[str] = []
    warns: list[str] = []
    shot = None
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=binary, headless=True, timeout=timeout * 1000,
                                         args=["--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"])
            try:
                page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
                page.on("console", _console_collector(errors, warns))
                page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
                timed_out = False
                try:
                    page.goto(html_path.as_uri(), wait_until="load", timeout=timeout * 1000)
                    page.wait_for_function(ALL_DRAWN_JS, timeout=timeout * 1000, polling=200)
                except PlaywrightTimeout:
                    timed_out = True
                page.evaluate(TWO_FRAMES_JS)
                page.wait_for_timeout(SETTLE_MS)
                state = json.loads(page.evaluate(FIGURE_STATE_JS))
                if png_path is not None:
                    shot = Path(png_path)
                    shot.parent.mkdir(parents=True, exist_ok=True)
                    from common.atomic import atomic_write_bytes

                    atomic_write_bytes(shot, page.screenshot(full_page=full_page, type="png"))
            finally:
                browser.close()  # a clean exit also removes Chromium's singleton folder under $TMPDIR
    except PlaywrightError as e:
        raise BrowserError(f"Chromium ({binary}): {str(e).splitlines()[0]}") from None
    return RenderResult(errors, warns, state["figures"], bool(state["plotly"]), shot, timed_out)


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1400, height: int = 1100,
               full_page: bool = False, timeout: float = 60.0) -> Path:
    """Save a PNG of an HTML report as headless Chromium renders it; BrowserError on JavaScript errors."""
    result = render(html_path, png_path, width=width, height=height, full_page=full_page, timeout=timeout)
    if result.errors:
        raise BrowserError("JavaScript errors while rendering:\n" + "\n".join(result.errors))
    return result.screenshot
