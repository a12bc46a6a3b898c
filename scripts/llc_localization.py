#!/usr/bin/env python
"""How the LLC estimate moves with the localization gamma and the burn-in, on models whose learning coefficient
is known: a regular model (linear regression 20 -> 5, d = 105) and the most singular net of the truth suite, the
bias-free 8-8-8-8-8 deep linear net with a rank-3 teacher (Aoyagi's lambda = 27.5, multiplicity 4), at n = 990
and n = 59,940. Every estimate is at the trained student, with the `llc` estimator's defaults except gamma and the
burn-in (4 chains x 1,000 draws, step 0.03/nbeta); the teachers and students are those of
`scripts/validate_llc.py` (trained here when --out does not hold them yet).

Usage: python scripts/validate_llc.py is the accuracy table; this script is the sensitivity behind it:
       python scripts/llc_localization.py [--out llc-truth] [--doc docs/llc-localization.md] [--jobs 2]
About 5 minutes here with two jobs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # validate_llc, next to this file
import validate_llc as suite  # noqa: E402

CASES = ["linreg-20to5", "dln-8x3-r3", "dln-8x3-r3-n60k"]
LOCALIZATIONS = ["1", "3", "10", "100"]
BURNINS = [1_000, "auto", 10_000]  # "auto": the default, 1,000 x sqrt(nbeta / 145)


def sweep_rows(case: suite.Case, out: Path) -> list[dict]:
    """The trained student of `case` at every (localization, burn-in)."""
    ctx = suite.context_for(suite.checkpoints(case, out)["trained"])
    rows = []
    for loc in LOCALIZATIONS:
        for burnin in BURNINS:
            r = suite.estimate(ctx, {"localization": loc, "burnin": burnin})
            rows.append({"case": case.name, "n": r["n"], "truth": r["llc_truth"], "localization": float(loc),
                         "loc_per_nbeta": r["localization_per_nbeta"], "burnin": str(burnin),
                         "n_burnin": r["n_burnin"], "llc": r["llc_mean"],
                         "sem": r["llc_sem"], "error": r["llc_mean"] / r["llc_truth"] - 1, "drift": r["drift"],
                         "healthy": r["healthy"], "seconds": r["wall_seconds"]})
    return rows


def page(table: pd.DataFrame, seconds: float) -> str:
    def cell(g: pd.DataFrame, burnin) -> str:
        r = g[g.burnin == str(burnin)].iloc[0]
        steps = f" [{r['n_burnin']:,}]" if burnin == "auto" else ""
        return f"{r['llc']:.3g} +- {r['sem']:.2g} ({r['error']:+.0%}){steps}{'' if r['healthy'] else ' ✗'}"

    lines = ["| case | n | truth | gamma | gamma / nbeta | "
             + " | ".join(f"burn-in {b:,}" if b != "auto" else "burn-in auto [steps]" for b in BURNINS) + " |",
             "|" + "---|" * (5 + len(BURNINS))]
    for (case, loc), g in table.groupby(["case", "localization"], sort=False):
        r = g.iloc[0]
        lines.append(f"| {case} | {r['n']:,} | {r['truth']:.4g} | {loc:g} | {r['loc_per_nbeta']:.2g} | "
                     + " | ".join(cell(g, b) for b in BURNINS) + " |")
    return ("# How the LLC estimate moves with the localization and the burn-in\n\n"
            "Written by `scripts/llc_localization.py` (do not edit by hand). " + __doc__.split("\n\n")[0]
            .replace("\n", " ") + f" Whole run: {seconds / 60:.1f} min on this machine.\n\n"
            "Each cell: LLC +- s.e. (error against the truth); ✗ marks an estimate the estimator itself flags "
            "(`healthy` false). Every setting of a case runs the same chain seeds (common random numbers), so the "
            "differences down a column are the localization's, not the chains' noise.\n\n" + "\n".join(lines)
            + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="llc-truth", help="folder of the truth suite's trained cases (reused)")
    ap.add_argument("--doc", help="write the table to this markdown file (e.g. docs/llc-localization.md)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="cases run at once (default: the cores)")
    args = ap.parse_args(argv)
    doc = suite.doc_path(args.doc, "llc_localization.py")
    start = time.perf_counter()
    cases = [c for c in suite.CASES if c.name in CASES]
    rows = [row for result in suite.run_in_processes(sweep_rows, [(c, Path(args.out)) for c in cases], args.jobs)
            for row in result]
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if doc:
        doc.write_text(page(table, time.perf_counter() - start))
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
