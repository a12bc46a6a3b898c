#!/usr/bin/env python
"""Reproduce the NGD-vs-SGD learning-coefficient study on Fashion-MNIST (needs the data locally).

The study's configuration: a 2 x 256 ReLU MLP, SGD (lr 1e-3, momentum 0.9, Nesterov, batch 128) to
epoch 30, then an SGD branch and an NGD branch (alpha 0.1, eta 0.9, epsilon 1e-10, delta 5e-4) to
epoch 80; LLC by SGLD with 2 chains x 1000 draws at every checkpoint.

The study's qualitative result: after the swap, NGD's LLC lies above SGD's (NGD converges to more
complex minima). This script trains the study, calibrates the SGLD step on the cut-off checkpoint
(the study's own eps 1e-4 / gamma 100 sent chains to chance-level loss on this model, see
docs and README), estimates the LLC of every checkpoint, and reports, with the chain diagnostics,
whether this run reproduces the claim.

Usage: python scripts/reproduce_ngd_sgd.py --data-root ~/data [--out ngd-sgd-fashion] [--workers 2]
(Fashion-MNIST in torchvision's layout: DATA_ROOT/FashionMNIST/raw/train-images-idx3-ubyte, ...)
`--dataset digits --num-epochs 6 --cut-off-epochs 3 --hidden-nodes 16` runs the same pipeline small.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

# The study's own args file (its format: [hyperparameters, data args, sampler args]).
STUDY_ARGS = json.loads((Path(__file__).parent / "args_ngd_sgd.json").read_text())


def run(cmd: list[str]) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def bin_path(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def healthy(llc: pd.DataFrame) -> pd.Series:
    """Chains that diverged, left the basin, disagree (R-hat) or were still settling (drift) give no estimate."""
    return ~llc.left_basin & ~llc.diverged & (llc.rhat < 1.1) & ~(llc.drift.abs() > 3)


def verdict(llc: pd.DataFrame, runs: list[str], cut_off: int) -> tuple[str, pd.DataFrame]:
    """Compare NGD's and SGD's branch LLC on the epochs both have after the cut-off."""
    sgd, ngd = (llc[llc.run == r].set_index("epoch") for r in runs)
    epochs = sorted(set(sgd.index) & set(ngd.index))
    epochs = [e for e in epochs if e > cut_off]
    both = pd.DataFrame({"sgd_llc": sgd.llc_mean.reindex(epochs), "sgd_sem": sgd.llc_sem.reindex(epochs),
                         "ngd_llc": ngd.llc_mean.reindex(epochs), "ngd_sem": ngd.llc_sem.reindex(epochs),
                         "sgd_ok": healthy(sgd).reindex(epochs), "ngd_ok": healthy(ngd).reindex(epochs)})
    healthy = both[both.sgd_ok & both.ngd_ok]
    if len(healthy) < max(3, len(both) // 2):
        return (f"INCONCLUSIVE: only {len(healthy)} of {len(both)} post-swap epochs have healthy chains on both "
                "branches (R-hat < 1.1, |drift| <= 3, no divergence, none left the basin)"), both
    diff = healthy.ngd_llc - healthy.sgd_llc
    sem = (healthy.ngd_sem ** 2 + healthy.sgd_sem ** 2) ** 0.5
    above = (diff > 2 * sem).mean()
    below = (diff < -2 * sem).mean()
    summary = (f"over {len(healthy)} healthy post-swap epochs: NGD's LLC is above SGD's by more than 2 standard "
               f"errors at {above:.0%} of them and below at {below:.0%}; mean difference {diff.mean():+.3g}")
    if above >= 0.5 and diff.mean() > 0:
        return "REPRODUCED: " + summary, both
    if below >= 0.5 and diff.mean() < 0:
        return "CONTRADICTED: " + summary, both
    return "NOT REPRODUCED (no consistent difference): " + summary, both


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="data", help="folder with FashionMNIST/raw/ (default: %(default)s)")
    ap.add_argument("--out", default="ngd-sgd-fashion", help="output folder (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=None, help="dask workers for analyze (default: cores)")
    ap.add_argument("--device", default="cpu", help="torch device for training and analysis")
    ap.add_argument("--dataset", default=None, help="override the study's dataset (e.g. digits for a smoke run)")
    ap.add_argument("--num-epochs", type=int, help="override num_epochs (smoke runs)")
    ap.add_argument("--cut-off-epochs", type=int, help="override cut_off_epochs (smoke runs)")
    ap.add_argument("--hidden-nodes", type=int, help="override the hidden width (smoke runs)")
    ap.add_argument("--calibration-draws", type=int, default=300,
                    help="draws (and burn-in) per calibration run at the largest step; scaled up for smaller steps")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    study = json.loads(json.dumps(STUDY_ARGS))
    if args.dataset:
        study[1]["dataset"] = args.dataset
    for key, value in (("num_epochs", args.num_epochs), ("cut_off_epochs", args.cut_off_epochs)):
        if value is not None:
            study[0][key] = value
    if args.hidden_nodes:
        study[0]["hidden_nodes"] = [args.hidden_nodes]
    (out / "args_ngd_sgd.json").write_text(json.dumps(study, indent=2))
    hp, sampler = study[0], study[2]
    ckpts = out / "ckpts"
    train = [bin_path("train-ckpts"), "--config", str(out / "args_ngd_sgd.json"), "--data-root", args.data_root,
             "--out", str(ckpts), "--device", args.device, "--quiet"]
    if ckpts.exists():
        train.append("--resume")
    if run(train) != 0:
        return 1

    family = f"ffnn-{hp['hidden_layers'][0]}x{hp['hidden_nodes'][0]}"
    cut = hp["cut_off_epochs"]
    cut_ckpt = ckpts / f"{family}-trunk" / f"epoch-{cut:04d}.safetensors"
    analysis = ckpts / "analysis"
    run([bin_path("analyze"), "calibrate", str(cut_ckpt), "--draws", str(args.calibration_draws),
         "--burnin", str(args.calibration_draws), "--out", str(analysis), "--device", args.device])
    import analyze

    calibration = analyze.load(str(analysis)).get("calibration", pd.DataFrame(columns=["run", "epoch", "recommended"]))
    chosen = calibration[calibration.recommended & (calibration.run == f"{family}-trunk") & (calibration.epoch == cut)]
    from analyze.estimators.llc import DEFAULTS

    if len(chosen):
        lr, loc = str(chosen.lr_option.iloc[0]), str(chosen.localization_option.iloc[0])
        why = "the calibration's recommendation"
    else:
        lr, loc = DEFAULTS["lr"], DEFAULTS["localization"]
        why = "no calibrated setting qualified: the validated defaults (docs/llc-validation.md)"
    print(f"LLC settings: eps {lr}, gamma {loc}, nbeta n/log n ({why}), the estimator's validated chains, draws and "
          f"burn-in; the study used eps {sampler['sampler_lr']:g}, gamma {sampler['localization']:g}, "
          f"{sampler['num_chains']} x {sampler['num_draws']} draws")
    cmd = [bin_path("analyze"), str(ckpts), "--estimators", "evaluate,llc", "--llc-lr", lr, "--llc-localization", loc,
           "--device", args.device]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    status = run(cmd)

    llc = analyze.load(str(analysis))["llc"]
    llc = llc[(llc.lr_option == lr) & (llc.localization_option == loc)]
    text, table = verdict(llc, [f"{family}-swap-sgd", f"{family}-swap-ngd"], cut)
    print("\nstudy's claim: after the swap, NGD's LLC lies above SGD's.")
    print(table.to_string(float_format=lambda v: f"{v:.3g}"))
    print("\n" + text)
    (out / "verdict.txt").write_text(text + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
