"""The NGD-vs-SGD study's results page (scripts/reproduce_ngd_sgd.py --doc): its figure, the verdicts' tables and
the markdown around them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

import _stages
from analyze import branch_compare as bc


def figure(tables: dict, family: str, cut: int, settings: dict, path: Path) -> None:
    """Four panels: the LLC at both settings and Tr(H) against epoch, and Tr(H) against training loss (the
    matched-loss view: NGD trains faster, so at equal epochs it sits at a lower loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def llc_at(setting):
        llc = tables["llc"]
        for key, value in setting.items():
            llc = llc[llc[key] == value]
        return llc

    hess = tables["hessian"][tables["hessian"].trace_method == "exact"]
    ev = tables["evaluate"]
    train_loss = ev[ev.split == "train"].drop_duplicates(["run", "epoch"], keep="last").set_index(["run", "epoch"]).loss
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
    colors = {"trunk": "0.4", "swap-sgd": "tab:blue", "swap-ngd": "tab:red"}
    labels = {"trunk": "SGD (trunk)", "swap-sgd": "SGD after swap", "swap-ngd": "NGD after swap"}
    panels = ((axes[0, 0], llc_at(settings["calibrated"]), "llc_mean", "llc_sem", "LLC (± s.e.), calibrated setting"),
              (axes[0, 1], llc_at(settings["study's"]), "llc_mean", "llc_sem", "LLC (± s.e.), the study's setting"),
              (axes[1, 0], hess, "trace", "trace_stderr", "Hessian trace (± s.e.)"))
    for ax, frame, value, se, title in panels:
        for name, color in colors.items():
            rows = frame[frame.run == f"{family}-{name}"].sort_values("epoch")
            if value == "llc_mean":  # hollow: chains not healthy
                bad = ~rows.healthy
                ax.scatter(rows.epoch[bad], rows[value][bad], s=40, facecolors="white", edgecolors=color, zorder=3)
            ax.errorbar(rows.epoch, rows[value], yerr=rows[se], color=color, marker="o", ms=3, lw=1.2, capsize=2,
                        label=labels[name])
        ax.axvline(cut, color="k", ls="--", lw=0.8)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if value == "llc_mean" and "not_at_minimum" in frame and (~frame.not_at_minimum).any():
            at_min = frame[~frame.not_at_minimum]  # early checkpoints are not at a minimum: scale to the rest
            low, high = (at_min.llc_mean - at_min.llc_sem).min(), (at_min.llc_mean + at_min.llc_sem).max()
            ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax = axes[1, 1]
    for name, color in colors.items():
        rows = hess[hess.run == f"{family}-{name}"].sort_values("epoch")
        loss = train_loss.reindex(list(zip(rows.run, rows.epoch))).to_numpy()
        ax.errorbar(loss, rows.trace, yerr=rows.trace_stderr, color=color, marker="o", ms=3, lw=1.2, capsize=2,
                    label=labels[name])
    ax.set_xscale("log")
    ax.invert_xaxis()  # training proceeds to the right
    ax.set_xlabel("training loss (log scale, decreasing)")
    ax.set_title("Hessian trace against training loss")
    ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.suptitle("NGD vs SGD after the swap (dashed line); hollow markers: chains not healthy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(table: pd.DataFrame) -> str:
    table = table.reset_index()
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
                     + ["| " + " | ".join(r) + " |" for r in cells])


def reading(lines: list[str]) -> list[str]:
    """A sentence where the matched-epoch and matched-loss verdicts of one measure disagree."""
    def call(line):
        return line.split(": ", 2)[1]

    out = []
    for epoch_line in (line for line in lines if " at matched epoch" in line):
        measure = epoch_line.split(" at matched epoch")[0]
        rest = epoch_line.split(" at matched epoch")[1].split(":")[0]  # e.g. ", calibrated setting"
        loss_line = next((line for line in lines if line.startswith(f"{measure} at matched training loss{rest}:")),
                         None)
        if loss_line and call(epoch_line) != call(loss_line) and "NO VERDICT" not in epoch_line + loss_line:
            out.append(f"{measure}{rest}: the verdict at matched training loss ({call(loss_line)}) differs from the "
                       f"one at matched epoch ({call(epoch_line)}): at equal epochs NGD has trained further, and "
                       "the difference at equal epochs goes with its lower training loss.")
    return [*out, ""] if out else []


def setting_rows(llc: pd.DataFrame, setting: dict) -> pd.DataFrame:
    """The llc rows of one sampler setting (columns -> values, as `settings` gives them)."""
    return llc[np.logical_and.reduce([llc[key] == value for key, value in setting.items()])]


def every_checkpoint_cost(tables, calibrated: dict, args) -> str:
    """What the LLC at the calibrated setting took per checkpoint, and at every checkpoint would take where it
    ran at fewer (--llc-epochs), from this run's own times."""
    llc, checkpoints = tables["llc"], tables["hessian"].drop_duplicates(["run", "epoch"])
    rows = setting_rows(llc, calibrated)
    per_checkpoint = rows.seconds.median()
    if len(rows.drop_duplicates(["run", "epoch"])) >= len(checkpoints):
        return (f"The LLC at the calibrated setting ran at every one of the {len(checkpoints)} checkpoints, "
                f"{per_checkpoint:.0f} s each (median, one worker).")
    workers = args.workers or os.cpu_count() or 1
    minutes = len(checkpoints) * per_checkpoint / workers / 60
    return (f"The LLC at the calibrated setting ran at {len(rows)} checkpoints (--llc-epochs {args.llc_epochs}); at "
            f"every one of the {len(checkpoints)} it would take about {len(checkpoints)} x {per_checkpoint:.0f} s / "
            f"{workers} worker{'s' if workers > 1 else ''} = {minutes:.0f} min by itself.")


def margin_lines(tables, settings, lambda_min: float) -> list[str]:
    """The cut-off checkpoint's downward curvature against each setting's localization (localization_margin)."""
    from analyze.llc.stability import localization_margin

    head = (f"The Hessian's smallest eigenvalue at the cut-off checkpoint (Lanczos on the estimator's 1,280 samples) "
            f"is {lambda_min:.3g}")
    if lambda_min >= 0:
        return [head + ": no downward curvature there.", ""]
    llc, out = tables["llc"], []
    for name, f in settings.items():
        rows = setting_rows(llc, f)
        if len(rows):
            gamma, nbeta = rows.localization.iloc[0], rows.nbeta.iloc[0]
            margin = localization_margin(gamma, nbeta, lambda_min)
            out.append(f"- {name} setting: gamma {gamma:g} + nbeta {nbeta:.0f} x lambda_min = {margin:,.0f}"
                       + (": negative on these samples" if margin < 0 else ""))
    return [head + ": on these samples the localized potential nbeta L + gamma |w - w*|^2 / 2 curves down at w* "
            "unless gamma > -nbeta lambda_min (`localization_margin`, docs/llc.md). A subsample's Hessian dips below "
            "zero even at a minimum, so this alone does not prove a descent; read it with the drifts above (negative: "
            "the chains descending from a checkpoint that is not at a minimum):", *out, "",
            "The same on the whole training set, with the gradient and what it does to the estimate: "
            "[cutoff-curvature.md](cutoff-curvature.md) (`scripts/cutoff_curvature.py`).", ""]


def localization_scale(llc: pd.DataFrame, calibrated: dict) -> str:
    """What the calibrated localization does to the absolute value of the estimate."""
    rows = setting_rows(llc, calibrated)
    scale = rows.localization.iloc[0] / rows.nbeta.iloc[0] if len(rows) else float("nan")
    return (f"- The calibrated localization's scale: gamma / nbeta = {scale:.2g}. The loss holds the directions whose "
            "curvature is above it, the localizer the others, so the calibrated LLC lies below the learning coefficient "
            "by an amount that grows with gamma (on the 268,800-parameter truth net 23% at gamma 1000, 76% at gamma "
            "10000; docs/llc.md): the branches are compared at equal settings, the absolute values are not the "
            "learning coefficient.")


def write_doc(path: Path, description: str, study, tables, family, cut, settings, lr, loc, why, args, timings, lines,
              sections, lambda_min: float):
    """The results page (settings, verdicts, chain health, timings, the comparison tables) and its figure."""
    study_burnin = settings["study's"]["n_burnin"]
    png = path.with_suffix(".png")
    figure(tables, family, cut, settings, png)
    llc = tables["llc"]
    per_setting = []
    for name, f in settings.items():
        rows = setting_rows(llc, f)
        per_setting.append(f"- {name} setting: {len(rows)} checkpoints, {int(rows.healthy.sum())} healthy; "
                           f"median R-hat {rows.rhat.median():.3f}, median |drift| {rows.drift.abs().median():.2f} "
                           f"(negative at {int((rows.drift < 0).sum())} of {len(rows)}: the sampled loss falling "
                           "during the draws), "
                           f"step_curvature (eps x nbeta x lambda_max, stable below 2) {rows.step_curvature.min():.2g}"
                           f" to {rows.step_curvature.max():.2g}, "
                           f"median seconds per checkpoint {rows.seconds.median():.0f}")
    text = [
        "# NGD vs SGD: the learning-coefficient study at full scale",
        "",
        "Written by `scripts/reproduce_ngd_sgd.py --doc` (do not edit by hand). "
        + " ".join(description.split()),
        "",
        f"Study arguments: `{json.dumps(study[0])}`; data `{json.dumps(study[1])}`.",
        "",
        f"- LLC, calibrated setting: eps {lr}, gamma {loc} ({why}); control-variate gradients, batch "
        f"{args.llc_batch_size}; {study[2]['num_chains']} chains x {settings['calibrated']['n_draws']} draws after "
        f"{settings['calibrated']['n_burnin']} burn-in; nbeta = n / log n; "
        + f"epochs {args.llc_epochs} (--llc-epochs).",
        f"- LLC, the study's setting: eps {study[2]['sampler_lr']:g}, "
        f"gamma {study[2]['localization']:g}, plain minibatches of {study[1]['batch_size']}, same chains and draws, "
        f"{study_burnin} burn-in (the notebook's), every fifth epoch.",
        localization_scale(tables["llc"], settings["calibrated"]),
        "- Hessian trace: exact (diagonal Gauss-Newton = Tr(H) for this ReLU net) on the estimator's 1,280 seeded "
        "training samples; the error bar is that subsample's standard error.",
        "",
        "## Verdicts",
        "",
        *[f"- {line}" for line in lines],
        "",
        *reading(lines),
        "Chain health:",
        *per_setting,
        "",
        *margin_lines(tables, settings, lambda_min),
        f"![LLC and Hessian trace against epoch]({png.name})",
        "",
        "## Timings on this machine",
        "",
        "Each stage's time summed over the invocations that built this output folder (OUT/timings.json). The "
        "calibration runs in the background from the moment the cut-off checkpoint exists, so its time overlaps "
        "the stages before the calibrated LLC; the total is the wall time.",
        "",
        "| stage | minutes |",
        "|---|---|",
        *[f"| {k} | {v / 60:.1f} |" for k, v in timings.items() if k != _stages.WALL],
        f"| total (wall time) | {timings.get(_stages.WALL, sum(timings.values())) / 60:.1f} |",
        "",
        every_checkpoint_cost(tables, settings["calibrated"], args),
        "",
    ]
    for label, verdict_text, table in sections:
        text += [f"## {label}", "", verdict_text, "", "a = NGD, b = SGD; `call`: a above / below b by more than "
                 "`t` combined standard errors (`diff_se`); `t` is Student's at the coverage of "
                 f"{bc.Z:g} normal errors, with the Welch degrees of freedom of the two errors (2 for a "
                 "Hessian trace over 1,280 samples, 4.5 or more for two 2-chain LLCs).", "", markdown_table(table), ""]
    path.write_text("\n".join(text))
    print(f"wrote {path} and {png}")
