#!/usr/bin/env python
"""Time the LLC's SGLD chains: the `fast` backend against devinterp, and against bare forward+backward passes.

Usage: python scripts/bench_llc.py [--chains 4] [--draws 200] [--repeats 3] [--threads 1] [--cases a,b,c]

Each case trains a real checkpoint with train-ckpts' own code (a few epochs, SGD), then times, on that
checkpoint with the same settings (chains x draws SGLD steps, no burn-in, batch 128, eps 1e-5,
gamma 100, nbeta = n / log n):

  fast        analyze.llc.sampler.sample_losses: all chains in one vmapped step (torch.func)
  devinterp   analyze.llc.devinterp.sample_losses_devinterp: devinterp 2's sampler through the
              adapter the `llc` estimator uses (its import is paid once, before timing)
  bare        the floor: the same number of forward+backward passes (chains x draws minibatches of
              the same size) on the plain nn.Module, no update, no noise, no bookkeeping
  bare+noise  bare, plus drawing the same Gaussian noise (chains x P normals per step with torch's
              normal_): what any exact SGLD must pay at least; shown to say where the time goes

Cases: (a) the demo's default model (2x32 ReLU MLP on digits); (b) a 784-256-256-10 ReLU MLP on
`teacher` classification data; (c) a deep linear network 5-5-5-5 on `teacher` regression data.
Runs are interleaved and the median of --repeats is printed, so load from other processes affects all
alike. Targets: devinterp / fast >= 3x on (a), >= 1.5x on (b), >= 4x on (c); fast / bare <= 1.3 on
every case. PASS/FAIL is printed per target; the exit status is 0 either way (timings on a shared
machine vary).

Where drawing the noise alone costs more than 0.3 x bare (case (b) on a CPU: 4 x 269k Gaussians per
step from torch's generator, the fastest exact one found here, see docs/benchmarks.md), fast / bare <= 1.3 is
out of reach for any exact SGLD; the verdict is then FLOOR if fast is within 1.3x of bare+noise, the
floor, and FAIL otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyze.llc.calibrate import context_for  # noqa: E402
from analyze.llc.devinterp import sample_losses_devinterp  # noqa: E402
from analyze.llc.sampler import SGLDSettings, sample_losses  # noqa: E402
from trainer.checkpoints import checkpoint_name  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.experiment import run_experiment  # noqa: E402

EPOCHS = 3
CASES = {
    "a": ("demo MLP 64-32-32-10, digits", dict(dataset="digits", hidden_nodes=[32], hidden_layers=[2]), 3.0),
    "b": ("MLP 784-256-256-10, teacher", dict(dataset="teacher", teacher_input_dim=784, teacher_outputs=10,
                                              teacher_samples=3000, hidden_nodes=[256], hidden_layers=[2]), 1.5),
    "c": ("DLN 5-5-5-5, teacher regression", dict(dataset="teacher", model_type="dlnn", teacher_task="regression",
                                                  teacher_model_type="dlnn", teacher_input_dim=5, teacher_outputs=5,
                                                  teacher_hidden_nodes=5, teacher_hidden_layers=2,
                                                  teacher_noise_sigma=0.5, sgd_lr=1e-3,
                                                  hidden_nodes=[5], hidden_layers=[2]), 4.0),
}
BARE_TARGET = 1.3


def train_checkpoint(case: dict, out: Path) -> Path:
    cfg = TrainConfig(**{"experiment_type": "standard", "optimizer": "sgd", "num_epochs": EPOCHS, "sgd_lr": 0.01,
                         "seed": 1, "out": str(out), "quiet": True, **case})
    ((run, status),) = run_experiment(cfg, log=lambda *a: None).items()
    if status != "complete":
        raise SystemExit(f"bench_llc: training {run} ended {status}")
    return out / run / checkpoint_name(EPOCHS)


def bare_passes(ctx, settings: SGLDSettings, noise: bool = False) -> None:
    """chains x steps forward+backward passes on minibatches of the same size (and, with `noise`, one
    N(0, I) draw over all parameters per pass), nothing else."""
    model = ctx.model.eval()
    x, y = ctx.splits.train.x, ctx.splits.train.y
    g = torch.Generator().manual_seed(0)
    draw = torch.empty(sum(p.numel() for p in model.parameters()))
    for _ in range(settings.chains * settings.steps):
        idx = torch.randint(0, len(y), (settings.batch_size,), generator=g)
        model.zero_grad(set_to_none=True)
        ctx.loss_fn(model(x.index_select(0, idx)), y.index_select(0, idx)).backward()
        if noise:
            draw.normal_(generator=g)


def time_case(key: str, args, workdir: Path) -> dict:
    label, config, target = CASES[key]
    ctx = context_for(train_checkpoint(config, workdir / key))
    x, y = ctx.splits.train.x, ctx.splits.train.y
    n = len(y)
    P = sum(p.numel() for p in ctx.model.parameters())
    settings = SGLDSettings(lr=1e-5, localization=100.0, nbeta=n / math.log(n), chains=args.chains,
                            draws=args.draws, burnin=0, batch_size=128, seed=0)
    methods = {
        "fast": lambda: sample_losses(ctx.model, ctx.per_sample_loss, x, y, settings),
        "devinterp": lambda: sample_losses_devinterp(ctx.model, ctx.per_sample_loss, x, y, settings),
        "bare": lambda: bare_passes(ctx, settings),
        "bare+noise": lambda: bare_passes(ctx, settings, noise=True),
    }
    warm = dataclasses.replace(settings, draws=5)
    sample_losses(ctx.model, ctx.per_sample_loss, x, y, warm)  # imports, torch.func and devinterp set-up
    sample_losses_devinterp(ctx.model, ctx.per_sample_loss, x, y, warm)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for name, run in methods.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    median = {m: statistics.median(t) for m, t in times.items()}
    return dict(key=key, label=label, P=P, n=n, target=target, **median)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=4, help="SGLD chains (default: %(default)s)")
    parser.add_argument("--draws", type=int, default=200, help="steps per chain (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats; the median is shown (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as analyze workers)")
    parser.add_argument("--cases", default="a,b,c", help="which cases to run (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CASES]
    if unknown:
        parser.error(f"--cases: unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")

    with tempfile.TemporaryDirectory(prefix="bench-llc-") as tmp:
        results = [time_case(k, args, Path(tmp)) for k in keys]

    print(f"{args.chains} chains x {args.draws} SGLD steps, batch 128, {torch.get_num_threads()} thread(s), "
          f"median of {args.repeats} (seconds)")
    print(f"{'case':<38} {'P':>7} {'fast':>7} {'devinterp':>9} {'bare':>7} {'bare+noise':>10} "
          f"{'devinterp/fast':>15} {'vs devinterp':>12} {'fast/bare':>10} {'noise/bare':>10} "
          f"{'fast/(bare+noise)':>18} {'vs bare':>8}")
    verdicts, at_floor = [], []
    for r in results:
        speedup, overhead = r["devinterp"] / r["fast"], r["fast"] / r["bare"]
        noise_share, over_floor = r["bare+noise"] / r["bare"] - 1, r["fast"] / r["bare+noise"]
        fast_enough = "PASS" if speedup >= r["target"] else "FAIL"
        if overhead <= BARE_TARGET:
            lean = "PASS"
        elif noise_share > BARE_TARGET - 1 and over_floor <= BARE_TARGET:  # the noise alone exceeds the allowance
            lean = "FLOOR"
        else:
            lean = "FAIL"
        verdicts += [fast_enough, lean]
        if lean == "FLOOR":
            at_floor.append(f"({r['key']}), where the noise alone costs {noise_share:.2f} x bare and fast is "
                            f"{over_floor:.2f}x bare+noise")
        print(f"({r['key']}) {r['label']:<34} {r['P']:>7} {r['fast']:7.2f} {r['devinterp']:9.2f} {r['bare']:7.2f} "
              f"{r['bare+noise']:10.2f} {speedup:14.1f}x {fast_enough + ' >=' + format(r['target'], 'g'):>12} "
              f"{overhead:10.2f} {noise_share:10.2f} {over_floor:18.2f} {lean:>8}")
    print(f"targets: devinterp/fast as listed; fast/bare <= {BARE_TARGET} (FLOOR: the noise alone costs more than "
          f"{BARE_TARGET - 1:.1f} x bare, and fast is within {BARE_TARGET}x of bare+noise)")
    if "FAIL" in verdicts:
        print("some targets NOT met")
    elif at_floor:
        print(f"targets met, except fast/bare <= {BARE_TARGET}, out of reach for exact SGLD on " + "; ".join(at_floor))
    else:
        print("all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
