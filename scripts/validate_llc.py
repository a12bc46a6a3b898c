#!/usr/bin/env python
"""The LLC truth suite: estimates against learning coefficients theory gives, across n and model size.

Every case is a regression teacher (inputs N(0, I), Gaussian noise sigma 1) and a student that can realise
it: linear regression (a regular model, lambda = d / 2) and bias-free deep linear networks (Aoyagi 2024,
Theorem 1), with full-rank and rank-deficient teachers. Each is trained with `train-ckpts` (SGD, with
`--truth-checkpoint`), and the LLC is estimated with the `llc` estimator at two points: the true parameter
(the `-truth` run's checkpoint) and the trained student (the last epoch). Columns: the estimate at the
defaults and, with --calibrate, at `analyze calibrate`'s recommendation for that checkpoint, with the
relative error against the truth and the seconds taken. `gap` = nbeta (L_n(w_0) - L_n(trained)): the true
parameter w_0 is not the minimum of the empirical loss, so the estimate there is expected to sit below the
trained student's by about this much (about lambda / log n for a regular model).

Usage: python scripts/validate_llc.py [--out llc-truth] [--calibrate] [--quick | --scale] [--doc docs/llc-validation.md]
       [--llc-OPTION VALUE ...]   (any `llc` estimator option, e.g. --llc-lr 0.01/nbeta, to try other settings)
--quick runs a small subset (the tests use it); the full suite with --calibrate takes about 15 minutes here (two
cases at once, --jobs 2). --scale runs the cases at the NGD-vs-SGD study's size instead (their calibration over
SCALE_GRID, marked "scale grid").
docs/llc-validation.jsonl keeps the rows behind docs/llc-validation.md (--json); --from-json rebuilds the page.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _stages, next to this file (also when imported)
from _stages import doc_path  # noqa: E402
from analyze.llc.calibrate import calibrate, context_for  # noqa: E402
from analyze.llc.calibration_table import plateau_text  # noqa: E402
from analyze.estimators.llc import DEFAULTS, LLCEstimator  # noqa: E402
from trainer.checkpoints import checkpoint_name  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.experiment import run_experiment  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    input_dim: int
    outputs: int
    hidden_nodes: int
    hidden_layers: int  # 0: linear regression
    rank: int | None  # teacher rank (None: full)
    samples: int  # all splits; training n = 0.9 x samples
    bias: bool = False
    scale: bool = False  # run with --scale only

    def config(self, out: Path) -> TrainConfig:
        return TrainConfig(
            dataset="teacher", teacher_task="regression", teacher_samples=self.samples,
            teacher_input_dim=self.input_dim, teacher_outputs=self.outputs, teacher_noise_sigma=1.0,
            teacher_model_type="dlnn", teacher_hidden_nodes=self.hidden_nodes, teacher_hidden_layers=self.hidden_layers,
            teacher_bias=self.bias, teacher_rank=self.rank, truth_checkpoint=True,
            model_type="dlnn", hidden_nodes=[self.hidden_nodes], hidden_layers=[self.hidden_layers], bias=self.bias,
            experiment_type="standard", optimizer="sgd", sgd_lr=0.05, momentum=0.9, batch_size=self.samples,
            num_epochs=EPOCHS, val_fraction=0.05, test_fraction=0.05, seed=1, out=str(out / self.name),
            quiet=True, resume=True)


EPOCHS = 300  # full-batch gradient descent: the trained student is at the empirical minimum
CASES = [
    Case("linreg-4to2", 4, 2, 1, 0, None, 1_100, bias=True),  # d = 10
    Case("linreg-10to3", 10, 3, 1, 0, None, 11_100, bias=True),  # d = 33
    Case("linreg-20to5", 20, 5, 1, 0, None, 66_600, bias=True),  # d = 105
    Case("linreg-30to9", 30, 9, 1, 0, None, 11_100, bias=True),  # d = 279
    Case("dln-5x2-r5", 5, 5, 5, 2, 5, 11_100),  # 5-5-5-5, full rank (orthogonal layers: resolved singular values)
    Case("dln-10x4x2-r2", 10, 10, 4, 2, 2, 11_100),  # 10-4-4-10, rank 2
    Case("dln-8x3-r3", 8, 8, 8, 3, 3, 1_100),  # 8-8-8-8-8, rank 3: multiplicity 4, the most singular case
    Case("dln-8x3-r3-n60k", 8, 8, 8, 3, 3, 66_600),  # the same at n = 59,940
    Case("dln-20x10-r5", 20, 20, 10, 1, 5, 66_600),  # 20-10-20, rank 5
    # --scale: the NGD-vs-SGD study's size (n = 60,000, Fashion-MNIST's 784 inputs and 10 outputs)
    Case("linreg-784to10", 784, 10, 1, 0, None, 66_600, bias=True, scale=True),  # d = 7,850
    Case("dln-784x256x2-r5", 784, 10, 256, 2, 5, 66_600, scale=True),  # 784-256-256-10, d = 268,800: the study's widths
]
# At the study's size a calibration over the default grid takes about an hour per point here: the scale cases
# calibrate over the two smaller default steps and the localizations that bracket the answer there (chains leave
# the basin at 100 on the deep linear net; 10000 pulls the estimate far below the truth).
SCALE_GRID = {"lr": ["0.03/nbeta", "0.01/nbeta"], "localization": ["100", "1000", "10000"]}
QUICK = ["linreg-4to2", "dln-8x3-r3"]


def checkpoints(case: Case, out: Path) -> dict[str, Path]:
    """Train the case (or reuse a finished run) and return its truth and trained-student checkpoints."""
    cfg = case.config(out)
    run_experiment(cfg, log=lambda *a: None)
    family = next(p for p in (out / case.name).iterdir() if p.name.endswith("-truth")).name[:-len("-truth")]
    return {"truth": out / case.name / f"{family}-truth" / checkpoint_name(0),
            "trained": out / case.name / f"{family}-sgd" / checkpoint_name(EPOCHS)}


def estimate(ctx, options: dict) -> dict:
    start = time.perf_counter()
    row = LLCEstimator(**options).run(ctx)["llc"].iloc[0].to_dict()
    row["wall_seconds"] = time.perf_counter() - start
    return row


def calibrated(ctx, options: dict, grid: dict | None = None) -> dict:
    """analyze calibrate's recommendation for this checkpoint (over `grid`, default: calibrate's), confirmed at
    the estimator's chain and draw counts as the command does by default (with the chains its precision asks
    for): its recommended confirmation run is the estimate."""
    start = time.perf_counter()
    table = calibrate(ctx, progress=False, **calibration_args(options, grid))
    plateau = plateau_text(table)
    confirmed = table[table.recommended & (table.stage == "confirmation")]
    if not len(confirmed):
        return {"llc_mean": float("nan"), "llc_sem": float("nan"), "wall_seconds": time.perf_counter() - start,
                "setting": "none qualified", "plateau": plateau}
    row = confirmed.iloc[0].to_dict()
    row["wall_seconds"] = time.perf_counter() - start
    row["setting"] = (f"lr {row['lr_option']}, loc {row['localization_option']}, burn-in {row['n_burnin']}, "
                      f"{row['n_draws']} draws, {row['n_chains']} chains"
                      + (" (scale grid)" if grid else ""))
    row["plateau"] = plateau
    return row


def calibration_args(options: dict, grid: dict | None = None) -> dict:
    """The arguments `analyze calibrate CKPT` uses by default (its grid, unless given, and chain lengths)."""
    from analyze.llc.calibrate import CALIBRATION_LENGTH, DEFAULT_GRID

    grid = grid or DEFAULT_GRID
    common = {"draws": CALIBRATION_LENGTH, "burnin": CALIBRATION_LENGTH,
              **{k: v for k, v in options.items() if k not in ("lr", "localization", "nbeta", "draws", "burnin")}}
    study = {k: options.get(k, DEFAULTS[k]) for k in ("chains", "draws", "burnin")}
    return {"lrs": grid["lr"], "localizations": grid["localization"], "nbetas": ["n/log n"],
            "common": common, "study": study}


def run_cases(work: list[tuple], jobs: int):
    """case_rows of each item of `work`, in order (run_in_processes)."""
    yield from run_in_processes(case_rows, work, jobs)


def run_in_processes(fn, work: list[tuple], jobs: int):
    """fn(*item) for each item of `work`, in order. Cases are independent: `jobs` of them run at once, each in its
    own process on one thread (these small models gain nothing from more, and two multi-threaded processes on two
    cores only oversubscribe them)."""
    if jobs <= 1:
        yield from (fn(*item) for item in work)
        return
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(1,)) as pool:
        yield from pool.map(fn, *zip(*work))


def truth_gap(estimate: dict, trained_loss: float) -> float:
    """nbeta (L_n(w) - L_n(trained)) for an llc row at w: at the true parameter, how far below the trained student's
    estimate it is expected to sit (w_0 is not the empirical loss's minimum); 0 at the trained student."""
    return estimate["nbeta"] * (estimate["init_loss"] - trained_loss)


def case_rows(case: Case, out: Path, options: dict, with_calibration: bool) -> list[dict]:
    """Train the case (or reuse it) and estimate at its two points: one table row per point."""
    contexts = {point: context_for(path) for point, path in checkpoints(case, out).items()}
    estimates = {point: estimate(ctx, options) for point, ctx in contexts.items()}
    trained_loss = estimates["trained"]["init_loss"]  # L_n at the trained student, the estimator's baseline
    rows = []
    for point, ctx in contexts.items():
        d = estimates[point]
        row = {"case": case.name, "point": point, "n": d["n"], "d": sum(p.numel() for p in ctx.model.parameters()),
               "truth": d["llc_truth"], "llc": d["llc_mean"], "sem": d["llc_sem"], "drift": d["drift"],
               "rhat": d["rhat"], "error": d["llc_mean"] / d["llc_truth"] - 1, "seconds": d["wall_seconds"],
               # the true parameter is not the empirical loss's minimum: the estimate there is expected to sit
               # below the one at the trained student by about this much
               "gap": truth_gap(d, trained_loss),
               "lr_nbeta": d["lr_nbeta"], "loc_per_nbeta": d["localization_per_nbeta"]}
        if with_calibration:
            c = calibrated(ctx, options, SCALE_GRID if case.scale else None)
            row.update(cal_llc=c["llc_mean"], cal_sem=c["llc_sem"], cal_error=c["llc_mean"] / d["llc_truth"] - 1,
                       cal_seconds=c["wall_seconds"], cal_setting=c.get("setting"))
            if case.scale:  # the plateau behind the recommendation, shown on the page (the table is too wide)
                row["cal_plateau"] = c["plateau"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="llc-truth", help="folder for the trained cases (reused when present)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--cases", help="comma-separated case names (default: all but the --scale ones)")
    ap.add_argument("--scale", action="store_true", help="the cases at the NGD-vs-SGD study's size (n = 60,000, up to "
                    "268,800 parameters; with --calibrate about 25 minutes here, plus the training)")
    ap.add_argument("--calibrate", action="store_true", help="also estimate at analyze calibrate's recommendation")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="cases run at once, one process and one thread each (default: the cores, %(default)s)")
    ap.add_argument("--doc", help="write the table to this markdown file (e.g. docs/llc-validation.md)")
    ap.add_argument("--json", help="write the rows as JSON lines to this file")
    ap.add_argument("--from-json", help="rebuild the table (and --doc) from the rows a previous --json wrote, "
                    "without sampling")
    args, extra = ap.parse_known_args(argv)
    doc = doc_path(args.doc, "validate_llc.py")
    options = {}
    for flag, value in zip(extra[::2], extra[1::2]):
        if not flag.startswith("--llc-"):
            ap.error(f"unknown option {flag}")
        options[flag[6:].replace("-", "_")] = value
    if args.from_json:
        rows = [json.loads(line) for line in Path(args.from_json).read_text().splitlines() if line.strip()]
        table = pd.DataFrame(rows)
        print("\n".join(summary(table)))
        if doc:
            seconds = table.seconds.sum() + table.get("cal_seconds", pd.Series(dtype=float)).sum()
            write_doc(doc, table, options, seconds, sampling_only=True)
        return 0
    names = (QUICK if args.quick else args.cases.split(",") if args.cases
             else [c.name for c in CASES if c.scale == args.scale])
    out = Path(args.out)
    start = time.perf_counter()
    cases = [c for c in CASES if c.name in names]
    work = [(case, out, options, args.calibrate) for case in cases]
    if args.json:  # this run's rows only (appended as each case finishes, so a killed run keeps the finished ones)
        Path(args.json).write_text("")
    rows = []
    for case_result in run_cases(work, args.jobs):
        rows += case_result
        for row in case_result:
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    table = pd.DataFrame(rows)
    print(table.drop(columns="cal_plateau", errors="ignore").to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print("\n".join(summary(table)))
    if doc:
        write_doc(doc, table, options, time.perf_counter() - start)
    return 0


def summary(table: pd.DataFrame) -> list[str]:
    lines = []
    for column, target, label in (("error", 0.25, "defaults"), ("cal_error", 0.15, "calibrate's recommendation")):
        if column in table:
            err = table[column].abs()
            worst = table.loc[err.idxmax()] if err.notna().any() else None
            where = f" (worst: {worst.case} at the {worst.point} point, {worst[column]:+.0%})" if worst is not None else ""
            per_point = "; ".join(f"{(err[table.point == p] <= target).sum()} of {(table.point == p).sum()} at the "
                                  f"{p} points" for p in ("trained", "truth"))
            lines.append(f"- {label}: {int((err <= target).sum())} of {len(table)} estimates within {target:.0%} of "
                         f"the truth ({per_point}); largest error {err.max():.0%}{where}")
    truth = table[table.point == "truth"]
    if len(truth):
        # the estimate at w_0 is expected to sit below the truth by `gap` (module docstring): with it added back,
        # what remains is the sampler's error
        at = [("the defaults", "llc")] + ([("calibrate's recommendation", "cal_llc")] if "cal_llc" in truth else [])
        counts = []
        for label, column in at:
            adjusted = ((truth[column] + truth.gap) / truth.truth - 1).abs()
            counts.append(f"{(adjusted <= 0.15).sum()} of {len(truth)} within 15% of the truth at {label} "
                          f"(largest {adjusted.max():.0%})")
        lines.append("- at the true parameter, estimate + gap: " + "; ".join(counts))
    return lines


def write_doc(path: Path, table: pd.DataFrame, options: dict, seconds: float, sampling_only: bool = False) -> None:
    settings = ", ".join(f"--llc-{k.replace('_', '-')} {v}" for k, v in options.items()) or "the defaults"
    timing = (f"Sampling and calibration time: {seconds / 60:.1f} min on this machine (training not counted)"
              if sampling_only else f"Whole run: {seconds / 60:.1f} min on this machine")
    path.write_text(
        "# LLC validation: estimates against known learning coefficients\n\n"
        "Written by `scripts/validate_llc.py` (do not edit by hand). " + __doc__.split("\n\n")[1].replace("\n", " ")
        + "\n\nSettings: " + settings + f". {timing}.\n\n"
        + "\n".join(summary(table)) + "\n\n" + markdown(table.drop(columns="cal_plateau", errors="ignore")) + "\n"
        + plateaus(table))


def plateaus(table: pd.DataFrame) -> str:
    """The calibration plateau behind each scale case's recommendation (LLC +- s.e. by localization and step)."""
    if "cal_plateau" not in table:
        return ""
    blocks = [f"\n{r.case}, {r.point} point (truth {r.truth:.4g}); ✗ not healthy, ◀ recommended:\n\n```\n"
              f"{r.cal_plateau}\n```\n" for r in table.itertuples() if isinstance(r.cal_plateau, str)]
    return ("\n## Calibration at the study's size\n" + "".join(blocks)) if blocks else ""


def markdown(table: pd.DataFrame) -> str:
    def cell(column, v):
        if not isinstance(v, float):
            return str(v)
        return f"{v:.3f}" if column == "rhat" else f"{v:+.0%}" if column.endswith("error") else f"{v:.3g}"

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(table.columns, row)) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
