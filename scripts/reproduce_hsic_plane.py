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
import os
import shlex
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import _stages  # noqa: E402  (scripts/, the script's own folder)
from _stages import past_timings, stage  # noqa: E402

PROG = "reproduce_hsic_plane"
# The notebook's network, in the trainer's layer-list syntax. PyGlow's last layer is Dense(10, softmax)
# followed by nn.CrossEntropyLoss (a second softmax); the trainer's last layer outputs logits instead.
LAYERS = ["conv2d:16:3:1:1:relu", "flatten", "dropout:0.4", "dense:500:relu", "dropout:0.4", "dense:200:relu",
          "dropout:0.2", "dense:10"]
STUDY = {"dataset": "fashion-mnist", "batch_size": 64, "epochs": 2, "lr": 0.001, "momentum": 0.95,
         "val_fraction": 0.2, "ckpt_every_steps": 100, "hsic_probe": 1000, "hsic_split": "train", "seed": 1}
SMOKE = {"train_samples": 1000, "epochs": 1, "ckpt_every_steps": 4}
RUN = "layers-sgd"  # train-ckpts names the run <model>-<optimizer>
DATASETS = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "digits": "scikit-learn's 8x8 digits"}


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


def overrides(args) -> list[str]:
    """The settings that differ from the study's (a reduced run says so on its page)."""
    study = {**STUDY, "train_samples": 0}
    return [f"{k.replace('_', '-')} {getattr(args, k)}" for k in ("dataset", "train_samples", "epochs", "batch_size",
                                                                   "lr", "momentum", "val_fraction")
            if getattr(args, k) != study[k]]


def main(argv=None) -> int:
    args = parse_args(argv)
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
    if args.doc:
        doc = Path(args.doc)
        try:
            doc.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"{PROG}: cannot create {doc.parent}: {e.strerror or e}") from None
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


def layer_groups(hsic: pd.DataFrame) -> list[list[str]]:
    """Consecutive layers whose coordinates are identical at every checkpoint (Flatten and eval-mode Dropout
    pass their input on unchanged) form one group: one distinct representation."""
    order = hsic.drop_duplicates("layer").sort_values("layer").layer_name.tolist()
    paths = {name: hsic[hsic.layer_name == name].set_index("step")[["hsic_x", "hsic_y"]] for name in order}
    groups: list[list[str]] = []
    for name in order:
        if groups and paths[groups[-1][-1]].equals(paths[name]):
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def group_label(group: list[str]) -> str:
    return group[0] + (f" (= {', '.join(group[1:])})" if len(group) > 1 else "")


def print_paths(hsic: pd.DataFrame, groups: list[list[str]]) -> None:
    print("\nHSIC information plane per layer (pyglow statistic; Flatten/Dropout rows equal the layer before them "
          "in eval mode)")
    for group in groups:
        path = hsic[hsic.layer_name == group[0]][["epoch", "step", "hsic_x", "hsic_y"]]
        print(f"\n{group_label(group)}")
        print(path.rename(columns={"hsic_x": "HSIC(X,T)", "hsic_y": "HSIC(T,Y)"}).to_string(
            index=False, float_format=lambda v: f"{v:.6g}"))


def endpoints(hsic: pd.DataFrame, groups: list[list[str]]) -> pd.DataFrame:
    rows = []
    for group in groups:
        path = hsic[hsic.layer_name == group[0]].sort_values("step")
        first, last = path.iloc[0], path.iloc[-1]
        rows.append({"layer": group_label(group), "start HSIC(X,T)": first.hsic_x, "start HSIC(T,Y)": first.hsic_y,
                     "end HSIC(X,T)": last.hsic_x, "end HSIC(T,Y)": last.hsic_y,
                     "end / start HSIC(T,Y)": last.hsic_y / first.hsic_y if first.hsic_y else float("nan")})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ figure
def figure(hsic: pd.DataFrame, accuracy: pd.DataFrame, groups: list[list[str]], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    panels = len(groups) + 2  # one per distinct layer, all layers together, accuracy
    cols = 3
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.4 * rows), squeeze=False, layout="constrained")
    axes = axes.ravel()
    steps = hsic.step.unique()
    norm = Normalize(vmin=steps.min(), vmax=max(steps.max(), steps.min() + 1))
    cmap = plt.get_cmap("viridis")
    scatter = None
    for ax, group in zip(axes, groups):
        p = hsic[hsic.layer_name == group[0]].sort_values("step")
        ax.plot(p.hsic_x, p.hsic_y, color="0.6", lw=0.8, zorder=1)
        scatter = ax.scatter(p.hsic_x, p.hsic_y, c=p.step, cmap=cmap, norm=norm, s=28, zorder=2)
        _start_end(ax, p.hsic_x.to_numpy(), p.hsic_y.to_numpy())
        ax.set_title(group_label(group), fontsize=10)
        ax.set_xlabel("HSIC(X, T)  (complexity)")
        ax.set_ylabel("HSIC(T, Y)  (generalization)")
        ax.ticklabel_format(style="sci", scilimits=(-3, 3), useOffset=False)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    ax = axes[len(groups)]
    colors = plt.get_cmap("tab10")
    positive = (hsic.hsic_x > 0).all() and (hsic.hsic_y > 0).all()
    for i, group in enumerate(groups):
        p = hsic[hsic.layer_name == group[0]].sort_values("step")
        ax.plot(p.hsic_x, p.hsic_y, "-o", ms=3, lw=1, color=colors(i), label=group[0])
        ax.plot(p.hsic_x.iloc[0], p.hsic_y.iloc[0], "o", ms=9, mfc="none", mec=colors(i))
        ax.plot(p.hsic_x.iloc[-1], p.hsic_y.iloc[-1], "*", ms=12, color=colors(i))
    if positive:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_title("all layers (circle: start, star: end)" + (", log-log" if positive else ""), fontsize=10)
    ax.set_xlabel("HSIC(X, T)")
    ax.set_ylabel("HSIC(T, Y)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax = axes[len(groups) + 1]
    for split, style in (("train", ":"), ("val", "--"), ("test", "-")):
        if split in accuracy:
            ax.plot(accuracy.index, accuracy[split], style, marker="o", ms=3, label=f"{split} accuracy")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("accuracy (full split, eval mode)")
    ax.set_title("accuracy against step", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for ax in axes[panels:]:
        ax.axis("off")
    if scatter is not None:
        fig.colorbar(scatter, ax=axes[:len(groups)].tolist(), label="optimizer step", shrink=0.9, pad=0.01)
    name = DATASETS[args.dataset]
    fig.suptitle(f"HSIC information plane (PyGlow statistic, Gaussian sigma 5, Y = softmax output) of the notebook's "
                 f"network on {name}, {args.epochs} epoch(s), a checkpoint every {args.ckpt_every_steps} steps",
                 fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _start_end(ax, x, y) -> None:
    ax.plot(x[0], y[0], "o", ms=11, mfc="none", mec="tab:green", mew=2, label="start", zorder=3)
    ax.plot(x[-1], y[-1], "*", ms=14, color="tab:red", label="end", zorder=3)
    if len(x) > 1 and (x[-1] != x[-2] or y[-1] != y[-2]):
        ax.annotate("", xy=(x[-1], y[-1]), xytext=(x[-2], y[-2]),
                    arrowprops={"arrowstyle": "->", "color": "tab:red", "lw": 1.5}, zorder=3)


# ------------------------------------------------------------------------------------------ page
def markdown_table(table: pd.DataFrame) -> str:
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
                     + ["| " + " | ".join(r) + " |" for r in cells])


def write_doc(path: Path, png: Path, hsic, accuracy, groups, args, timings, totals, resumed, argv) -> None:
    steps = sorted(hsic.step.unique())
    n_probe = int(hsic.n_probe.iloc[0])
    name = DATASETS[args.dataset]
    reduced = overrides(args)
    command = shlex.join(["python", "scripts/reproduce_hsic_plane.py", *(sys.argv[1:] if argv is None else argv)])
    last = accuracy.iloc[-1] if len(accuracy) else None
    acc_text = ", ".join(f"{s} {last[s]:.3f}" for s in ("train", "val", "test") if last is not None and s in last)
    text = [
        f"# HSIC information plane: the seed study on {name}",
        "",
        "Written by `scripts/reproduce_hsic_plane.py --doc` (do not edit by hand). Command: "
        f"`{command}`.",
        "",
    ]
    if reduced or args.ckpt_every_steps != STUDY["ckpt_every_steps"] or args.hsic_probe != STUDY["hsic_probe"] \
            or args.hsic_split != STUDY["hsic_split"]:
        text += [f"**A reduced or modified run, not the study's scale**: {', '.join(reduced) or 'study data'}; "
                 f"checkpoint every {args.ckpt_every_steps} steps, HSIC probe {args.hsic_probe} from the "
                 f"{args.hsic_split} split. The full run is `python scripts/reproduce_hsic_plane.py --doc "
                 "docs/hsic-plane.md`.", ""]
    text += [
        "## What was run",
        "",
        "The seed notebook (PyGlow, \"Analysing training dynamics using HSIC criterion\") trains this network "
        "and tracks, per layer output T, the pair (HSIC(X, T), HSIC(T, Y)): the information plane with HSIC in "
        "place of mutual information.",
        "",
        f"- Network (`train-ckpts --model-type layers --layers`): `{' '.join(LAYERS)}`: conv 16 3x3 'same' + "
        "ReLU, flatten, dropout 0.4, dense 500 ReLU, dropout 0.4, dense 200 ReLU, dropout 0.2, dense 10.",
        f"- Data: {name}"
        + (f", the first {args.train_samples} training images" if args.train_samples else "")
        + f"; {args.val_fraction:g} of the training pool held out for validation (the notebook's "
        "`validation_split`), the official test set for test.",
        f"- Training: SGD, lr {args.lr:g}, momentum {args.momentum:g}, no Nesterov (the notebook's "
        "`compile(optimizer='SGD')` with PyGlow's defaults `learning_rate=0.001, momentum=0.95`), "
        f"cross-entropy, batch {args.batch_size}, {args.epochs} epoch(s), seed {args.seed}: {int(max(steps))} "
        f"optimizer steps, {len(steps)} checkpoints (the initial weights, every {args.ckpt_every_steps} steps "
        "and each epoch's end).",
        f"- HSIC: `analyze --estimators evaluate,hsic --hsic-preset pyglow --hsic-split {args.hsic_split} "
        f"--hsic-probe {args.hsic_probe}`: Gaussian kernel exp(-|a-b|^2 / (2 * 5^2)) on X, T and Y, "
        "statistic tr(K H L H)/(m - 1) (PyGlow's), Y = the network's softmax output, averaged over "
        f"{n_probe // 64} batches of 64 ({n_probe} fixed, seeded probe images of the {args.hsic_split} split, "
        "the same at every checkpoint), eval mode. See docs/hsic.md.",
        "- `evaluate`: loss and accuracy on the full train, validation and test splits at every checkpoint.",
        "",
        "### Differences from the notebook, and why",
        "",
        f"- **{name} instead of MNIST**. "
        + ("The notebook downloads MNIST with torchvision; this machine works offline and has no MNIST files, "
           "while Debian's `dataset-fashion-mnist` package gives Fashion-MNIST (the same format: 28x28 grey "
           "images, 10 classes, 60,000 + 10,000). Fashion-MNIST is harder (small networks typically reach 85-90% "
           "test accuracy where they reach about 98% on MNIST), so accuracies and HSIC values are not MNIST's. "
           "With MNIST's IDX files in DIR/MNIST/raw/, `--dataset mnist --data-root DIR` runs the notebook's data."
           if args.dataset == "fashion-mnist" else
           "The notebook's own data." if args.dataset == "mnist" else
           "A smoke-run stand-in (8x8 images; the conv layer keeps the 8x8 size)."),
        "  Normalisation: Fashion-MNIST and the notebook's MNIST loader both use mean 0.5, std 0.5."
        if args.dataset == "fashion-mnist" else None,
        "- **Logits, not a softmax layer**. PyGlow's last layer is Dense(10, softmax) and its `cross_entropy` "
        "loss is `nn.CrossEntropyLoss`, which applies log-softmax again. With that double softmax the loss "
        "cannot fall below log(e + 9) - 1 = 1.46 even at 100% accuracy, which is why the notebook's losses stay "
        "between 1.65 and 2.19 while its accuracy reaches 0.88; the gradients are damped too. The trainer's "
        "last layer outputs logits and its cross-entropy applies the softmax once, so the training dynamics "
        "differ from the notebook's (the same network, a differently scaled loss). HSIC's Y is still the softmax "
        "output, as in PyGlow.",
        "- **Coordinates from checkpoints, not from training batches**. PyGlow (`IBSequential.fit_generator`) "
        "computes the coordinates on every training minibatch as it trains (train mode: dropout active; each "
        "point from a different batch of 64, before that step's update) and keeps them all, 750 per epoch. Here "
        f"they are computed after training at {len(steps)} checkpoints, on one fixed probe set "
        "in eval mode, so Flatten and Dropout layers repeat the coordinates of the layer before them (they are "
        "drawn as one panel).",
        "- With sigma = 5 on 784-pixel inputs the input kernel is nearly the identity, so HSIC(X, T) of the "
        "early layers saturates near 1, and the softmax outputs lie within distance sqrt(2) of each other, so "
        "HSIC(T, Y) is small in absolute terms; these are properties of the notebook's convention (the "
        "toolkit's default, normalized HSIC with the median bandwidth, avoids both).",
        "",
        "## Results",
        "",
        f"Accuracy at the last checkpoint (step {int(max(steps))}): {acc_text}. The notebook reported validation "
        "accuracy 0.50 after epoch 1 and 0.88 after epoch 2 on MNIST (PyGlow measures it on the last validation "
        "batch only).",
        "",
        f"![HSIC information plane per layer, coloured by step]({png.name})",
        "",
        "Start and end of each layer's path (rows of layers whose coordinates are identical at every checkpoint "
        "are merged):",
        "",
        markdown_table(endpoints(hsic, groups)),
        "",
        "## Timings on this machine",
        "",
        "Minutes per stage: in the invocation that wrote this page, and summed over every invocation on this "
        "output folder (training and analysis resume: a rerun computes only what is missing and adds its own, "
        "mostly start-up, time)."
        + (" This page was written by a rerun on an existing output folder: the first column is not the cost "
           "of the computation." if resumed else ""),
        "",
        "| stage | this invocation | all invocations |",
        "|---|---|---|",
        *[f"| {k} | {v / 60:.2f} | {totals.get(k, v) / 60:.2f} |" for k, v in timings.items()],
        f"| total | {sum(timings.values()) / 60:.2f} | "
        f"{sum(totals.get(k, v) for k, v in timings.items()) / 60:.2f} |",
        "",
        f"Machine: {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} (the "
        "trainer's torch thread count follows it); analyze ran "
        + ("its tasks in one process (one torch thread)." if args.workers == 0 else
           f"{args.workers or 'its default number of'} worker process(es), one torch thread each."),
        "",
        "## Paths",
        "",
        "The coordinates at every checkpoint, per distinct layer output:",
        "",
    ]
    for group in groups:
        path_rows = hsic[hsic.layer_name == group[0]][["epoch", "step", "hsic_x", "hsic_y"]].rename(
            columns={"hsic_x": "HSIC(X,T)", "hsic_y": "HSIC(T,Y)"})
        path_rows = path_rows.join(accuracy.get("test", pd.Series(dtype=float)).rename("test accuracy"), on="step")
        text += [f"### {group_label(group)}", "", markdown_table(path_rows), ""]
    path.write_text("\n".join(line for line in text if line is not None))
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        raise SystemExit(f"{PROG}: interrupted; rerun to resume") from None
