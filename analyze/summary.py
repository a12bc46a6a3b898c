"""What `analyze` prints at the end: per run, checkpoints analysed, tasks computed/skipped/failed, and the
last LLC and Hessian trace; then where the tables are."""

from __future__ import annotations

from collections import Counter
from typing import Any

from analyze.catalog import Catalog
from analyze.runner import Plan


def summarize(catalog: Catalog, plan: Plan, statuses: list[dict]) -> list[dict[str, Any]]:
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
    """run -> 'LLC x +- s @ epoch e, Hessian trace t' from the last epoch-end checkpoint that has them."""
    from analyze.tables import read_table

    completed = store.completed()
    found: dict[str, list[str]] = {}
    for table, value, error, label in (("llc", "llc_mean", "llc_sem", "LLC"), ("hessian", "trace", None, "tr H")):
        frame = read_table(store.root / table, completed) if (store.root / table).is_dir() else None
        if frame is None or value not in frame:
            continue
        last = frame.sort_values(["epoch", "step"]).groupby("run").tail(1)
        for row in last.itertuples():
            text = f"{label} {getattr(row, value):.3g}" + (f"±{getattr(row, error):.2g}" if error else "")
            found.setdefault(row.run, []).append(f"{text} (epoch {row.epoch})")
    return {run: ", ".join(parts) for run, parts in found.items()}


def print_summary(rows: list[dict], store) -> None:
    width = max([len("run")] + [len(r["run"]) for r in rows])
    estimates = last_estimates(store)
    print(f"{'run':<{width}}  checkpoints  computed  skipped  failed  last estimates")
    for r in rows:
        done = f"{r['analysed']}/{r['checkpoints']}"
        print(f"{r['run']:<{width}}  {done:>11}  {r['computed']:>8}  {r['skipped']:>7}  {r['failed']:>6}  "
              f"{estimates.get(r['run'], '')}")
    tables = [t for t in store.tables()]
    print(f"tables in {store.root.resolve()}: {', '.join(tables)}")
    print(f'pandas: analyze.load("{store.root.resolve()}")')
