#!/usr/bin/env python
"""Reproduce the HSIC information-plane study at its real scale, on Fashion-MNIST.

The seed notebook (PyGlow's "Analysing training dynamics using HSIC criterion") trains, on MNIST, a conv
16 3x3 'same' + ReLU, Flatten, Dropout 0.4, Dense 500 ReLU, Dropout 0.4, Dense 200 ReLU, Dropout 0.2,
Dense 10 network with SGD (PyGlow's compile() defaults: lr 0.001, momentum 0.95, no Nesterov), batches of
64, 2 epochs, validation split 0.2 (750 steps per epoch), and tracks per layer the HSIC coordinates
(HSIC(X, T), HSIC(T, Y)) with a Gaussian kernel of sigma 5, Y = the softmax output. This machine has no
offline MNIST, so the default dataset is Fashion-MNIST (same shape: 28x28 grey images, 10 classes,
60,000 + 10,000), from Debian's `dataset-fashion-mnist` package or --data-root; with MNIST's IDX files
in DIR/MNIST/raw/, `--dataset mnist --data-root DIR` runs the notebook's own data. Stages, each timed:

1. training: train-ckpts, one checkpoint every --ckpt-every-steps optimizer steps (plus the initial
   weights and each epoch's end); resumed when the output folder exists;
2. analysis: `analyze --estimators evaluate,hsic --hsic-preset pyglow` over every checkpoint (the
   notebook's statistic tr(KHLH)/(m-1), sigma 5, Y = softmax output, batches of 64 averaged) on a fixed
   probe set of --hsic-split, in eval mode; plus full-split loss and accuracy;
3. the per-layer (HSIC(X,T), HSIC(T,Y)) paths printed; with --doc, the page and its figure (one
   information-plane panel per distinct layer output, points coloured by step; all layers together; and
   accuracy against step).

Usage: python scripts/reproduce_hsic_plane.py [--out hsic-plane-fashion] [--doc docs/hsic-plane.md]
Smoke run (well under a minute; digits needs no dataset package):
       python scripts/reproduce_hsic_plane.py --smoke --dataset digits --workers 0 --out /tmp/hsic-smoke \\
           --doc /tmp/hsic-smoke/page.md
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import _stages  # noqa: E402  (scripts/, the script's own folder)
from _hsic_plane import (DATASETS, LAYERS, PROG, RUN, SMOKE, STUDY, figure, group_label,  # noqa: E402
                         layer_groups, write_doc)
from _stages import past_timings, stage  # noqa: E402


class Parser(argparse.ArgumentParser):
    def error(self, message):  # bad input: one line, exit status 2
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def run(cmd: list[str]) -> None:
    _stages.run(cmd, PROG)


def bin_path(name: str) -> str:
    return _stages.bin_path(name, PROG)


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a non-negative integer")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def momentum_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must lie in [0, 1)")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    ap = Parser(prog="reproduce_hsic_plane.py", description=__doc__.split("\n\n")[0],
                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", metavar="DIR", default="hsic-plane-fashion",
                    help="output folder: OUT/ckpts (checkpoints), OUT/ckpts/analysis (tables) (default: %(default)s)")
    ap.add_argument("--doc", metavar="PATH",
                    help="write the results page here (e.g. docs/hsic-plane.md), its PNG figure next to it")
    ap.add_argument("--dataset", choices=sorted(DATASETS), default=STUDY["dataset"],
                    help="fashion-mnist (the study's stand-in for MNIST), mnist (needs --data-root with "
                         "MNIST/raw/), or digits (8x8, for smoke runs) (default: %(default)s)")
    ap.add_argument("--data-root", metavar="DIR",
                    help="dataset folder in torchvision's layout (default: Debian's dataset-fashion-mnist package "
                         "for fashion-mnist)")
    ap.add_argument("--device", metavar="DEVICE", default="cpu",
                    help="torch device for training and analysis (default: %(default)s)")
    ap.add_argument("--workers", metavar="N", type=nonnegative_int, default=None,
                    help="dask workers for analyze; 0 runs its tasks in one process (default: analyze's, the cores)")
    ap.add_argument("--seed", metavar="N", type=int, default=STUDY["seed"],
                    help="seed of the weights and batch order (default: %(default)s)")
    g = ap.add_argument_group("study settings (defaults: the notebook's; override for smoke runs)")
    g.add_argument("--epochs", metavar="N", type=positive_int, default=None,
                   help=f"training epochs (default: {STUDY['epochs']}; --smoke: {SMOKE['epochs']})")
    g.add_argument("--ckpt-every-steps", metavar="K", type=nonnegative_int, default=None,
                   help="checkpoint every K optimizer steps, 0 = epoch ends only (default: "
                        f"{STUDY['ckpt_every_steps']}: 17 checkpoints over the study's 1,500 steps; --smoke: "
                        f"{SMOKE['ckpt_every_steps']})")
    g.add_argument("--train-samples", metavar="N", type=nonnegative_int, default=None,
                   help=f"train on the first N training images only, 0 = all (default: 0; --smoke: "
                        f"{SMOKE['train_samples']})")
    g.add_argument("--batch-size", metavar="N", type=positive_int, default=STUDY["batch_size"],
                   help="minibatch size (default: %(default)s)")
    g.add_argument("--lr", metavar="LR", type=positive_float, default=STUDY["lr"],
                   help="SGD learning rate (default: %(default)s, PyGlow's compile() default)")
    g.add_argument("--momentum", metavar="M", type=momentum_value, default=STUDY["momentum"],
                   help="SGD momentum, no Nesterov (default: %(default)s, PyGlow's compile() default)")
    g.add_argument("--val-fraction", metavar="F", type=float, default=STUDY["val_fraction"],
                   help="share of the training pool held out for validation (default: %(default)s, the "
                        "notebook's validation_split)")
    g.add_argument("--hsic-probe", metavar="M", type=positive_int, default=STUDY["hsic_probe"],
                   help="HSIC probe-set size, used in batches of 64 (default: %(default)s)")
    g.add_argument("--hsic-split", choices=("train", "val", "test"), default=STUDY["hsic_split"],
                   help="split the probe set is drawn from; the notebook used training batches (default: "
                        "%(default)s)")
    g.add_argument("--smoke", action="store_true",
                   help="a quick run: --train-samples {train_samples} --epochs {epochs} --ckpt-every-steps "
                        "{ckpt_every_steps} unless given".format(**SMOKE))
    args = ap.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        ap.error(f"--val-fraction: {args.val_fraction} must lie in (0, 1)")
    if args.hsic_probe < 4:
        ap.error("--hsic-probe: must be at least 4")
    if args.dataset == "mnist" and not args.data_root:
        ap.error("--dataset mnist needs --data-root DIR with MNIST's IDX files in DIR/MNIST/raw/")
    for key, study in (("epochs", STUDY["epochs"]), ("ckpt_every_steps", STUDY["ckpt_every_steps"]),
                       ("train_samples", 0)):
        if getattr(args, key) is None:
            setattr(args, key, SMOKE[key] if args.smoke else study)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    doc = _stages.doc_path(args.doc, PROG)
    out = Path(args.out)
    ckpts, analysis = out / "ckpts", out / "ckpts" / "analysis"
    data = ["--data-root", args.data_root] if args.data_root else []
    timings: dict[str, float] = {}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"{PROG}: cannot create {out}: {e.strerror or e}") from None

    log = out / "timings.json"
    resumed = (ckpts / RUN / "run.json").exists()
    with stage("training", timings, log):
        run([bin_path("train-ckpts"), "--dataset", args.dataset, *data, "--val-fraction", f"{args.val_fraction:g}",
             "--train-samples", str(args.train_samples), "--batch-size", str(args.batch_size),
             "--model-type", "layers", "--layers", *LAYERS, "--experiment-type", "standard", "--optimizer", "sgd",
             "--num-epochs", str(args.epochs), "--ckpt-every-steps", str(args.ckpt_every_steps),
             "--sgd-lr", f"{args.lr:g}", "--momentum", f"{args.momentum:g}", "--no-nesterov",
             "--seed", str(args.seed), "--device", args.device, "--out", str(ckpts), "--quiet"]
            + (["--resume"] if resumed else []))
    with stage("analysis: evaluate + hsic (pyglow preset), every checkpoint", timings, log):
        run([bin_path("analyze"), str(ckpts), "--estimators", "evaluate,hsic", "--hsic-preset", "pyglow",
             "--hsic-split", args.hsic_split, "--hsic-probe", str(args.hsic_probe), "--runs", RUN, "--no-report",
             *data, "--device", args.device] + (["--workers", str(args.workers)] if args.workers is not None else []))

    start = time.perf_counter()
    hsic, accuracy = read_tables(analysis, args)
    groups = layer_groups(hsic)
    print_paths(hsic, groups)
    if doc:
        png = doc.with_suffix(".png")
        figure(hsic, accuracy, groups, args, png)
        timings["figure and page"] = time.perf_counter() - start
        write_doc(doc, png, hsic, accuracy, groups, args, timings, past_timings(log), resumed, argv)
    print("\ntimings: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
          + f"; total {sum(timings.values()) / 60:.1f} min")
    return 0


# ------------------------------------------------------------------------------------------ tables
def read_tables(analysis: Path, args) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The hsic rows of this script's estimator settings, and accuracy per step (one column per split)."""
    import analyze
    from analyze.estimators.hsic import HSICEstimator
    from analyze.store import config_hash

    tables = analyze.load(str(analysis))
    if "hsic" not in tables or "evaluate" not in tables:
        raise SystemExit(f"{PROG}: {analysis} has no hsic or evaluate table; did the analysis run?")
    wanted = config_hash(HSICEstimator(preset="pyglow", split=args.hsic_split, probe=args.hsic_probe).config())
    hsic = tables["hsic"]
    hsic = hsic[(hsic.run == RUN) & (hsic.config_hash == wanted)]
    if hsic.empty:
        raise SystemExit(f"{PROG}: no hsic rows of run {RUN} at these settings in {analysis}")
    hsic = hsic.drop_duplicates(["epoch", "step", "layer"], keep="last").sort_values(["step", "layer"])
    ev = tables["evaluate"]
    ev = ev[ev.run == RUN].drop_duplicates(["epoch", "step", "split"], keep="last")
    accuracy = ev.pivot_table(index="step", columns="split", values="accuracy").sort_index()
    return hsic.reset_index(drop=True), accuracy


def print_paths(hsic: pd.DataFrame, groups: list[list[str]]) -> None:
    print("\nHSIC information plane per layer (pyglow statistic; Flatten/Dropout rows equal the layer before them "
          "in eval mode)")
    for group in groups:
        path = hsic[hsic.layer_name == group[0]][["epoch", "step", "hsic_x", "hsic_y"]]
        print(f"\n{group_label(group)}")
        print(path.rename(columns={"hsic_x": "HSIC(X,T)", "hsic_y": "HSIC(T,Y)"}).to_string(
            index=False, float_format=lambda v: f"{v:.6g}"))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        raise SystemExit(f"{PROG}: interrupted; rerun to resume") from None
