#!/usr/bin/env python
"""How the LLC estimate moves with the localization gamma and the burn-in, on models whose learning coefficient
is known: a regular model (linear regression 20 -> 5, d = 105) and the most singular net of the truth suite, the
bias-free 8-8-8-8-8 deep linear net with a rank-3 teacher (Aoyagi's lambda = 27.5, multiplicity 4), at n = 990
and n = 59,940. Every estimate is at the trained student, with the `llc` estimator's defaults except gamma and the
burn-in (4 chains x 1,000 draws, step 0.03/nbeta); the teachers and students are those of
`scripts/validate_llc.py` (trained here when --out does not hold them yet).

Second table: can a strong localization, which holds the chains of a large net, be corrected back to a weak one?
On a regular model each direction of curvature h keeps the fraction h / (h + gamma / nbeta) of its share of the
LLC, so where every h is alike the estimate is lambda / (1 + g / k), g = gamma / nbeta; two strong localizations
then give lambda (`one_scale_fit`). Measured at g = 0.1, 0.3 and 1 on the regular model and three deep linear nets,
against the default localization and the truth.

Third table: do the chains settle? The multiplicity-4 net at n = 59,940 at its true parameter and trained student,
at gamma 1, 10 and 30, after the default burn-in and after 20,000 and 60,000 steps (a direction only the
localizer holds relaxes in 1 / (eps gamma) steps: 182,000, 18,200 and 6,100 there), with linear regression
20 -> 5 at gamma 10 as the regular control.

Fourth table: is there a plateau once every chain has relaxed? Each gamma runs a burn-in of 3 relaxation times of
a direction only the localizer holds, 3 / (eps gamma) (as calibrate asks of a recommendation; at least `auto`, at
most 100,000 steps), at both points of a regular model and two deep linear nets, at nbeta = n / log n and, for the
n = 990 cases, at nbeta = n (a colder posterior, in which the loss outweighs the localizer by log n more).

Fifth table: is the weak localizations' excess the step's? Relaxed chains roam further from the checkpoint than
the calibration grid's short ones, into regions whose curvature the step was not chosen for. The trained students
of the full-rank 5-5-5-5 net (whose true parameters all have the same learning coefficient: its singularity is the
layers' rescaling symmetry alone) and of the multiplicity-4 net at gamma 1, 3 and 10, each at the steps 0.03, 0.01
and 0.003 / nbeta after 3 relaxation times of that step (at most 400,000 steps; fewer relaxation times are shown).

Usage: python scripts/validate_llc.py is the accuracy table; this script is the sensitivity behind it:
       python scripts/llc_localization.py [--out llc-truth] [--doc docs/llc-localization.md] [--jobs 2]
About 25 minutes here with two jobs (most of it the third and fifth tables).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # validate_llc, next to this file
import validate_llc as suite  # noqa: E402
from analyze.estimators.llc import DEFAULTS, parse_burnin, parse_lr, parse_nbeta  # noqa: E402
from analyze.llc.calibrate import RELAXATION_TIMES  # noqa: E402
from analyze.llc.stability import relaxation_steps  # noqa: E402

CASES = ["linreg-20to5", "dln-8x3-r3", "dln-8x3-r3-n60k"]
LOCALIZATIONS = ["1", "3", "10", "100"]
BURNINS = [1_000, "auto", 10_000]  # "auto": the default, 1,000 x sqrt(nbeta / 145)
EXTRAPOLATION_CASES = ["linreg-20to5", "dln-10x4x2-r2", "dln-8x3-r3", "dln-20x10-r5"]
STRONG = [0.1, 0.3, 1.0]  # gamma / nbeta
FITS = [(0.1, 0.3), (0.3, 1.0)]
# (case, localization, points) of the third table; 20,000 and 60,000 steps are about 1 and 3 relaxation times
# 1 / (eps gamma) at gamma 10, n = 59,940 (eps = 0.03 / nbeta), and 3 and 10 at gamma 30
LONG_RUNS = [("dln-8x3-r3-n60k", loc, ("trained", "truth")) for loc in ("1", "10", "30")]
LONG_RUNS += [("linreg-20to5", "10", ("trained",))]
LONG_BURNINS = ["auto", 20_000, 60_000]
# (case, nbetas) of the fourth table; at nbeta = n a case of n = 9,990 would need 10x the steps (1 million at gamma 1)
RELAXED_RUNS = [("linreg-4to2", ("n/log n", "n")), ("dln-8x3-r3", ("n/log n", "n")),
                ("dln-10x4x2-r2", ("n/log n",))]
RELAXED_LOCALIZATIONS = ["1", "3", "10", "30", "100"]
RELAXED_MAX_BURNIN = 100_000
# the fifth table: (case, point) at every (localization, step), relaxed for that step
STEP_RUNS = ["dln-5x2-r5", "dln-8x3-r3"]
STEP_LOCALIZATIONS = ["1", "3", "10"]
STEP_SIZES = ["0.03/nbeta", "0.01/nbeta", "0.003/nbeta"]
STEP_MAX_BURNIN = 400_000


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


def estimate_text(llc: float, sem: float, error: float) -> str:
    """A table cell's estimate: LLC +- s.e. (error against the truth)."""
    return f"{llc:.3g} +- {sem:.2g} ({error:+.0%})"


def burnin_headers(burnins: list) -> str:
    """The burn-in columns' headers, the `auto` one saying its cells give the steps it took."""
    return " | ".join(f"burn-in {b:,}" if b != "auto" else "burn-in auto [steps]" for b in burnins)


def burnin_cell(r, burnin, with_drift: bool = False) -> str:
    """An estimate after `burnin`: LLC +- s.e. (error)[, drift], the steps `auto` took, ✗ where it is flagged."""
    steps = f" [{r['n_burnin']:,}]" if burnin == "auto" else ""
    drift = f", drift {r['drift']:.1f}" if with_drift else ""
    return f"{estimate_text(r['llc'], r['sem'], r['error'])}{drift}{steps}{'' if r['healthy'] else ' ✗'}"


def one_scale_fit(g1: float, llc1: float, g2: float, llc2: float) -> float:
    """lambda of llc(g) = lambda / (1 + g / k) through (g1, llc1) and (g2, llc2), g = gamma / nbeta: exact for a
    regular model whose Hessian eigenvalues are all k (each keeps h / (h + g) of its d / 2 share)."""
    k = (g2 * llc2 - g1 * llc1) / (llc1 - llc2)
    return llc1 * (1 + g1 / k)


def extrapolation_rows(case: suite.Case, out: Path) -> list[dict]:
    """The trained student of `case` at the default localization and at STRONG ones (same chain seeds)."""
    ctx = suite.context_for(suite.checkpoints(case, out)["trained"])
    rows = []
    for loc in ["default", *STRONG]:
        r = suite.estimate(ctx, {} if loc == "default" else {"localization": f"{loc}*nbeta"})
        rows.append({"case": case.name, "n": r["n"], "truth": r["llc_truth"], "g": r["localization_per_nbeta"],
                     "default": loc == "default", "llc": r["llc_mean"], "sem": r["llc_sem"],
                     "healthy": r["healthy"]})
    return rows


def long_chain_rows(case: suite.Case, paths: dict[str, Path], loc: str, points: tuple[str, ...]) -> list[dict]:
    """`points` of `case` (the trained student first; `paths` from suite.checkpoints, resolved by the caller: two
    processes may not open one run folder at once) at localization `loc` after each of LONG_BURNINS (same chain
    seeds), with the true parameter's expected offset `gap` (as in validate_llc.py)."""
    rows = []
    for point in points:
        ctx = suite.context_for(paths[point])
        for burnin in LONG_BURNINS:
            r = suite.estimate(ctx, {"localization": loc, "burnin": burnin})
            rows.append({"case": case.name, "point": point, "n": r["n"], "truth": r["llc_truth"],
                         "localization": float(loc), "burnin": str(burnin), "n_burnin": r["n_burnin"],
                         "llc": r["llc_mean"], "sem": r["llc_sem"], "error": r["llc_mean"] / r["llc_truth"] - 1,
                         "drift": r["drift"], "healthy": r["healthy"], "nbeta": r["nbeta"], "init_loss": r["init_loss"]})
    baseline = next(r["init_loss"] for r in rows if r["point"] == "trained")
    return [{**r, "gap": suite.truth_gap(r, baseline)} for r in rows]


def relaxed_burnin(nbeta: float, localization: float, lr: str = DEFAULTS["lr"], cap: int | None = None) -> int:
    """Burn-in covering RELAXATION_TIMES relaxation times of a direction only the localizer holds (lambda_min taken
    as 0, as on a singular net) at step `lr`, at least the default's `auto` and at most `cap` (RELAXED_MAX_BURNIN)."""
    eps = parse_lr(lr, nbeta)
    needed = math.ceil(RELAXATION_TIMES * relaxation_steps(eps, localization, nbeta, 0.0))
    return min(RELAXED_MAX_BURNIN if cap is None else cap, max(parse_burnin("auto", nbeta), needed))


def relaxed_rows(case: suite.Case, paths: dict[str, Path], nbetas: tuple[str, ...]) -> list[dict]:
    """Both points of `case` at every RELAXED_LOCALIZATIONS and nbeta, each after relaxed_burnin (same chain seeds),
    with the true parameter's expected offset `gap` at that nbeta."""
    rows = []
    for point in ("trained", "truth"):
        ctx = suite.context_for(paths[point])
        n = len(ctx.splits.train)
        for nb in nbetas:
            for loc in RELAXED_LOCALIZATIONS:
                burnin = relaxed_burnin(parse_nbeta(nb, n), float(loc))
                r = suite.estimate(ctx, {"localization": loc, "nbeta": nb, "burnin": burnin})
                rows.append({"case": case.name, "point": point, "n": r["n"], "truth": r["llc_truth"],
                             "nbeta_option": nb, "localization": float(loc), "n_burnin": r["n_burnin"],
                             "llc": r["llc_mean"], "sem": r["llc_sem"], "error": r["llc_mean"] / r["llc_truth"] - 1,
                             "healthy": r["healthy"], "nbeta": r["nbeta"], "init_loss": r["init_loss"]})
    baseline = next(r["init_loss"] for r in rows if r["point"] == "trained")
    return [{**r, "gap": suite.truth_gap(r, baseline)} for r in rows]


def relaxed_page(table: pd.DataFrame) -> str:
    """The fourth table: one row per (case, point, nbeta), the relaxed estimate at each gamma."""
    lines = ["| case | point | n | nbeta | truth | truth - gap | "
             + " | ".join(f"gamma {g} [burn-in]" for g in RELAXED_LOCALIZATIONS) + " |",
             "|" + "---|" * (6 + len(RELAXED_LOCALIZATIONS))]
    for (case, point, nb), g in table.groupby(["case", "point", "nbeta_option"], sort=False):
        r0 = g.iloc[0]
        nbeta = "n / log n" if nb == "n/log n" else "n"
        cells = [f"{estimate_text(r['llc'], r['sem'], r['error'])}{'' if r['healthy'] else ' ✗'} [{r['n_burnin']:,}]"
                 for _, r in g.sort_values("localization").iterrows()]
        expected = r0["truth"] - r0["gap"]
        lines.append(f"| {case} | {point} | {r0['n']:,} | {nbeta} | {r0['truth']:.4g} | {expected:.3g} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_rows(case: suite.Case, path: Path) -> list[dict]:
    """The checkpoint at `path` at every STEP_LOCALIZATIONS and STEP_SIZES, each relaxed for its own step (same chain
    seeds), with the relaxation times its burn-in covered."""
    ctx = suite.context_for(path)
    nbeta = parse_nbeta("n/log n", len(ctx.splits.train))
    rows = []
    for loc in STEP_LOCALIZATIONS:
        for lr in STEP_SIZES:
            burnin = relaxed_burnin(nbeta, float(loc), lr, STEP_MAX_BURNIN)
            r = suite.estimate(ctx, {"localization": loc, "lr": lr, "burnin": burnin})
            tau = relaxation_steps(r["lr"], r["localization"], r["nbeta"], 0.0)
            rows.append({"case": case.name, "n": r["n"], "truth": r["llc_truth"], "localization": float(loc),
                         "lr": lr, "n_burnin": r["n_burnin"], "relaxation_times": r["n_burnin"] / tau,
                         "llc": r["llc_mean"], "sem": r["llc_sem"], "error": r["llc_mean"] / r["llc_truth"] - 1,
                         "healthy": r["healthy"]})
    return rows


def step_page(table: pd.DataFrame) -> str:
    """The fifth table: one row per (case, gamma), the relaxed estimate at each step."""
    lines = ["| case | n | truth | gamma | " + " | ".join(f"step {lr} [burn-in]" for lr in STEP_SIZES) + " |",
             "|" + "---|" * (4 + len(STEP_SIZES))]
    for (case, loc), g in table.groupby(["case", "localization"], sort=False):
        r0 = g.iloc[0]
        cells = []
        for lr in STEP_SIZES:
            r = g[g.lr == lr].iloc[0]
            times = r["relaxation_times"]
            short = f", {times:.1f} relaxation times" if times < RELAXATION_TIMES else ""
            cells.append(f"{estimate_text(r['llc'], r['sem'], r['error'])}{'' if r['healthy'] else ' ✗'} "
                         f"[{r['n_burnin']:,}{short}]")
        lines.append(f"| {case} | {r0['n']:,} | {r0['truth']:.4g} | {loc:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def long_chain_page(table: pd.DataFrame) -> str:
    """The third table: one row per (case, point, gamma), the estimate after each of LONG_BURNINS."""
    lines = ["| case | point | n | truth | truth - gap | gamma | " + burnin_headers(LONG_BURNINS) + " |",
             "|" + "---|" * (6 + len(LONG_BURNINS))]
    for (case, point, loc), g in table.groupby(["case", "point", "localization"], sort=False):
        r0 = g.iloc[0]
        cells = [burnin_cell(g[g.burnin == str(b)].iloc[0], b, with_drift=True) for b in LONG_BURNINS]
        lines.append(f"| {case} | {point} | {r0['n']:,} | {r0['truth']:.4g} | {r0['truth'] - r0['gap']:.3g} | "
                     f"{loc:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def extrapolation_page(table: pd.DataFrame) -> str:
    """The second table: each case's estimates at STRONG localizations and the one-scale fits from pairs of them."""
    lines = ["| case | n | truth | default gamma (gamma / nbeta) | "
             + " | ".join(f"gamma / nbeta {g:g}" for g in STRONG) + " | "
             + " | ".join(f"fit from {a:g}, {b:g}" for a, b in FITS) + " |",
             "|" + "---|" * (4 + len(STRONG) + len(FITS))]
    for case, rows in table.groupby("case", sort=False):
        truth, base = rows.truth.iloc[0], rows[rows.default].iloc[0]
        strong = {round(r.g, 6): r for r in rows[~rows.default].itertuples()}
        cells = [estimate_text(strong[x].llc, strong[x].sem, strong[x].llc / truth - 1)
                 + ("" if strong[x].healthy else " ✗") for x in STRONG]
        fits = [one_scale_fit(a, strong[a].llc, b, strong[b].llc) for a, b in FITS]
        default = estimate_text(base["llc"], base["sem"], base["llc"] / truth - 1)
        lines.append(f"| {case} | {rows.n.iloc[0]:,} | {truth:.4g} | {default} ({base['g']:.2g}) | "
                     + " | ".join(cells) + " | " + " | ".join(f"{f:.3g} ({f / truth - 1:+.0%})" for f in fits) + " |")
    return "\n".join(lines)


def page(table: pd.DataFrame, seconds: float, extrapolation: pd.DataFrame | None = None,
         long_chains: pd.DataFrame | None = None, relaxed: pd.DataFrame | None = None,
         steps: pd.DataFrame | None = None) -> str:
    lines = ["| case | n | truth | gamma | gamma / nbeta | " + burnin_headers(BURNINS) + " |",
             "|" + "---|" * (5 + len(BURNINS))]
    for (case, loc), g in table.groupby(["case", "localization"], sort=False):
        r = g.iloc[0]
        lines.append(f"| {case} | {r['n']:,} | {r['truth']:.4g} | {loc:g} | {r['loc_per_nbeta']:.2g} | "
                     + " | ".join(burnin_cell(g[g.burnin == str(b)].iloc[0], b) for b in BURNINS) + " |")
    sections = [("A strong localization corrected back", 1, "The trained students; LLC +- s.e. (error against the "
                  "truth); the fits' inputs share chain seeds.", extrapolation, extrapolation_page),
                ("Long chains", 2, "LLC +- s.e. (error against the truth) and `drift`; `truth - gap` is where the "
                 "estimate at the true parameter is expected (validate_llc.py); each row's runs share chain seeds.",
                 long_chains, long_chain_page),
                ("Relaxed chains at every localization", 3, "LLC +- s.e. (error against the truth) [burn-in steps]; "
                 "`truth - gap` as above, at that nbeta; each row's runs share chain seeds.", relaxed, relaxed_page),
                ("Relaxed chains at smaller steps", 4, "LLC +- s.e. (error against the truth) [burn-in steps]; each "
                 "row's runs share chain seeds.", steps, step_page)]
    return ("# How the LLC estimate moves with the localization and the burn-in\n\n"
            "Written by `scripts/llc_localization.py` (do not edit by hand). " + __doc__.split("\n\n")[0]
            .replace("\n", " ") + f" Whole run: {seconds / 60:.1f} min on this machine.\n\n"
            "Each cell: LLC +- s.e. (error against the truth); ✗ marks an estimate the estimator itself flags "
            "(`healthy` false). Every setting of a case runs the same chain seeds (common random numbers), so the "
            "differences down a column are the localization's, not the chains' noise.\n\n" + "\n".join(lines) + "\n"
            + "".join(f"\n## {title}\n\n" + " ".join(__doc__.split("\n\n")[paragraph].split()) + f" {caption}\n\n"
                      + table_page(rows) + "\n"
                      for title, paragraph, caption, rows, table_page in sections if rows is not None))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:5]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="llc-truth", help="folder of the truth suite's trained cases (reused)")
    ap.add_argument("--doc", help="write the five tables to this markdown file (e.g. docs/llc-localization.md)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="cases run at once (default: the cores)")
    args = ap.parse_args(argv)
    doc = suite.doc_path(args.doc, "llc_localization.py")
    start = time.perf_counter()
    cases = [c for c in suite.CASES if c.name in CASES]
    rows = [row for result in suite.run_in_processes(sweep_rows, [(c, Path(args.out)) for c in cases], args.jobs)
            for row in result]
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    strong = [c for c in suite.CASES if c.name in EXTRAPOLATION_CASES]
    extrapolation = pd.DataFrame([row for result in suite.run_in_processes(
        extrapolation_rows, [(c, Path(args.out)) for c in strong], args.jobs) for row in result])
    print(extrapolation_page(extrapolation))
    by_name = {c.name: c for c in suite.CASES}
    paths = {name: suite.checkpoints(by_name[name], Path(args.out)) for name in dict.fromkeys(r[0] for r in LONG_RUNS)}
    long_chains = pd.DataFrame([row for result in suite.run_in_processes(
        long_chain_rows, [(by_name[name], paths[name], loc, points) for name, loc, points in LONG_RUNS], args.jobs)
        for row in result])
    print(long_chain_page(long_chains))
    paths.update({name: suite.checkpoints(by_name[name], Path(args.out)) for name, _ in RELAXED_RUNS})
    relaxed = pd.DataFrame([row for result in suite.run_in_processes(
        relaxed_rows, [(by_name[name], paths[name], nbetas) for name, nbetas in RELAXED_RUNS], args.jobs)
        for row in result])
    print(relaxed_page(relaxed))
    paths.update({name: suite.checkpoints(by_name[name], Path(args.out)) for name in STEP_RUNS})
    steps = pd.DataFrame([row for result in suite.run_in_processes(
        step_rows, [(by_name[name], paths[name]["trained"]) for name in STEP_RUNS], args.jobs) for row in result])
    print(step_page(steps))
    if doc:
        doc.write_text(page(table, time.perf_counter() - start, extrapolation, long_chains, relaxed, steps))
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
