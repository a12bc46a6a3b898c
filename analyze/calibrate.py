"""`analyze calibrate CKPT`: short SGLD chains over a grid of (step, localization, nbeta), with a
recommendation.

For every grid point the chains also run at a 3x smaller step. A setting is *healthy* when no chain
diverged or left the basin, the chains did not find loss clearly below the checkpoint's (it would not
be a local minimum: `not_at_minimum`) and R-hat < 1.1 (the chains plateau and agree). The
recommendation is the largest healthy step whose LLC agrees within 10% with the estimate at a 3x
smaller step (SGLD's step-size bias is large even when chains plateau), preferring the weakest
localization at that step (strong localization biases the estimate low) and the nbeta given first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from analyze.estimators.base import CheckpointInfo, Context, EstimatorError
from analyze.estimators.llc import DEFAULTS, LLCEstimator, parse_nbeta
from analyze.llc_stats import NOT_AT_MINIMUM_SE
from analyze.sgld import SAMPLERS
from analyze.store import Store, config_hash, file_hash, task_key
from trainer.checkpoints import CheckpointError, load_model
from trainer.data import DataError, load_dataset
from trainer.losses import nll_loss

RHAT_MAX = 1.1
AGREEMENT = 0.10
STEP_RATIO = 3.0


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EstimatorError(f"{flag}: {text!r} is not a comma-separated list of numbers") from None
    if not values or any(v < 0 for v in values):
        raise EstimatorError(f"{flag}: give one or more non-negative numbers")
    return values


def context_for(path: Path, device: str = "cpu", data_root: str | None = None) -> Context:
    model, ckpt = load_model(path, device)
    splits = load_dataset(ckpt.meta["dataset_spec"], root=data_root)
    info = CheckpointInfo(ckpt.meta["run"], ckpt.meta["optimizer"], ckpt.meta["epoch"], ckpt.meta["step"],
                          path, file_hash(path), ckpt.meta)
    return Context(model=model, checkpoint=info, device=torch.device(device), splits=splits,
                   loss_fn=nll_loss(splits.task, splits.noise_sigma),
                   per_sample_loss=nll_loss(splits.task, splits.noise_sigma, reduction="none"))


def healthy(row) -> bool:
    return bool(not row["diverged"] and not row["left_basin"] and not row["not_at_minimum"]
                and row["rhat"] < RHAT_MAX)


def calibrate(ctx: Context, lrs: list[float], localizations: list[float], nbetas: list[str],
              common: dict, progress: bool = True) -> pd.DataFrame:
    """One row per (lr, localization, nbeta) of the grid, with the 3x-smaller-step comparison."""
    grid = [(lr, loc, nb) for nb in nbetas for loc in localizations for lr in sorted(lrs)]
    runs: dict[tuple, dict] = {}
    needed = sorted({(lr / STEP_RATIO, loc, nb) for lr, loc, nb in grid} | set(grid), key=str)
    for lr, loc, nb in tqdm(needed, desc="calibration runs", disable=not progress, file=sys.stderr):
        est = LLCEstimator(lr=lr, localization=loc, nbeta=nb, **common)
        runs[(lr, loc, nb)] = est.run(ctx)["llc"].iloc[0].to_dict()
    rows = []
    for lr, loc, nb in grid:
        r, small = runs[(lr, loc, nb)], runs[(lr / STEP_RATIO, loc, nb)]
        ref = small["llc_mean"]
        agrees = bool(pd.notna(ref) and pd.notna(r["llc_mean"]) and ref != 0
                      and abs(r["llc_mean"] - ref) <= AGREEMENT * abs(ref))
        rows.append({"sampler": r["sampler"], "lr": lr, "localization": loc, "nbeta_option": nb, "nbeta": r["nbeta"],
                     "llc_mean": r["llc_mean"], "llc_std": r["llc_std"], "llc_sem": r["llc_sem"],
                     "rhat": r["rhat"], "ess": r["ess"], "diverged": r["diverged"], "left_basin": r["left_basin"],
                     "not_at_minimum": r["not_at_minimum"],
                     "healthy": healthy(r), "llc_at_third_step": ref, "agrees_with_third_step": agrees,
                     "init_loss": r["init_loss"], "mean_sampled_loss": r["mean_sampled_loss"]})
    table = pd.DataFrame(rows)
    table["recommended"] = False
    ok = table[table.healthy & table.agrees_with_third_step]
    if len(ok):
        order = {nb: i for i, nb in enumerate(nbetas)}
        best = ok.assign(_nb=ok.nbeta_option.map(order)).sort_values(
            ["lr", "localization", "_nb"], ascending=[False, True, True]).index[0]
        table.loc[best, "recommended"] = True
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="analyze calibrate", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint file (epoch-NNNN.safetensors)")
    ap.add_argument("--lr", default="1e-5,3e-5,1e-4,3e-4", help="SGLD step sizes, comma-separated (default: %(default)s)")
    ap.add_argument("--localization", default="10,100,1000", help="localizations gamma (default: %(default)s)")
    ap.add_argument("--nbeta", default="n/log n", help="nbeta values separated by ';' (default: %(default)s)")
    ap.add_argument("--chains", type=int, default=DEFAULTS["chains"], help="chains per run (default: %(default)s)")
    ap.add_argument("--draws", type=int, default=DEFAULTS["draws"], help="kept draws per chain (default: %(default)s)")
    ap.add_argument("--burnin", type=int, default=DEFAULTS["burnin"], help="burn-in steps (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="SGLD minibatch (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="chain seed (default: %(default)s)")
    ap.add_argument("--sampler", default="sgld", choices=SAMPLERS,
                    help="SGLD or RMSProp-preconditioned SGLD (default: %(default)s)")
    ap.add_argument("--out", help="analysis folder for the `calibration` table (default: <ckpt dir>/../analysis)")
    ap.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    ap.add_argument("--data-root", help="override the dataset folder stored in the checkpoint")
    args = ap.parse_args(argv)
    path = Path(args.checkpoint)
    try:
        lrs = _floats(args.lr, "--lr")
        locs = _floats(args.localization, "--localization")
        nbetas = [v.strip() for v in args.nbeta.split(";") if v.strip()]
        for nb in nbetas:
            parse_nbeta(nb, 100)
        if not path.is_file():
            raise CheckpointError(path, "no such checkpoint file")
        ctx = context_for(path, args.device, args.data_root)
        common = dict(chains=args.chains, draws=args.draws, burnin=args.burnin, batch_size=args.batch_size,
                      seed=args.seed, sampler=args.sampler)
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

    shown = table[["lr", "localization", "nbeta", "llc_mean", "llc_sem", "llc_at_third_step", "rhat", "diverged",
                   "left_basin", "not_at_minimum", "healthy", "agrees_with_third_step", "recommended"]]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    rec = table[table.recommended]
    if len(rec):
        r = rec.iloc[0]
        sampler = "" if r.sampler == "sgld" else f" --llc-sampler {r.sampler}"
        print(f"\nrecommended:{sampler} --llc-lr {r.lr:g} --llc-localization {r.localization:g} "
              f"--llc-nbeta '{r.nbeta_option}'   "
              f"(LLC {r.llc_mean:.3g} +- {r.llc_sem:.2g}; at lr/3: {r.llc_at_third_step:.3g})")
    elif table.not_at_minimum.all():
        print(f"\nno setting qualifies: {path} is not at a local minimum (every setting found lower loss than the "
              f"checkpoint, LLC < 0 by > {NOT_AT_MINIMUM_SE:g} standard errors), so its LLC is not defined; calibrate on "
              "a trained checkpoint")
    else:
        print("\nno setting qualifies: none plateaus in the basin with R-hat < 1.1 and agrees within 10% with a 3x "
              "smaller step; try smaller steps, more draws or burn-in, or other localizations")
    print(f"calibration table: {out / 'calibration'}")
    return 0
