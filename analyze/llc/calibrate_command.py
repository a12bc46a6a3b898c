"""The `analyze calibrate CKPT` command: options, the run, the table written to the analysis store, and the
printed plateau and recommendation. The calibration itself: analyze/llc/calibrate.py."""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from analyze.estimators.base import EstimatorError
from analyze.estimators.llc import (DEFAULTS, GRADIENTS, LLCEstimator, parse_burnin, parse_localization, parse_lr,
                                    parse_nbeta)
from analyze.llc import calibrate as calibration
from analyze.llc.calibrate import CALIBRATION_LENGTH, DEFAULT_GRID, MAX_CHAINS, PRECISION, calibrate, context_for
from analyze.llc.calibration_table import grid_rows, plateau_text, recommended_setting
from analyze.llc.sampler import SAMPLERS
from analyze.llc.stability import STABLE_STEP
from analyze.llc.statistics import DRIFT_MAX, NOT_AT_MINIMUM_SE, RHAT_MAX
from analyze.store import Store, config_hash, task_key
from trainer.checkpoints import CheckpointError
from trainer.data import DataError


def _list(text: str, flag: str, parse) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise EstimatorError(f"{flag}: give one or more values")
    for v in values:
        parse(v, 1.0)  # one-line error naming the flag
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="analyze calibrate", description=calibration.__doc__.split("\n\n")[0],
                                 epilog=calibration.__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint file (epoch-NNNN.safetensors)")
    ap.add_argument("--lr", default=",".join(DEFAULT_GRID["lr"]),
                    help="SGLD step sizes, comma-separated: numbers or 'c/nbeta' (default: %(default)s)")
    ap.add_argument("--localization", default=",".join(DEFAULT_GRID["localization"]),
                    help="localizations gamma: numbers or 'c*nbeta' (default: %(default)s)")
    ap.add_argument("--nbeta", default="n/log n", help="nbeta values separated by ';': numbers, 'n/log n' or 'n' "
                    "(default: %(default)s)")
    ap.add_argument("--chains", type=int, default=DEFAULTS["chains"], help="chains per run (default: %(default)s)")
    ap.add_argument("--draws", type=int, default=CALIBRATION_LENGTH,
                    help="kept draws per chain at the largest step; k times more at a k times smaller step "
                         "(default: %(default)s)")
    ap.add_argument("--burnin", type=int, default=CALIBRATION_LENGTH,
                    help="burn-in steps at the largest step, scaled like --draws (default: %(default)s)")
    ap.add_argument("--batch-size", default=DEFAULTS["batch_size"],
                    help="SGLD minibatch: a number (0 = full batch) or 'auto' (grows with the step, as in the "
                         "llc estimator) (default: %(default)s)")
    ap.add_argument("--gradient", default=DEFAULTS["gradient"], choices=GRADIENTS,
                    help="control-variate (SGLD-CV) or minibatch gradients, as in the llc estimator "
                         "(default: %(default)s)")
    ap.add_argument("--confirm-chains", type=int, default=DEFAULTS["chains"],
                    help="chains of the confirmation run: the recommended setting runs again at the length the study "
                         "will use (analyze's --llc-chains, --llc-draws, --llc-burnin), with 3x and 9x the burn-in "
                         "while still settling, before it is recommended (default: %(default)s)")
    ap.add_argument("--confirm-draws", type=int, default=DEFAULTS["draws"],
                    help="kept draws per chain of the confirmation run; 0: no confirmation (default: %(default)s)")
    ap.add_argument("--confirm-burnin", default=DEFAULTS["burnin"],
                    help="first burn-in of the confirmation run: a whole number, or 'auto' as the llc estimator's "
                         "(grows as sqrt(nbeta)); 9x it is the longest confirmation run, and a localization whose "
                         "flattest direction needs more to relax (3 x 1/(eps (gamma + nbeta max(lambda_min, 0)))) is "
                         "set aside, unless the plateau's larger step relaxes within it and its step check at the "
                         "pick's step agrees; the relaxed pick's step check (a third of the step) runs 3x its burn-in "
                         "and draws, and a second check within 27x (default: %(default)s)")
    ap.add_argument("--precision", type=float, default=PRECISION,
                    help="the standard error a confirmed setting should reach, as a fraction of its LLC: where its "
                         "chains' spread (the per-chain SD pooled over the healthy confirmation runs at its "
                         "localization) gives a larger one, it runs again with the chains that bring it there (at most "
                         f"{MAX_CHAINS}), and those chains are part of the recommendation; 0: never (default: "
                         "%(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="chain seed (default: %(default)s)")
    ap.add_argument("--sampler", default="sgld", choices=SAMPLERS,
                    help="SGLD or RMSProp-preconditioned SGLD (default: %(default)s)")
    ap.add_argument("--out", help="analysis folder for the `calibration` table (default: <ckpt dir>/../analysis)")
    ap.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    ap.add_argument("--data-root", help="override the dataset folder stored in the checkpoint")
    args = ap.parse_args(argv)
    path = Path(args.checkpoint)
    try:
        lrs = _list(args.lr, "--lr", parse_lr)
        locs = _list(args.localization, "--localization", parse_localization)
        nbetas = [v.strip() for v in args.nbeta.split(";") if v.strip()]
        for nb in nbetas:
            parse_nbeta(nb, 100)
        common = dict(chains=args.chains, draws=args.draws, burnin=args.burnin, batch_size=args.batch_size,
                      seed=args.seed, sampler=args.sampler, gradient=args.gradient)
        study = dict(chains=args.confirm_chains, draws=args.confirm_draws, burnin=args.confirm_burnin)
        LLCEstimator(**common)  # option errors before loading anything
        if args.confirm_draws < 0 or args.confirm_chains < 2:
            raise EstimatorError("--confirm-chains must be >= 2 (the drift test compares chains), --confirm-draws >= 0")
        try:
            parse_burnin(args.confirm_burnin, 1.0)
        except EstimatorError as e:  # the llc estimator's message names its own flag
            raise EstimatorError(str(e).replace("--llc-burnin", "--confirm-burnin")) from None
        if not 0 <= args.precision < 1:
            raise EstimatorError("--precision must lie in [0, 1) (a fraction of the LLC; 0: no extra chains)")
        if not path.is_file():
            raise CheckpointError(path, "no such checkpoint file")
        ctx = context_for(path, args.device, args.data_root)
        table = calibrate(ctx, lrs, locs, nbetas, common, study=study if args.confirm_draws else None,
                          precision=args.precision)
    except (EstimatorError, CheckpointError, DataError) as e:
        print(f"analyze calibrate: error: {own_flags(str(e))}", file=sys.stderr)
        return 2
    # Written as one task of the analysis store (same checkpoint hash, keys and completion marker as the
    # estimators' tables), so analyze.load() and the report see it and it joins the other tables.
    info = ctx.checkpoint
    config = {"grid": [lrs, locs, nbetas], **common, "confirm": study if args.confirm_draws else None,
              "precision": args.precision}
    keys = {"run": info.run, "optimizer": info.optimizer, "epoch": info.epoch, "step": info.step,
            "ckpt_hash": info.hash, "config_hash": config_hash(config)}
    store = Store(Path(args.out) if args.out else path.resolve().parent.parent / "analysis")
    key = task_key(info.hash, "calibration", config)
    store.reopen(key)
    store.write_parts(key, keys, {"calibration": table})
    store.finish(key, {"estimator": "calibration", "checkpoint": str(path), "config": config})
    out = store.root

    print_summary(table, lrs, path)
    print(f"calibration table: {out / 'calibration'}")
    return 0


# llc estimator options calibrate takes under its own names (--lr for --llc-lr)
SHARED_OPTIONS = ("lr", "localization", "nbeta", "chains", "draws", "burnin", "batch-size", "gradient", "sampler",
                  "seed")


def own_flags(message: str) -> str:
    """The llc estimator's messages name its flags (--llc-lr); here the option was given as calibrate's (--lr)."""
    return re.sub(r"--llc-([a-z-]+)", lambda m: f"--{m[1]}" if m[1] in SHARED_OPTIONS else m[0], message)


def margin_text(grid) -> str:
    """The smallest Hessian eigenvalue and the localizations too weak to hold the chains against it."""
    lambda_min = grid.lambda_min.iloc[0]
    weak = grid[grid.localization_margin < 0].drop_duplicates("localization_option")
    text = (f"lambda_min of the Hessian at the checkpoint: {lambda_min:.4g}; localization_margin = gamma + nbeta x "
            "lambda_min")
    if not len(weak):
        return text + " is positive at every localization of the grid"
    return (text + f" is negative at localization {', '.join(weak.localization_option)}: on these samples the loss "
            "curves down at the checkpoint more than these localizations hold. Where the full loss does too, their "
            "chains descend (negative drift, an LLC that falls with the chain length); a subsample's Hessian can "
            "also dip below zero at a minimum, so read it with the drift")


def print_summary(table, lrs: list[str], path: Path) -> None:
    """The plateau, the grid's rows, what was not run, the confirmation runs and the recommendation."""
    grid = grid_rows(table)
    print("LLC +- standard error at equal sampling time (rows: localization; columns: step; ✗ not healthy, "
          "◀ recommended)")
    print(plateau_text(table))
    columns = ["lr_option", "localization_option", "nbeta", "n_chains", "n_draws", "n_burnin", "llc_mean", "llc_sem",
               "drift", "rhat", "step_curvature", "diverged", "left_basin", "not_at_minimum", "healthy"]
    number = lambda v: f"{v:.4g}"  # noqa: E731
    print("\n" + grid[columns + ["agrees_with_larger_step", "recommended"]].to_string(index=False, float_format=number))
    lambda_max = table.lambda_max.iloc[0]
    print(f"lambda_max of the Hessian at the checkpoint: {lambda_max:.4g}; step_curvature = eps x nbeta x lambda_max "
          f"must stay below {STABLE_STEP:g} (the stiffest direction's stability)")
    if "localization_margin" in table:
        print(margin_text(grid))
    unstable = [t for t in lrs if t not in set(grid.lr_option)]
    if unstable:
        added = any(t not in lrs for t in grid.lr_option)
        print(f"not run, unstable at this checkpoint: {', '.join(unstable)}" + ("; smaller steps replace them" if added else ""))
    cut_short = table.attrs.get("given_up", [])
    if cut_short:
        print(f"smaller steps not run at localization {', '.join(cut_short)}: a larger step's chains there were "
              "unhealthy even with 3x the burn-in")
    unrelaxed = table.attrs.get("unrelaxed", [])
    if unrelaxed:
        print(f"not confirmed at localization {', '.join(unrelaxed)}: its pick's flattest direction needs more burn-in "
              "to relax (3 x relaxation_steps) than 9x --confirm-burnin; a stronger localization holds it faster")
    confirmations = table[table["stage"] == "confirmation"] if "stage" in table else table.iloc[:0]
    if len(confirmations):
        print("\nconfirmation at the study's length (the grid's pick, run again with its chains and draws; where its "
              "burn-in is under 3 relaxation times, once more at 3, the shorter recommended if the two agree; then "
              "at a third of the step, relaxed too, recommended where the two agree and checked in turn where not):")
        print(confirmations[["check"] + columns + ["relaxation_steps", "agrees_with_larger_step", "recommended"]]
              .to_string(index=False, float_format=number))
    setting = recommended_setting(table)
    if setting:
        print("\n" + recommended_text(setting, grid.sampler.iloc[0]))
    elif grid.not_at_minimum.all():
        print(f"\nno setting qualifies: {path} is not at a local minimum (every setting found lower loss than the "
              f"checkpoint, LLC < 0 by > {NOT_AT_MINIMUM_SE:g} standard errors), so its LLC is not defined; calibrate on "
              "a trained checkpoint")
    elif len(confirmations) or unrelaxed:
        print("\nno setting qualifies at the study's length: the chains of every setting the grid picked were still "
              "unhealthy in the confirmation runs, even with 9x the burn-in, or too slow to relax at it; try more "
              "--confirm-burnin, stronger localizations, or longer calibration chains (--draws, --burnin)")
    else:
        print(f"\nno setting qualifies: at no localization are all steps healthy (no divergence, in the basin, R-hat < "
              f"{RHAT_MAX}, |drift| <= {DRIFT_MAX:g}, step_curvature < {STABLE_STEP:g}) with a step that agrees with the "
              "next larger one; try smaller steps, longer chains (--draws, --burnin), or other localizations")


def recommended_text(setting: dict, sampler: str) -> str:
    """The recommendation as the `analyze` flags that run it, with its LLC and the step checks' around it."""
    flags = "" if sampler == "sgld" else f" --llc-sampler {sampler}"
    flags += f" --llc-lr {setting['lr']} --llc-localization {setting['localization']} --llc-nbeta '{setting['nbeta']}'"
    if setting["burnin"] is not None:
        flags += f" --llc-burnin {setting['burnin']}"
    if setting["chains"] is not None:
        flags += f" --llc-draws {setting['draws']} --llc-chains {setting['chains']}"
    smaller = ""
    if math.isfinite(setting["llc_at_smaller_step"]):
        smaller = f"; at a third of the step, relaxed: {setting['llc_at_smaller_step']:.3g}"
        if not setting["smaller_step_healthy"]:  # step_plateau kept this step: that check had not settled
            smaller += ", its chains still settling: no plateau test"
    return (f"recommended:{flags}   (LLC {setting['llc_mean']:.3g} +- {setting['llc_sem']:.2g}; "
            f"at the next larger step: {setting['llc_at_larger_step']:.3g}{smaller})")
