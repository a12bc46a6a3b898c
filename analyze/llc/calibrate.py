"""`analyze calibrate CKPT`: SGLD over a grid of (step, localization) at equal sampling time, with a
recommendation and the plateau it comes from.

Steps are given relative to nbeta ('c/nbeta': the drift's effective step eps x nbeta = c) and every
step gets the same sampling time: a step k times smaller runs k times more burn-in steps and draws, so a
smaller step is never judged on a shorter chain. Only steps stable at the checkpoint are run
(eps x nbeta x lambda_max < STABLE_STEP, analyze/llc/stability.py; lambda_max is measured once): smaller
ones (a factor 3 apart) replace the unstable ones, and equal sampling time counts from the largest stable
step. A grid point whose chains were still settling (unhealthy by |drift| or R-hat alone) is run once more
with SETTLE_BURNIN x the burn-in; if it is still unhealthy, the smaller steps at its localization are not run
(at the same sampling time their chains would roam alike). A setting is *healthy* as an llc row is
(analyze/llc/statistics.py: no chain diverged or left the basin, at a minimum, R-hat < 1.1, |drift| <= 3,
stable step). Two estimates *agree* when their difference is within AGREEMENT_SE combined standard
errors, plus 5% for the standard errors' own uncertainty. The recommendation: the weakest localization
at which every step is healthy (strong localization biases the LLC low), and at it the largest step that
agrees with the next larger one. The two are on the plateau, and of the two the smaller carries the
smaller step-size bias (which grows with the step: a larger step that merely agrees within the tolerance
can still be 10% high). Where no two steps agree at the weakest healthy localization, up to EXTRA_STEPS
steps a factor 3 smaller are tried there first, and only then is a stronger localization accepted. The
table keeps every grid point, so the plateau (LLC against step for each
localization, with error bars) can be read off and plotted.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from analyze.catalog import CheckpointInfo
from analyze.estimators.base import Context, EstimatorError
from analyze.estimators.llc import DEFAULTS, GRADIENTS, LLCEstimator, parse_localization, parse_lr, parse_nbeta
from analyze.llc.statistics import DRIFT_MAX, NOT_AT_MINIMUM_SE, RHAT_MAX, healthy
from analyze.llc.sampler import SAMPLERS
from analyze.llc.stability import STABLE_STEP, top_hessian_eigenvalue
from analyze.store import Store, config_hash, file_hash, task_key
from trainer.checkpoints import CheckpointError, load_model
from trainer.data import DataError, load_dataset
from trainer.losses import nll_loss

AGREEMENT_SE = 2.0
AGREEMENT_SLACK = 0.05
CALIBRATION_LENGTH = 300  # burn-in and draws at the largest step (the default grid's is 3x the default step)
# gamma 1000: on large nets (a 784-256-256-10 deep linear net, 268,800 parameters) chains at gamma <= 100 roam so far
# along the flat directions that they leave the basin, and 1000 is where the estimate is right (docs/llc.md)
SETTLE_BURNIN = 3  # burn-in factor for a grid point whose chains were still settling (drift or R-hat only)
EXTRA_STEPS = 2  # smaller steps tried at the weakest healthy localization when no two steps agree there
DEFAULT_GRID = {"lr": ["0.1/nbeta", "0.03/nbeta", "0.01/nbeta"], "localization": ["1", "10", "100", "1000"]}


def _list(text: str, flag: str, parse) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise EstimatorError(f"{flag}: give one or more values")
    for v in values:
        parse(v, 1.0)  # one-line error naming the flag
    return values


def context_for(path: Path, device: str = "cpu", data_root: str | None = None) -> Context:
    model, ckpt = load_model(path, device)
    splits = load_dataset(ckpt.meta["dataset_spec"], root=data_root)
    info = CheckpointInfo(ckpt.meta["run"], ckpt.meta["optimizer"], ckpt.meta["epoch"], ckpt.meta["step"],
                          path, file_hash(path), ckpt.meta)
    return Context(model=model, checkpoint=info, device=torch.device(device), splits=splits,
                   loss_fn=nll_loss(splits.task, splits.noise_sigma),
                   per_sample_loss=nll_loss(splits.task, splits.noise_sigma, reduction="none"))


def agree(a: dict, b: dict) -> bool:
    """Two estimates agree within AGREEMENT_SE combined standard errors plus AGREEMENT_SLACK of their size."""
    if not all(math.isfinite(v) for v in (a["llc_mean"], b["llc_mean"], a["llc_sem"], b["llc_sem"])):
        return False
    allowed = AGREEMENT_SE * math.hypot(a["llc_sem"], b["llc_sem"]) + AGREEMENT_SLACK * abs(b["llc_mean"])
    return abs(a["llc_mean"] - b["llc_mean"]) <= allowed


def calibrate(ctx: Context, lrs: list[str], localizations: list[str], nbetas: list[str], common: dict,
              progress: bool = True) -> pd.DataFrame:
    """One row per (lr, localization, nbeta); the largest step runs common's burn-in and draws, a step k times
    smaller k times as many (equal sampling time). Where no two steps agree at the weakest healthy localization,
    smaller steps are tried there before a stronger one is accepted (extend_downwards)."""
    n = len(ctx.splits.train)
    lambda_max = top_hessian_eigenvalue(ctx)
    rows, given_up_all = [], set()
    for nb in nbetas:
        steps = stable_steps(lrs, parse_nbeta(nb, n), lambda_max)
        grid = [(lr, loc) for loc in localizations for lr in steps]
        given_up: set[str] = set()
        for lr, loc in tqdm(grid, desc=f"calibration (nbeta {nb})", disable=not progress, file=sys.stderr):
            if loc in given_up:
                continue
            row = grid_point(ctx, lr, loc, nb, steps[0], common, len(rows), lambda_max)
            rows.append(row)
            if not row["healthy"]:
                # Unhealthy after the settling rerun, with a stable step: the chains roam at this localization
                # (they leave the basin or never settle), and smaller steps at the same sampling time would too.
                # The localization cannot be recommended, so its smaller steps are not run: on a large model they
                # cost the most (a 269,322-parameter MLP at gamma 1 and 10).
                given_up.add(loc)
                given_up_all.add(loc)
    table = with_recommendation(pd.DataFrame(rows), nbetas, localizations)
    table = extend_downwards(ctx, table, nbetas, localizations, common, lambda_max, progress)
    table.attrs["given_up"] = sorted(given_up_all)  # localizations whose smaller steps were not run
    return table


def grid_point(ctx: Context, lr: str, loc: str, nb: str, largest: str, common: dict, index: int,
               lambda_max: float) -> dict:
    """One calibration row: the llc estimator at (lr, loc, nb) for the sampling time of `largest`."""
    nbeta = parse_nbeta(nb, len(ctx.splits.train))
    stretch = parse_lr(largest, nbeta) / parse_lr(lr, nbeta)
    burnin = round(common["burnin"] * stretch)
    for attempt in range(2):
        # Each grid point gets its own chain seeds: with one seed for all, a single unlucky set of chains
        # (a chance |drift| > 3) repeated at every step and localization and disqualified them all at once,
        # and the agreement test assumes independent estimates.
        est = LLCEstimator(lr=lr, localization=loc, nbeta=nb, stability=False,
                           **{**common, "draws": round(common["draws"] * stretch), "burnin": burnin,
                              "seed": common.get("seed", 0) * 1009 + index + 7919 * attempt})
        r = est.run(ctx)["llc"].iloc[0].to_dict()
        r["lambda_max"] = lambda_max  # measured once for the whole grid
        r["step_curvature"] = r["lr_nbeta"] * lambda_max
        r["healthy"] = healthy(r)
        if r["healthy"] or not still_settling(r):
            break
        # Still settling, nothing else wrong: a large model's chains at a small step need longer to reach the
        # localized posterior (a 268,800-parameter deep linear net at 0.01/nbeta, gamma 1000: drifting after
        # 900 burn-in steps, settled after 3,000), so the point is run once more with SETTLE_BURNIN x the burn-in.
        burnin *= SETTLE_BURNIN
    return {"sampler": r["sampler"], "lr_option": lr, "localization_option": loc, "nbeta_option": nb,
            "lr": r["lr"], "localization": r["localization"], "nbeta": r["nbeta"],
            "lr_nbeta": r["lr_nbeta"], "lambda_max": r["lambda_max"], "step_curvature": r["step_curvature"],
            "n_draws": r["n_draws"], "n_burnin": r["n_burnin"],
            "batch_size": r["batch_size"], "llc_mean": r["llc_mean"], "llc_std": r["llc_std"],
            "llc_sem": r["llc_sem"], "drift": r["drift"], "rhat": r["rhat"], "ess": r["ess"],
            "diverged": r["diverged"], "left_basin": r["left_basin"],
            "not_at_minimum": r["not_at_minimum"], "healthy": r["healthy"], "llc_truth": r["llc_truth"],
            "init_loss": r["init_loss"], "mean_sampled_loss": r["mean_sampled_loss"]}


def still_settling(row: dict) -> bool:
    """Unhealthy only by |drift| or R-hat: the chains had not reached stationarity, nothing diverged or left."""
    return not row["healthy"] and healthy({**row, "drift": 0.0, "rhat": 1.0})


def with_recommendation(table: pd.DataFrame, nbetas: list[str], localizations: list[str]) -> pd.DataFrame:
    """The table with the plateau test (each row against the next larger step at its localization and nbeta)
    and the recommended row marked."""
    table = table.reset_index(drop=True)
    table["llc_at_larger_step"] = math.nan
    table["agrees_with_larger_step"] = False
    for _, group in table.groupby(["nbeta_option", "localization_option"], sort=False):
        ordered = group.sort_values("lr")
        for (i, row), (_, larger) in zip(ordered.iterrows(), list(ordered.iterrows())[1:]):
            table.loc[i, "llc_at_larger_step"] = larger["llc_mean"]
            table.loc[i, "agrees_with_larger_step"] = agree(row, larger) and bool(larger["healthy"])
    table["recommended"] = False
    best = recommend(table, nbetas, localizations)
    if best is not None:
        table.loc[best, "recommended"] = True
    return table


def extend_downwards(ctx: Context, table: pd.DataFrame, nbetas: list[str], localizations: list[str], common: dict,
                     lambda_max: float, progress: bool) -> pd.DataFrame:
    """At the weakest localization where every step is healthy, if no two neighbouring steps agree, the steps
    still carry a step-size bias: up to EXTRA_STEPS steps a factor 3 smaller are tried there (at equal sampling
    time) before a stronger localization is accepted, since a stronger one biases the LLC low (on a 784->10
    linear regression, gamma 1000 came out 13-22% low where a smaller step at gamma 100 was right)."""
    for nb in nbetas:
        at_nb = table[table.nbeta_option == nb]
        largest = at_nb.sort_values("lr").lr_option.iloc[-1]
        weakest = next((loc for loc in _weakest_first(at_nb, localizations)
                        if at_nb[at_nb.localization_option == loc].healthy.all()), None)
        for _ in range(EXTRA_STEPS if weakest is not None else 0):
            group = table[(table.nbeta_option == nb) & (table.localization_option == weakest)]
            if len(group) < 2 or group.agrees_with_larger_step.any() or not group.healthy.all():
                break  # a single step asked for is a query, not a plateau to extend
            lr = f"{group.lr_nbeta.min() / 3:.2g}/nbeta"
            if progress:
                print(f"calibration: no two steps agree at localization {weakest}; trying the smaller step {lr}",
                      file=sys.stderr)
            row = grid_point(ctx, lr, weakest, nb, largest, common, len(table), lambda_max)
            table = with_recommendation(pd.concat([table, pd.DataFrame([row])]), nbetas, localizations)
    return table


def _weakest_first(table: pd.DataFrame, localizations: list[str]) -> list[str]:
    return sorted(localizations, key=lambda t: table.loc[table.localization_option == t, "localization"].min())


def stable_steps(lrs: list[str], nbeta: float, lambda_max: float) -> list[str]:
    """The steps of `lrs` that are stable at this checkpoint (eps x nbeta x lambda_max < STABLE_STEP), largest
    first. Steps a factor 3 below the smallest are added until there are as many stable steps as were given: a
    stiff model's plateau lies below the default grid, and an unstable step is unhealthy whatever
    its chains show."""
    steps = sorted(lrs, key=lambda t: parse_lr(t, nbeta), reverse=True)
    if not math.isfinite(lambda_max):
        return steps
    stable = [t for t in steps if parse_lr(t, nbeta) * nbeta * lambda_max < STABLE_STEP]
    c = parse_lr(steps[-1], nbeta) * nbeta
    while len(stable) < len(steps):
        c /= 3
        if c * lambda_max < STABLE_STEP:
            stable.append(f"{c:.2g}/nbeta")
    return stable


def recommend(table: pd.DataFrame, nbetas: list[str], localizations: list[str]):
    """Index of the recommended row, or None (see the module docstring)."""
    for nb in nbetas:
        at_nb = table[table.nbeta_option == nb]
        for loc in _weakest_first(at_nb, localizations):
            group = at_nb[at_nb.localization_option == loc]
            if not group.healthy.all():
                continue
            agreeing = group[group.agrees_with_larger_step].sort_values("lr", ascending=False)
            if len(agreeing):
                return agreeing.index[0]
    return None


def plateau_text(table: pd.DataFrame) -> str:
    """LLC +- s.e. for each localization (rows) and step (columns): the plateau at a glance."""
    cells = table.assign(cell=[
        f"{r.llc_mean:.4g} ± {r.llc_sem:.2g}" + ("" if r.healthy else " ✗") + (" ◀" if r.recommended else "")
        for r in table.itertuples()])
    grid = cells.pivot_table(index=["nbeta_option", "localization_option"], columns="lr_option", values="cell",
                             aggfunc="first", sort=False)
    order = table.drop_duplicates("lr_option").sort_values("lr", ascending=False).lr_option
    return grid[[c for c in order if c in grid]].to_string()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="analyze calibrate", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint file (epoch-NNNN.safetensors)")
    ap.add_argument("--lr", default=",".join(DEFAULT_GRID["lr"]),
                    help="SGLD step sizes, comma-separated: numbers or 'c/nbeta' (default: %(default)s)")
    ap.add_argument("--localization", default=",".join(DEFAULT_GRID["localization"]),
                    help="localizations gamma: numbers or 'c*nbeta' (default: %(default)s)")
    ap.add_argument("--nbeta", default="n/log n", help="nbeta values separated by ';' (default: %(default)s)")
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
        LLCEstimator(**common)  # option errors before loading anything
        if not path.is_file():
            raise CheckpointError(path, "no such checkpoint file")
        ctx = context_for(path, args.device, args.data_root)
        table = calibrate(ctx, lrs, locs, nbetas, common)
    except (EstimatorError, CheckpointError, DataError) as e:
        print(f"analyze calibrate: error: {e}", file=sys.stderr)
        return 2
    # Written as one task of the analysis store (same checkpoint hash, keys and completion marker as the
    # estimators' tables), so analyze.load() and the report see it and it joins the other tables.
    info = ctx.checkpoint
    config = {"grid": [lrs, locs, nbetas], **common}
    keys = {"run": info.run, "optimizer": info.optimizer, "epoch": info.epoch, "step": info.step,
            "ckpt_hash": info.hash, "config_hash": config_hash(config)}
    store = Store(Path(args.out) if args.out else path.resolve().parent.parent / "analysis")
    key = task_key(info.hash, "calibration", config)
    store.reopen(key)
    store.write_parts(key, keys, {"calibration": table})
    store.finish(key, {"estimator": "calibration", "checkpoint": str(path), "config": config})
    out = store.root

    print("LLC +- standard error at equal sampling time (rows: localization; columns: step; ✗ not healthy, "
          "◀ recommended)")
    print(plateau_text(table))
    shown = table[["lr_option", "localization_option", "nbeta", "n_draws", "llc_mean", "llc_sem", "drift", "rhat",
                   "step_curvature", "diverged", "left_basin", "not_at_minimum", "healthy", "agrees_with_larger_step",
                   "recommended"]]
    print("\n" + shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    lambda_max = table.lambda_max.iloc[0]
    print(f"lambda_max of the Hessian at the checkpoint: {lambda_max:.4g}; step_curvature = eps x nbeta x lambda_max "
          f"must stay below {STABLE_STEP:g} (the stiffest direction's stability)")
    unstable = [t for t in lrs if t not in set(table.lr_option)]
    if unstable:
        print(f"not run, unstable at this checkpoint: {', '.join(unstable)}; smaller steps replace them" if any(t not in lrs for t in table.lr_option) else
              f"not run, unstable at this checkpoint: {', '.join(unstable)}")
    cut_short = table.attrs.get("given_up", [])
    if cut_short:
        print(f"smaller steps not run at localization {', '.join(cut_short)}: a larger step's chains there were "
              "unhealthy even with 3x the burn-in")
    rec = table[table.recommended]
    if len(rec):
        r = rec.iloc[0]
        sampler = "" if r.sampler == "sgld" else f" --llc-sampler {r.sampler}"
        print(f"\nrecommended:{sampler} --llc-lr {r.lr_option} --llc-localization {r.localization_option} "
              f"--llc-nbeta '{r.nbeta_option}'   (LLC {r.llc_mean:.3g} +- {r.llc_sem:.2g}; "
              f"at the next larger step: {r.llc_at_larger_step:.3g})")
    elif table.not_at_minimum.all():
        print(f"\nno setting qualifies: {path} is not at a local minimum (every setting found lower loss than the "
              f"checkpoint, LLC < 0 by > {NOT_AT_MINIMUM_SE:g} standard errors), so its LLC is not defined; calibrate on "
              "a trained checkpoint")
    else:
        print(f"\nno setting qualifies: at no localization are all steps healthy (no divergence, in the basin, R-hat < "
              f"{RHAT_MAX}, |drift| <= {DRIFT_MAX:g}, step_curvature < {STABLE_STEP:g}) with a step that agrees with the "
              "next larger one; try smaller steps, longer chains (--draws, --burnin), or other localizations")
    print(f"calibration table: {out / 'calibration'}")
    return 0
