"""What `analyze` prints at the end and `analyze.run` returns (AnalysisResult): per run, checkpoints analysed,
tasks computed/skipped/failed, and the last LLC and Hessian trace; then where the tables are."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command imports this module before it needs dask
    from analyze.catalog import Catalog
    from analyze.runner import Plan


def summarize(catalog: "Catalog", plan: "Plan", statuses: list[dict]) -> list[dict[str, Any]]:
    """Per run: checkpoints selected, checkpoints with every task complete, computed/skipped/failed tasks."""
    failed_keys = {s["key"] for s in statuses if not s["ok"]}
    computed = Counter(s["run"] for s in statuses if s["ok"])
    skipped = Counter(t.checkpoint.run for t in plan.done)
    failed = Counter(s["run"] for s in statuses if not s["ok"])
    incomplete_ckpts = {(t.checkpoint.run, t.checkpoint.path) for t in plan.todo if t.key in failed_keys}
    rows = []
    for run in catalog.selected:
        total = len(run.checkpoints)
        bad = sum(1 for c in run.checkpoints if (run.name, c.path) in incomplete_ckpts)
        rows.append({"run": run.name, "checkpoints": total, "analysed": total - bad, "computed": computed[run.name],
                     "skipped": skipped[run.name], "failed": failed[run.name]})
    return rows


def last_estimates(store) -> dict[str, str]:
    """run -> 'val loss v (epoch e), LLC x+-s (epoch e), tr H t (epoch e)' from the last checkpoint that has each."""
    from analyze.tables import read_table

    completed = store.completed()
    found: dict[str, list[str]] = {}
    for table, value, error, label in (("evaluate", "loss", None, "val loss"), ("llc", "llc_mean", "llc_sem", "LLC"),
                                       ("hessian", "trace", None, "tr H")):
        frame = read_table(store.root / table, completed) if (store.root / table).is_dir() else None
        if frame is None or value not in frame:
            continue
        if table == "evaluate":  # the default estimators' headline: the validation loss
            frame = frame[frame.split == "val"]
        last = frame.sort_values(["epoch", "step"]).groupby("run").tail(1)
        for row in last.itertuples():
            text = f"{label} {getattr(row, value):.3g}" + (f"±{getattr(row, error):.2g}" if error else "")
            if table == "llc" and not getattr(row, "healthy", True):
                text += " NOT HEALTHY"
            found.setdefault(row.run, []).append(f"{text} (epoch {row.epoch})")
    return {run: ", ".join(parts) for run, parts in found.items()}


def llc_health_note(store) -> str | None:
    """One line when some llc estimates are not healthy (their chains drifted, left the basin, diverged, or the
    step was unstable): at the defaults this is what happens on large models (docs/llc.md), and such a number
    must not pass unnoticed."""
    from analyze.tables import read_table

    if not (store.root / "llc").is_dir():
        return None
    frame = read_table(store.root / "llc", store.completed())
    if frame is None or "healthy" not in frame or frame.healthy.all():
        return None
    return (f"{int((~frame.healthy).sum())} of {len(frame)} LLC estimates are not healthy (see the llc table's "
            "healthy, drift, rhat, left_basin, step_curvature); choose a setting with `analyze calibrate "
            "<checkpoint>` (docs/llc.md)")


@dataclass
class AnalysisResult:
    """What one analysis did (`analyze.run` returns it; the command prints it and exits with `exit_code`)."""

    out: Path  # the output folder (resolved)
    report: Path | None  # the HTML report, None with report=False or when it failed
    runs: list[dict]  # per run: checkpoints, analysed, computed, skipped, failed, last_estimates
    failures: list[dict]  # per failed task: run, epoch, step, estimator, error, message (rows of OUT/errors)
    tables: list[str]  # the table folders in `out`
    exit_code: int  # the command's: 0 all done, 1 some task or the report failed

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def summary(self):
        """The per-run summary as a DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.runs)

    def load(self):
        """The tables, as `analyze.load(out)` gives them."""
        from analyze.tables import load

        return load(self.out)

    def summary_text(self) -> str:
        width = max([len("run")] + [len(r["run"]) for r in self.runs])
        lines = [f"{'run':<{width}}  checkpoints  computed  skipped  failed  last estimates"]
        for r in self.runs:
            done = f"{r['analysed']}/{r['checkpoints']}"
            lines.append(f"{r['run']:<{width}}  {done:>11}  {r['computed']:>8}  {r['skipped']:>7}  {r['failed']:>6}  "
                         f"{r['last_estimates']}")
        lines.append(f"tables in {self.out}: {', '.join(self.tables)}")
        lines.append(f'pandas: analyze.load("{self.out}")')
        return "\n".join(lines)

    def __repr__(self) -> str:
        # analyze.run has printed the per-run summary already: a notebook cell ending in the result
        # should not show it twice
        counts = {k: sum(r[k] for r in self.runs) for k in ("computed", "skipped", "failed")}
        lines = [f"AnalysisResult: {len(self.runs)} run(s), {counts['computed']} task(s) computed, "
                 f"{counts['skipped']} skipped, {counts['failed']} failed" +
                 (" (see .failures and the errors table)" if counts["failed"] else ""),
                 f"tables in {self.out}: {', '.join(self.tables)}"]
        if self.report:
            lines.append(f"report: {self.report}")
        return "\n".join(lines + [".summary: per run; .load(): the tables"])
