#!/usr/bin/env python
"""Reproduce the NGD-vs-SGD learning-coefficient study at full scale on the real Fashion-MNIST.

The study's args file as it is (scripts/args_ngd_sgd.json): a 784-256-256-10 ReLU MLP, SGD (lr 1e-3,
momentum 0.9, Nesterov, batch 128) to epoch 30, then an SGD branch and an NGD branch (alpha 0.1, eta 0.9,
epsilon 1e-10, delta 5e-4) to epoch 80. Its claim: after the swap NGD reaches a higher LLC *and* a higher
Hessian trace than SGD. Stages, each timed and printed:

1. training (train-ckpts, the two branches at once after the trunk with --jobs 2; resumed when the output
   folder exists);
2. calibration: `analyze calibrate` on the cut-off checkpoint at localizations 3000 and 10000 (that checkpoint
   curves down more than gamma 1000 holds, docs/cutoff-curvature.md), in the background from the moment the trunk
   has written it (alongside stages 1, 3 and 4, which leave a core idle or share both); its recommendation is
   used for every checkpoint (estimates are comparable only at equal settings); when none is confirmed, the
   setting validated on a truth model of the model's size (at the study's size SCALE_FALLBACK's step and
   burn-in at the grid's strongest localization; the defaults on a small model);
3. Hessian trace at every checkpoint: the exact trace (diagonal Gauss-Newton, equal to Tr(H) on a ReLU net)
   and lambda_max, with the standard error of the sample subset, plus the `evaluate` losses;
4. the study's own sampler setting (eps 1e-4, gamma 100, 2 x 1,000, plain minibatches of 128) on every
   fifth epoch;
5. LLC at the calibrated setting at every checkpoint (--llc-epochs restricts it), the study's chain count (2)
   and the recommendation's draws (its step check's: 3x the study's 1,000, at a third of the pick's step);
6. the report, and the verdicts: NGD above / below / no different from SGD, for the LLC and for Tr(H), at
   matched epoch and at matched training loss (each NGD checkpoint against the SGD checkpoint nearest in
   training loss: NGD trains faster, and both measures move as the loss falls). Only checkpoints whose
   estimates are healthy count (the llc rows' `healthy`: R-hat < 1.1, |drift| <= 3, none diverged or left the
   basin, at a minimum, and the step stable in the stiffest direction, eps x nbeta x lambda_max < 2), a
   verdict needs them at more than half of the compared points, and more than half of them one way by a
   one-sided binomial test at 2.3% (analyze/branch_compare.py: at least 6 points, and a count near the half
   is no verdict).

It writes OUT/verdict.txt and, with --doc, a markdown page (settings, timings, verdicts, tables) with a PNG
figure next to it. Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package (or --data-root).

Usage: python scripts/reproduce_ngd_sgd.py [--out ngd-sgd-fashion] [--doc docs/ngd-vs-sgd.md]
Smoke run: --dataset digits --num-epochs 6 --cut-off-epochs 3 --hidden-nodes 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import _stages  # noqa: E402  (scripts/, the script's own folder)
from _stages import past_timings, record, stage  # noqa: E402
from _ngd_sgd_page import write_doc  # noqa: E402
from analyze import branch_compare as bc  # noqa: E402

# The study's own args file (its format: [hyperparameters, data args, sampler args]).
STUDY_ARGS = json.loads((Path(__file__).parent / "args_ngd_sgd.json").read_text())
CURVATURE = ["--hessian-trace-method", "exact", "--hessian-spectrum", "false", "--hessian-top-k", "1",
             "--hessian-batch-size", "128"]  # 10 batches of 128 (as the study): the subsample s.e. needs several


PROG = "reproduce_ngd_sgd"
STUDY_BURNIN = 0  # the notebook sets none: devinterp's estimate_learning_coeff default, 0 burn-in steps
CONFIRM_BURNIN = 300  # the first burn-in calibrate confirms its pick with (then 3x, 9x while the chains settle)
# When calibrate confirms nothing on a model of the study's size: the defaults' chains leave the basin there, and
# docs/llc-validation-scale.md found 0.01/nbeta (settled after 2,000-3,000 burn-in steps) the step that holds a
# 268,800-parameter deep linear net's chains. Its localization there (gamma 1000) is too weak for this cut-off (see
# LOCALIZATIONS), so the fallback takes that step and burn-in at the grid's strongest localization, and says so.
LARGE_MODEL = 100_000  # parameters
# The calibration grid's localizations. The cut-off checkpoint is not at a minimum: on the whole training set the loss
# curves down there by 0.213 (docs/cutoff-curvature.md), more than gamma / nbeta holds at gamma <= 1000 (nbeta =
# 4,705), so chains at those localizations descend however long they run (the study's calibration at the default
# grid, 1 to 1000, spent 11 minutes and confirmed nothing). The grid therefore starts above that, and calibrate
# picks the weaker of the two where its chains are healthy (a stronger localization biases the LLC lower).
LOCALIZATIONS = "3000,10000"
SCALE_FALLBACK = ("0.01/nbeta", 2000)  # step, burn-in
CALIBRATION = "calibration (alongside the stages before the calibrated LLC)"


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    _stages.run(cmd, PROG, env)


def bin_path(name: str) -> str:
    return _stages.bin_path(name, PROG)


def strongest_localization(localizations: str, cut_ckpt: Path, data_root: str | None) -> str:
    """The strongest of a calibration grid's localizations (numbers or 'c*nbeta') at the cut-off's nbeta."""
    from analyze.estimators.llc import parse_localization, parse_nbeta
    from trainer.checkpoints import read_checkpoint
    from trainer.data import load_dataset

    grid = [t.strip() for t in localizations.split(",") if t.strip()]
    n = len(load_dataset(read_checkpoint(cut_ckpt).meta["dataset_spec"], root=data_root).train)
    return max(grid, key=lambda t: parse_localization(t, parse_nbeta("n/log n", n)))


class LLCSetting(NamedTuple):
    """The LLC's setting at every checkpoint: step, localization, burn-in, why this one, and the draws per chain
    (None: the study's; calibrate's recommendation has its own where its step check moved it to a smaller step, which
    runs 3x the draws for the same sampling time)."""
    lr: str
    localization: str
    burnin: int | str
    why: str
    draws: int | None = None


def calibrated_setting(analysis: Path, run_name: str, cut: int, cut_ckpt: Path, localizations: str,
                       data_root: str | None = None) -> LLCSetting:
    """calibrate's recommendation at the cut-off; when none qualified, the setting validated on a truth model of the
    model's size (the defaults; on a large model SCALE_FALLBACK's step and burn-in at the strongest of the
    calibration grid's `localizations`)."""
    import analyze
    from analyze.estimators.llc import DEFAULTS
    from analyze.llc.calibration_table import recommended_setting
    from trainer.checkpoints import read_checkpoint

    calibration = analyze.load(str(analysis)).get("calibration")
    if calibration is not None:
        setting = recommended_setting(calibration[(calibration.run == run_name) & (calibration.epoch == cut)])
        if setting:
            confirmed = setting["burnin"] is not None
            return LLCSetting(setting["lr"], setting["localization"], setting["burnin"] if confirmed else
                              DEFAULTS["burnin"], "calibrate's recommendation", setting["draws"] if confirmed else None)
    parameters = sum(t.numel() for t in read_checkpoint(cut_ckpt).tensors.values())
    if parameters >= LARGE_MODEL:
        (lr, burnin), strongest = SCALE_FALLBACK, strongest_localization(localizations, cut_ckpt, data_root)
        return LLCSetting(lr, strongest, burnin, (
            f"no calibrated setting qualified: on this {parameters:,}-parameter model the step and burn-in that hold "
            "a 268,800-parameter deep linear net's chains in the basin (docs/llc-validation-scale.md), at the "
            f"calibration grid's strongest localization, gamma {strongest}"))
    return LLCSetting(DEFAULTS["lr"], DEFAULTS["localization"], DEFAULTS["burnin"],
                      "no calibrated setting qualified: the validated defaults")


def cutoff_lambda_min(tables: dict, run_name: str, cut: int, cut_ckpt: Path, args) -> float:
    """The Hessian's smallest eigenvalue at the cut-off checkpoint: from calibrate's table, or measured here (about
    a minute on the study's MLP) for an analysis calibrated before calibrate recorded it."""
    calibration = tables.get("calibration")
    if calibration is not None and "lambda_min" in calibration:
        at_cut = calibration[(calibration.run == run_name) & (calibration.epoch == cut)].lambda_min.dropna()
        if len(at_cut):
            return float(at_cut.iloc[-1])
    from analyze.llc.calibrate import context_for
    from analyze.llc.stability import bottom_hessian_eigenvalue

    print(f"measuring the Hessian's smallest eigenvalue at {cut_ckpt}", flush=True)
    return bottom_hessian_eigenvalue(context_for(cut_ckpt, args.device, args.data_root))


def comparisons(tables: dict, family: str, cut: int, llc_filter: dict) -> dict[str, pd.DataFrame]:
    """NGD against SGD per measure and view; every table is bc's (a = NGD, b = SGD)."""
    sgd, ngd, trunk = (f"{family}-{r}" for r in ("swap-sgd", "swap-ngd", "trunk"))
    ev = tables["evaluate"]
    train = ev[ev.split == "train"].drop_duplicates(["run", "epoch"], keep="last")
    loss = {r: train[train.run == r].set_index("epoch").loss for r in (sgd, ngd, trunk)}
    llc = tables["llc"]
    for key, value in llc_filter.items():
        llc = llc[llc[key] == value]
    hess = tables["hessian"]
    hess = hess[hess.trace_method == "exact"]
    out = {}
    llc = llc.assign(llc_dof=llc.n_chains - 1)  # a between-chain error: Student's t in the comparison
    for measure, frame, value, se, ok, dof in (("LLC", llc, "llc_mean", "llc_sem", "healthy", "llc_dof"),
                                               ("Tr(H)", hess, "trace", "trace_stderr", None, None)):
        if not len(frame):
            continue
        s = {r: bc.series(frame, r, value, se, ok, loss[r], dof) for r in (sgd, ngd, trunk)}
        # SGD's side of a matched-loss pair may be any SGD-trained checkpoint: the trunk's and the branch's
        sgd_path = pd.concat([s[trunk], s[sgd]])
        out[f"{measure} at matched epoch"] = bc.at_matched_epoch(s[ngd], s[sgd], cut)
        out[f"{measure} at matched training loss"] = bc.at_matched_loss(s[ngd], sgd_path[~sgd_path.index.duplicated(
            keep="last")], cut)
    return out


def llc_setting(args, analysis: Path, family: str, cut: int, cut_ckpt: Path) -> LLCSetting:
    """The calibrated setting (calibrated_setting), or what --llc-lr/--llc-localization/--llc-burnin give."""
    lr, loc, burnin, why, draws = calibrated_setting(analysis, f"{family}-trunk", cut, cut_ckpt,
                                                     args.calibration_localizations, args.data_root)
    if args.llc_lr or args.llc_localization or args.llc_burnin is not None:  # the calibration's table stays
        why = (f"given with --llc-lr/--llc-localization/--llc-burnin; calibrate's pick: eps {lr}, gamma {loc}, "
               f"burn-in {burnin}" + (f", {draws} draws" if draws else "") + f" ({why})")
        lr, loc = args.llc_lr or lr, args.llc_localization or loc
        burnin = args.llc_burnin if args.llc_burnin is not None else burnin
        draws = None  # the study's
    return LLCSetting(lr, loc, burnin, why, draws)


def stages(args, out: Path, study: list, family: str, ckpts: Path, analysis: Path, data: list[str],
           common: list[str], timings: dict, log: Path) -> LLCSetting:
    """Train, calibrate, and run the estimators; return the calibrated LLC setting.

    The calibration needs only the cut-off checkpoint: it starts as soon as the trunk has written it and runs
    in the background alongside the branches' training, the Hessian stage and the study's-setting LLC (which
    leave a core idle or share both), so its time mostly overlaps theirs."""
    hp, sampler = study[0], study[2]
    cut, epochs = hp["cut_off_epochs"], hp["num_epochs"]
    cut_ckpt = ckpts / f"{family}-trunk" / f"epoch-{cut:04d}.safetensors"
    calibrate = [bin_path("analyze"), "calibrate", str(cut_ckpt), "--chains", str(args.calibration_chains),
                 "--draws", str(args.calibration_draws), "--burnin", str(args.calibration_draws),
                 # the pick is confirmed at the study's chain and draw counts, from CONFIRM_BURNIN burn-in steps
                 "--confirm-chains", str(sampler["num_chains"]), "--confirm-draws", str(sampler["num_draws"]),
                 "--confirm-burnin", str(CONFIRM_BURNIN), "--localization", args.calibration_localizations,
                 # the study's chain count stays (each row reports its standard error): no extra chains
                 "--precision", "0",
                 "--batch-size", args.llc_batch_size, "--out", str(analysis), *data, "--device", args.device]
    calibration_log = out / "calibration.log"
    calibrating = None
    try:
        with stage("training", timings, log):
            trainer = _stages.start(
                [bin_path("train-ckpts"), "--config", str(out / "args_ngd_sgd.json"), "--out", str(ckpts), *data,
                 "--device", args.device, "--quiet", "--jobs", str(args.train_jobs)]
                + (["--resume"] if ckpts.exists() else []), PROG)
            if not (analysis / "calibration").exists():  # a resumed run keeps its calibration
                while not cut_ckpt.exists() and trainer.running():  # written by rename: complete once there
                    time.sleep(1.0)
                if cut_ckpt.exists():
                    # one thread: at batch 64 more threads cost more than they give, and on a busy machine their
                    # oversubscription made each chain step 7x slower here (the dask workers run one thread too)
                    calibrating = _stages.start(calibrate, PROG, calibration_log, env={"OMP_NUM_THREADS": "1"})
            _stages.finish(trainer, PROG)
        with stage("Hessian trace (and evaluate), every checkpoint", timings, log):
            run([bin_path("analyze"), str(ckpts), "--estimators", "evaluate,hessian", *CURVATURE, "--no-report",
                 *common])
        llc_options = ["--llc-chains", str(sampler["num_chains"]), "--llc-draws", str(sampler["num_draws"])]
        with stage("LLC at the study's setting, every fifth epoch", timings, log):
            run([bin_path("analyze"), str(ckpts), "--estimators", "llc", "--epochs", f"0-{epochs}:5", *llc_options,
                 "--llc-burnin", str(STUDY_BURNIN), "--llc-lr", f"{sampler['sampler_lr']:g}",
                 "--llc-localization", f"{sampler['localization']:g}", "--llc-gradient", "minibatch",
                 "--llc-batch-size", str(study[1]["batch_size"]), "--no-report", *common])
        if calibrating is not None:
            print("\n=== calibration (in the background since the cut-off checkpoint was written)", flush=True)
            _stages.finish(calibrating, PROG)
            record(CALIBRATION, calibrating.seconds(), timings, log)
            print(f"=== calibration: {timings[CALIBRATION] / 60:.1f} min, overlapping the stages above", flush=True)
    finally:
        if calibrating is not None and calibrating.running():  # this script failed or was interrupted
            calibrating.process.terminate()
    setting = llc_setting(args, analysis, family, cut, cut_ckpt)
    draws = setting.draws or sampler["num_draws"]
    print(f"LLC setting: eps {setting.lr}, gamma {setting.localization} ({setting.why}); control-variate gradients, "
          f"batch {args.llc_batch_size}, {sampler['num_chains']} chains x {draws} draws after {setting.burnin} burn-in")
    with stage(f"LLC at the calibrated setting, epochs {args.llc_epochs}", timings, log):
        run([bin_path("analyze"), str(ckpts), "--estimators", "llc", "--llc-chains", str(sampler["num_chains"]),
             "--llc-draws", str(draws), "--llc-burnin", str(setting.burnin), "--llc-lr", setting.lr,
             "--llc-localization", setting.localization, "--llc-batch-size", args.llc_batch_size, "--no-report",
             "--epochs", args.llc_epochs, *common])
    with stage("report", timings, log):
        run([bin_path("analyze"), str(ckpts), "--estimators", "evaluate", *common])
    return setting


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="ngd-sgd-fashion", help="output folder (default: %(default)s)")
    ap.add_argument("--data-root", help="dataset folder (default: Debian's dataset-fashion-mnist package)")
    ap.add_argument("--doc", help="write the results page here (e.g. docs/ngd-vs-sgd.md), its figure next to it")
    ap.add_argument("--workers", type=int, default=None, help="dask workers for analyze (default: cores)")
    ap.add_argument("--train-jobs", type=int, default=2, help="runs trained at once (train-ckpts --jobs): the SGD "
                    "and NGD branches are independent after the cut-off (default: %(default)s)")
    ap.add_argument("--device", default="cpu", help="torch device for training and analysis")
    ap.add_argument("--llc-batch-size", default="64", help="SGLD minibatch at the calibrated setting, with "
                    "control-variate gradients (default: %(default)s)")
    ap.add_argument("--llc-burnin", type=int, help="burn-in steps per chain at the calibrated setting (default: the "
                    "burn-in at which calibrate confirmed its pick at the study's chain and draw counts)")
    ap.add_argument("--llc-lr", help="SGLD step for the LLC at every checkpoint, in place of calibrate's pick")
    ap.add_argument("--llc-localization", help="localization for the LLC at every checkpoint, in place of "
                    "calibrate's pick")
    ap.add_argument("--llc-epochs", help="the LLC at the calibrated setting only at these epochs (analyze's --epochs "
                    "syntax, e.g. 30-80:5 for every fifth epoch from the cut-off; default: every checkpoint)")
    ap.add_argument("--calibration-draws", type=int, default=150,
                    help="draws (and burn-in) per calibration chain at the largest step; k times more at a k "
                         "times smaller step (default: %(default)s)")
    ap.add_argument("--calibration-chains", type=int, default=2, help="chains per calibration grid point")
    ap.add_argument("--calibration-localizations", default=LOCALIZATIONS,
                    help="the calibration grid's localizations gamma (default: %(default)s: on the whole training "
                         "set the cut-off checkpoint curves down more than gamma 1000 holds, docs/cutoff-curvature.md)")
    ap.add_argument("--doc-only", action="store_true", help="run nothing: the verdicts and --doc from the finished "
                    "analysis in --out (with the same study options), e.g. after the page's layout changed")
    ap.add_argument("--dataset", help="override the study's dataset (e.g. digits for a smoke run)")
    ap.add_argument("--num-epochs", type=int, help="override num_epochs (smoke runs)")
    ap.add_argument("--cut-off-epochs", type=int, help="override cut_off_epochs (smoke runs)")
    ap.add_argument("--hidden-nodes", type=int, help="override the hidden width (smoke runs)")
    args = ap.parse_args()
    doc = _stages.doc_path(args.doc, PROG)

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
    family = f"ffnn-{hp['hidden_layers'][0]}x{hp['hidden_nodes'][0]}"
    cut, epochs = hp["cut_off_epochs"], hp["num_epochs"]
    ckpts, analysis = out / "ckpts", out / "ckpts" / "analysis"
    data = ["--data-root", args.data_root] if args.data_root else []
    common = [*data, "--device", args.device] + (["--workers", str(args.workers)] if args.workers else [])
    timings: dict[str, float] = {}  # this invocation's stages; OUT/timings.json sums them over resumed runs
    log = out / "timings.json"
    args.llc_epochs = args.llc_epochs or f"0-{epochs}"

    cut_ckpt = ckpts / f"{family}-trunk" / f"epoch-{cut:04d}.safetensors"
    if args.doc_only:
        if not (analysis / "llc").is_dir():
            raise SystemExit(f"{PROG}: --doc-only: {analysis} holds no finished analysis; run without it first")
        lr, loc, burnin, why, draws = llc_setting(args, analysis, family, cut, cut_ckpt)
    else:
        began = time.perf_counter()
        try:
            lr, loc, burnin, why, draws = stages(args, out, study, family, ckpts, analysis, data, common, timings, log)
        finally:  # an interrupted invocation's time counts too: a rerun resumes its work
            record(_stages.WALL, time.perf_counter() - began, timings, log)
    study_lr, study_loc = f"{sampler['sampler_lr']:g}", f"{sampler['localization']:g}"

    import analyze

    tables = analyze.load(str(analysis))
    if str(burnin) == "auto":  # the defaults' burn-in, resolved by the llc estimator at this n: its rows hold it
        llc = tables["llc"]
        auto = llc[llc.burnin_option == "auto"] if "burnin_option" in llc else llc.iloc[:0]
        burnin = int(auto.n_burnin.iloc[0]) if len(auto) else burnin
    settings = {"calibrated": {"lr_option": lr, "localization_option": loc, "gradient": "control-variate",
                               "n_burnin": burnin, "n_draws": draws or sampler["num_draws"]},
                "study's": {"lr_option": study_lr, "localization_option": study_loc, "gradient": "minibatch",
                            "n_burnin": STUDY_BURNIN}}
    lines, sections = [], []
    for name, llc_filter in settings.items():
        for title, table in comparisons(tables, family, cut, llc_filter).items():
            if name == "study's" and title.startswith("Tr(H)"):
                continue  # the Hessian does not depend on the sampler setting
            label = title if title.startswith("Tr(H)") else f"{title}, {name} setting"
            text = bc.verdict(table, "NGD", "SGD", label)
            lines.append(text)
            sections.append((label, text, table))
            print(f"\n{label}\n{table.to_string(float_format=lambda v: f'{v:.4g}')}\n{text}", flush=True)
    print("\nstudy's claim: after the swap NGD reaches a higher LLC and a higher Hessian trace than SGD.")
    print("\n".join(lines))
    (out / "verdict.txt").write_text("\n".join(lines) + "\n")
    totals = past_timings(log)
    print("\ntimings (summed over the runs on this folder): "
          + ", ".join(f"{k} {v / 60:.1f} min" for k, v in totals.items() if k != _stages.WALL)
          + f"; wall time {totals.get(_stages.WALL, sum(totals.values())) / 60:.1f} min")
    if doc:
        lambda_min = cutoff_lambda_min(tables, f"{family}-trunk", cut, cut_ckpt, args)
        write_doc(doc, __doc__.split("\n\n")[1], study, tables, family, cut, settings, lr, loc, why, args,
                  totals, lines, sections, lambda_min)
    return 0


if __name__ == "__main__":
    sys.exit(main())
