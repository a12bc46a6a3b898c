#!/usr/bin/env python
"""Does the LLC estimate on the demo's checkpoint settle, and after how many steps? The demo calibrates at the
trunk's cut-off checkpoint (digits, 2x32 ReLU MLP, epoch 10); here the llc estimator runs there at the step
0.03/nbeta and gamma 1, 3, 10 and 100, after its default burn-in and after 5,000, 15,000 and 45,000 steps (4 chains x
1,000 draws, the same chain seeds throughout). A direction only the localizer holds relaxes in
relaxation_steps = 1 / (eps (gamma + nbeta max(lambda_min, 0))) steps (analyze/llc/stability.py); each cell says
how many of them its burn-in covered. Where the chains have not relaxed, the estimate is a transient of the chain
length: calibrate therefore recommends a burn-in of 3 relaxation times, or one that agrees with it (docs/llc.md).
The checkpoint has no known learning coefficient; what this shows is where the estimate stops moving.

Usage: python scripts/demo_relaxation.py [--out demo-relaxation] [--doc docs/demo-relaxation.md] [--jobs 2]
About 3 minutes here with two jobs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # validate_llc and _stages, next to this file
from _stages import doc_path  # noqa: E402
from validate_llc import estimate, run_in_processes  # noqa: E402
from llc_localization import burnin_headers  # noqa: E402
from analyze.llc.calibrate import context_for  # noqa: E402
from analyze.llc.stability import bottom_hessian_eigenvalue, relaxation_steps  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.experiment import run_experiment  # noqa: E402

CHECKPOINT = Path("ffnn-2x32-trunk") / "epoch-0010.safetensors"  # the demo's cut-off (scripts/demo)
LR = "0.03/nbeta"
LOCALIZATIONS = ["1", "3", "10", "100"]
BURNINS = ["auto", 5_000, 15_000, 45_000]


def demo_checkpoint(out: Path) -> Path:
    """The demo's cut-off checkpoint, trained with train-ckpts' defaults (the demo's study) unless `out` holds it."""
    path = out / CHECKPOINT
    if not path.exists():
        run_experiment(TrainConfig(out=str(out)), log=lambda *a: None)
    return path


def relaxation_rows(path: Path, loc: str, lambda_min: float) -> list[dict]:
    """The checkpoint at (LR, loc) after each of BURNINS, with the relaxation times each burn-in covered."""
    ctx = context_for(path)
    rows = []
    for burnin in BURNINS:
        r = estimate(ctx, {"lr": LR, "localization": loc, "burnin": burnin})
        steps = float(relaxation_steps(r["lr"], r["localization"], r["nbeta"], lambda_min))
        rows.append({"localization": float(loc), "burnin": str(burnin), "n_burnin": r["n_burnin"],
                     "relaxation_steps": steps, "relaxation_times": r["n_burnin"] / steps, "llc": r["llc_mean"],
                     "sem": r["llc_sem"], "drift": r["drift"], "healthy": r["healthy"],
                     "seconds": r["wall_seconds"]})
    return rows


def times(x: float) -> str:
    """Relaxation times covered, short: 0.19, 2.7, 91, 818."""
    return f"{x:.2g}" if x < 100 else f"{x:,.0f}"


def table_text(table: pd.DataFrame) -> str:
    """One row per gamma: LLC +- s.e., drift and relaxation times covered after each burn-in."""
    lines = ["| gamma | relaxation_steps | " + burnin_headers(BURNINS) + " |", "|" + "---|" * (2 + len(BURNINS))]
    for loc, g in table.groupby("localization", sort=False):
        cells = [f"{r.llc:.3g} +- {r.sem:.2g}, drift {r.drift:.1f} [{r.n_burnin:,} steps: {times(r.relaxation_times)} x]"
                 + ("" if r.healthy else " ✗") for r in g.itertuples()]
        lines.append(f"| {loc:g} | {g.relaxation_steps.iloc[0]:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def page(table: pd.DataFrame, lambda_min: float, seconds: float) -> str:
    return ("# Does the demo's LLC settle?\n\n"
            "Written by `scripts/demo_relaxation.py` (do not edit by hand). " + " ".join(__doc__.split("\n\n")[0].split())
            + f" Whole run: {seconds / 60:.1f} min on this machine.\n\n"
            f"lambda_min of the Hessian at the checkpoint: {lambda_min:.3g} (counted as 0 in relaxation_steps). "
            "Each cell: LLC +- s.e., `drift`, and [burn-in steps: relaxation times covered]; ✗ marks an estimate the "
            "estimator flags (`healthy` false).\n\n" + table_text(table) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-relaxation", help="folder of the demo's checkpoints (trained if absent)")
    ap.add_argument("--doc", help="write the table to this markdown file (e.g. docs/demo-relaxation.md)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="localizations run at once (default: the cores)")
    args = ap.parse_args(argv)
    doc = doc_path(args.doc, "demo_relaxation.py")
    start = time.perf_counter()
    path = demo_checkpoint(Path(args.out))
    lambda_min = bottom_hessian_eigenvalue(context_for(path))
    table = pd.DataFrame([row for result in run_in_processes(
        relaxation_rows, [(path, loc, lambda_min) for loc in LOCALIZATIONS], args.jobs) for row in result])
    print(table_text(table))
    if doc:
        doc.write_text(page(table, lambda_min, time.perf_counter() - start))
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
