"""The HSIC information-plane study (scripts/reproduce_hsic_plane.py): its settings, the layers' paths
through the plane, and the figure and page it writes."""

from __future__ import annotations

import math
import os
import shlex
import sys
from pathlib import Path

import pandas as pd


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


def overrides(args) -> list[str]:
    """The settings that differ from the study's (a reduced run says so on its page)."""
    study = {**STUDY, "train_samples": 0}
    return [f"{k.replace('_', '-')} {getattr(args, k)}" for k in ("dataset", "train_samples", "epochs", "batch_size",
                                                                   "lr", "momentum", "val_fraction")
            if getattr(args, k) != study[k]]


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
