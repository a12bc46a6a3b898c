#!/usr/bin/env python
"""Trainer benchmarks, each a ratio against a baseline measured in the same run.

(a) Throughput of train-ckpts' loop (per-step loss/update-norm logging, progress bar, checkpoint,
    Parquet logs and resume state every epoch) over a bare PyTorch loop on the same model, data,
    batch size and batch order. Both evaluate validation and test once per epoch, as the study's loop
    did, so the ratio isolates the trainer's own bookkeeping. Target: >= 0.9.
(b) NGD step time over SGD step time (forward + backward + step) on a 784-256-256-10 MLP, batch 128,
    averaged over steps so that NGD's Fisher refreshes (every 4th step) count, for each refresh mode
    (--ngd-refresh exact and subspace). Target: <= 3x. scripts/bench_ngd_step.py breaks (b) down into
    refresh and plain steps.

Usage: python scripts/bench_trainer.py [--epochs 3] [--samples 60000] [--steps 60] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from trainer.config import TrainConfig
from trainer.data import Split, Splits
from trainer.experiment import RunPlan, RunTrainer, epoch_seed
from trainer.loop import evaluate
from trainer.losses import nll_loss
from trainer.models import build_model
from trainer.optim.factory import build_optimizer, optimizer_settings
from trainer.optim.ngd import REFRESH_MODES

sys.path.insert(0, str(Path(__file__).parent))
from bench_ngd_step import _time_steps  # noqa: E402  (scripts/ is not a package)

SPEC = {"type": "ffnn", "input_shape": [1, 28, 28], "outputs": 10, "hidden_nodes": 256, "hidden_layers": 2}


def synthetic_splits(samples: int) -> Splits:
    g = torch.Generator().manual_seed(0)
    def split(n):
        return Split(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
    return Splits(split(samples), split(samples // 6), split(samples // 6), "classification", (1, 28, 28), 10)


def bare_epochs(splits: Splits, cfg: TrainConfig, epochs: int) -> list[float]:
    torch.manual_seed(cfg.seed)
    model = build_model(SPEC)
    opt = build_optimizer(optimizer_settings("sgd", cfg), model.parameters())
    loss_fn, per_sample = nll_loss("classification"), nll_loss("classification", reduction="none")
    times = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch)))
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(splits.train.x[idx]), splits.train.y[idx]).backward()
            opt.step()
        evaluate(model, per_sample, splits.val)
        evaluate(model, per_sample, splits.test)
        times.append(time.perf_counter() - start)
    return times


def trainer_epochs(splits: Splits, cfg: TrainConfig, epochs: int, out: Path) -> list[float]:
    """Wall time of each epoch of train-ckpts' loop, checkpoint and log writes included."""
    # One extra epoch: durations are the gaps between consecutive per-epoch summary lines, so the first
    # epoch (which follows the initial evaluation and epoch-0 checkpoint) has no gap of its own.
    plan = RunPlan("bench-sgd", "bench", "standard", optimizer_settings("sgd", cfg), SPEC, 0, epochs + 1)
    stamps: list[float] = []
    trainer = RunTrainer(plan, cfg, splits, {"name": "synthetic"}, out / plan.name, torch.device("cpu"),
                         log=lambda line: stamps.append(time.perf_counter()))
    trainer.train()
    return [b - a for a, b in zip(stamps[:-1], stamps[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3, help="epochs per loop in (a)")
    ap.add_argument("--samples", type=int, default=60000, help="training samples in (a) (default: MNIST's 60000)")
    ap.add_argument("--steps", type=int, default=60, help="timed optimizer steps per optimizer in (b)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repetitions; the best time counts")
    args = ap.parse_args()
    cfg = TrainConfig(batch_size=128, sgd_lr=0.01, ngd_lr=0.01, quiet=True, seed=0)
    splits = synthetic_splits(args.samples)

    # Alternate baseline and measurement and keep the best time of each (as timeit does): background
    # load only ever adds time, so the minimum is the least disturbed estimate of both.
    bare_epochs(splits, cfg, 1)  # warm-up
    bare, ours, sgd, ngd = [], [], [], {mode: [] for mode in REFRESH_MODES}
    for rep in range(args.repeats):
        bare += bare_epochs(splits, cfg, args.epochs)
        with tempfile.TemporaryDirectory() as tmp:
            ours += trainer_epochs(splits, cfg, args.epochs, Path(tmp))
        # (b) reuses bench_ngd_step's interleaved timing; the mean amortises the Fisher refreshes.
        times, _ = _time_steps(args.steps, warmup=12, batch=128)
        sgd.append(statistics.mean(times["sgd"]))
        for mode in REFRESH_MODES:
            ngd[mode].append(statistics.mean(times[mode]))
    bare, ours, sgd = min(bare), min(ours), min(sgd)

    ratio_a = bare / ours
    print(f"threads: {torch.get_num_threads()}; model 784-256-256-10, batch 128")
    print(f"{'benchmark':<44}{'baseline':>12}{'measured':>12}{'ratio':>8}  target   result")
    print(f"{'(a) epoch: bare loop vs train-ckpts loop':<44}{bare:>11.3f}s{ours:>11.3f}s{ratio_a:>8.2f}  >= 0.90   "
          f"{'PASS' if ratio_a >= 0.9 else 'FAIL'}   (throughput of train-ckpts / bare)")
    for mode in REFRESH_MODES:
        t = min(ngd[mode])
        print(f"{'(b) step: SGD vs NGD, ' + mode + ' refresh':<44}{sgd * 1e3:>10.2f}ms{t * 1e3:>10.2f}ms{t / sgd:>8.2f}"
              f"  <= 3.00   {'PASS' if t / sgd <= 3 else 'FAIL'}   (NGD step time / SGD step time)")


if __name__ == "__main__":
    main()
