#!/usr/bin/env python
"""Is the NGD-vs-SGD study's cut-off checkpoint at a minimum? The Hessian's smallest eigenvalue there, on growing
seeded subsets of the training set, against the same measurement at a minimum.

`analyze calibrate` reports lambda_min on the Hessian estimator's 1,280 samples, and at the study's cut-off it is
negative (docs/ngd-vs-sgd.md). A subsample's Hessian dips below zero even at a minimum of the full loss (its
noise has no sign), so one number cannot tell a real downward curvature from that noise. Here lambda_min (and
lambda_max) at the cut-off checkpoint (epoch 30 of the study's trunk: its args file on Fashion-MNIST, trained here
with a one-epoch branch) on 1,280 to 12,800 samples, and as a control the same at a minimum of the empirical loss:
the trained student of the truth suite's 20-10-20 deep linear net (n = 59,940, full-batch gradient descent,
scripts/validate_llc.py), up to its whole training set. Noise shrinks as the subset grows; a real downward
curvature stays. Then, on the whole training set, what the LLC estimator meets there at the localizations the
study page uses (the study's gamma 100, the calibrated 1000) and a stronger one: the gradient's norm and, in the
quadratic model, the estimate's downward shift from a checkpoint that is not a stationary point
(analyze/llc/stationarity.py), or where the localization does not hold the chains at all, the negative curvature
that shows it.

Usage: python scripts/cutoff_curvature.py [--out cutoff-curvature] [--doc docs/cutoff-curvature.md]
About 17 minutes here on one core, most of it Lanczos from the bottom of the spectrum on 12,800 samples.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _stages, validate_llc: next to this file
import _stages  # noqa: E402
import validate_llc as suite  # noqa: E402
from analyze.llc.stability import bottom_hessian_eigenvalue, top_hessian_eigenvalue  # noqa: E402
from analyze.llc.stationarity import gradient_offset  # noqa: E402

PROG = "cutoff_curvature.py"
STUDY_ARGS = Path(__file__).resolve().parent / "args_ngd_sgd.json"
CONTROL = "dln-20x10-r5"
STUDY_SAMPLES = [1_280, 4_096, 12_800]
CONTROL_SAMPLES = [1_280, 4_096, 12_800, 59_940]  # the last: the whole training set
RESULTS = "cutoff-curvature.json"  # in --out: every number the page shows
LOCALIZATIONS = [100.0, 1_000.0, 10_000.0]  # the study's, the calibrated one (docs/ngd-vs-sgd.md), a stronger one


def cutoff_checkpoint(out: Path, data: list[str], device: str) -> Path:
    """The study's trunk at its cut-off, trained by train-ckpts from the args file as it is, but for a one-epoch
    branch (the trunk is the same run as the study's; reused when already there)."""
    study = json.loads(STUDY_ARGS.read_text())
    cut = study[0]["cut_off_epochs"]
    ckpts = out / "ckpts"
    ckpt = ckpts / f"ffnn-{study[0]['hidden_layers'][0]}x{study[0]['hidden_nodes'][0]}-trunk" / f"epoch-{cut:04d}.safetensors"
    if not ckpt.exists():
        _stages.run([_stages.bin_path("train-ckpts", PROG), "--config", str(STUDY_ARGS), "--num-epochs", str(cut + 1),
                     "--out", str(ckpts), *data, "--device", device, "--quiet"]
                    + (["--resume"] if ckpts.exists() else []), PROG)
    return ckpt


def curvature_rows(model: str, ctx, sample_counts: list[int]) -> list[dict]:
    n = len(ctx.splits.train)
    rows = []
    for samples in sample_counts:
        start = time.perf_counter()
        lambda_min = bottom_hessian_eigenvalue(ctx, samples)
        lambda_max = top_hessian_eigenvalue(ctx, samples)
        rows.append({"model": model, "samples": min(samples, n), "n": n, "lambda_min": lambda_min,
                     "lambda_max": lambda_max, "seconds": time.perf_counter() - start})
        print(f"{model}: {min(samples, n):,} samples: lambda_min {lambda_min:.4g}, lambda_max {lambda_max:.4g} "
              f"({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def stationarity_rows(model: str, ctx) -> list[dict]:
    """At each localization, on the whole training set: the quadratic model's downward shift of the LLC estimate
    (or the negative curvature that leaves it without one)."""
    n = len(ctx.splits.train)
    nbeta = n / math.log(n)  # the llc estimator's default
    rows = []
    for gamma in LOCALIZATIONS:
        start = time.perf_counter()
        r = gradient_offset(ctx, nbeta, gamma)
        rows.append({"model": model, "n": n, "nbeta": nbeta, "localization": gamma, "grad_norm": r.grad_norm,
                     "offset": r.offset, "negative_curvature": r.negative_curvature, "cg_iterations": r.iterations,
                     "seconds": time.perf_counter() - start})
        print(f"{model}: gamma {gamma:g}: |g| {r.grad_norm:.3g}, offset {r.offset:.4g}, negative curvature "
              f"{r.negative_curvature:.3g} ({r.iterations} CG iterations, {rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def stationarity_lines(table: pd.DataFrame) -> list[str]:
    lines = ["| checkpoint | n | nbeta | gamma | -gamma / nbeta | gradient norm | LLC shift (quadratic model) | "
             "CG iterations | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        shift = (f"-{r.offset:,.0f}" if math.isfinite(r.offset) else
                 f"none: a direction of curvature {r.negative_curvature:.3g} < -gamma / nbeta, the chains descend")
        lines.append(f"| {r.model} | {r.n:,} | {r.nbeta:,.0f} | {r.localization:g} | {-r.localization / r.nbeta:.3g} | "
                     f"{r.grad_norm:.3g} | {shift} | {r.cg_iterations} | {r.seconds:.0f} |")
    return lines


def page(table: pd.DataFrame, stationarity: pd.DataFrame, seconds: float) -> str:
    lines = ["| checkpoint | samples | of n | lambda_min | lambda_max | lambda_min / lambda_max | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.model} | {r.samples:,} | {r.n:,} | {r.lambda_min:.3g} | {r.lambda_max:.3g} | "
                     f"{r.lambda_min / r.lambda_max:+.2g} | {r.seconds:.0f} |")
    return ("# Downward curvature at the NGD-vs-SGD study's cut-off checkpoint\n\n"
            "Written by `scripts/cutoff_curvature.py` (do not edit by hand). " + " ".join(__doc__.split("\n\n")[1].split())
            + f" Whole run: {seconds / 60:.1f} min on this machine.\n\n"
            "lambda_min and lambda_max: the smallest and largest eigenvalue of the mean loss's Hessian on that many "
            "seeded training samples (Lanczos, analyze/llc/stability.py, as `analyze calibrate` measures them; "
            "lambda_min to a relative tolerance of 1e-3).\n\n" + "\n".join(lines) + "\n\n"
            + "\n".join(reading(table)) + "\n\n## On the whole training set: the gradient and the LLC's shift\n\n"
            "The llc estimator's nbeta = n / log n. `LLC shift`: (nbeta^2 / 2)(g'x + gamma |x|^2) with "
            "x = (nbeta H + gamma I)^-1 g (conjugate gradients on exact Hessian products, to a relative residual of "
            "1e-3), how far below its curvature share a Gaussian posterior around this checkpoint puts the estimate. "
            "Where conjugate gradients meet a direction of curvature below -gamma / nbeta, the localized potential "
            "curves down there on the whole training set: no stationary posterior, the chains keep descending.\n\n"
            + "\n".join(stationarity_lines(stationarity)) + "\n\n" + "\n".join(holding(stationarity)) + "\n")


def reading(table: pd.DataFrame) -> list[str]:
    """What the numbers say: does lambda_min shrink with the subset (noise) or stay (a real downward curve)?"""
    out = []
    for model, g in table.groupby("model", sort=False):
        first, last = g.iloc[0], g.iloc[-1]
        ratio = last.lambda_min / first.lambda_min
        what = ("shrinks towards 0 as the subset grows: the subsample's noise" if ratio < 0.25 else
                "stays as the subset grows: the loss curves down there" if ratio > 0.5 else "shrinks in part")
        out.append(f"- {model}: lambda_min {first.lambda_min:.3g} on {first.samples:,} samples, {last.lambda_min:.3g} "
                   f"on {last.samples:,} ({ratio:.2f} of it): {what}")
    return out + ["", "Lanczos to a relative tolerance returns the smallest eigenvalue it has converged, which in the "
                  "dense cluster at the bottom of a net's spectrum can lie above the true one: where lambda_min does "
                  "not fall steadily with the subset, the lowest value is the better bound."]


def holding(stationarity: pd.DataFrame) -> list[str]:
    """Per checkpoint: the localizations whose potential curves down somewhere on the whole set, and the shift at
    the weakest one that holds."""
    out = []
    for model, g in stationarity.groupby("model", sort=False):
        down = g[g.offset.isna()]
        held = g[g.offset.notna()]
        text = f"- {model}: gradient norm {g.grad_norm.iloc[0]:.3g}"
        if len(down):
            text += (f"; at gamma {', '.join(f'{v:g}' for v in down.localization)} the whole training set's loss "
                     f"curves down by more than the localization holds (lambda_min <= {down.negative_curvature.min():.3g})")
        if len(held):
            r = held.iloc[0]
            text += f"; at gamma {r.localization:g} the chains are held and the gradient shifts the estimate by -{r.offset:,.1f}"
        out.append(text)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="cutoff-curvature", help="folder for the trained checkpoints (reused when "
                    "present; the control's in OUT/llc-truth) (default: %(default)s)")
    ap.add_argument("--data-root", help="Fashion-MNIST folder (default: Debian's dataset-fashion-mnist package)")
    ap.add_argument("--device", default="cpu", help="torch device for training (default: %(default)s)")
    ap.add_argument("--doc", help="write the table to this markdown file (e.g. docs/cutoff-curvature.md)")
    ap.add_argument("--doc-only", action="store_true", help="run nothing: rebuild --doc from the results a finished "
                    "run saved in OUT/cutoff-curvature.json")
    args = ap.parse_args(argv)
    doc = _stages.doc_path(args.doc, PROG)
    out = Path(args.out)
    if args.doc_only:
        if not (out / RESULTS).exists():
            raise SystemExit(f"{PROG}: --doc-only: {out / RESULTS} not found (run without --doc-only first)")
        saved = json.loads((out / RESULTS).read_text())
        if doc:
            doc.write_text(page(pd.DataFrame(saved["subsets"]), pd.DataFrame(saved["whole"]), saved["seconds"]))
        return 0
    start = time.perf_counter()
    cutoff = cutoff_checkpoint(out, ["--data-root", args.data_root] if args.data_root else [], args.device)
    control = suite.checkpoints(next(c for c in suite.CASES if c.name == CONTROL), out / "llc-truth")["trained"]
    # each checkpoint's context (model and training set) is loaded once, for both measurements
    measured = [("study's cut-off (epoch 30, SGD trunk)", suite.context_for(cutoff), STUDY_SAMPLES),
                (f"control: {CONTROL} trained student (a minimum)", suite.context_for(control), CONTROL_SAMPLES)]
    rows = [row for name, ctx, samples in measured for row in curvature_rows(name, ctx, samples)]
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    stationarity = pd.DataFrame([row for name, ctx, _ in measured for row in stationarity_rows(name, ctx)])
    print(stationarity.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps({"subsets": rows, "whole": stationarity.to_dict("records"),
                                           "seconds": seconds}))
    if doc:
        doc.write_text(page(table, stationarity, seconds))
        print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
