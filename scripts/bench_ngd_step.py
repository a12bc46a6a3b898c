"""Time one training step with NGD (exact and subspace refresh) against torch.optim.SGD on a 784-256-256-10 MLP.

Usage: python scripts/bench_ngd_step.py [--steps 60] [--warmup 12] [--batch 128] [--repeats 3]

Each timed step is a full forward + backward + optimizer step on random data
(batch 128, cross-entropy); SGD, NGD with refresh="exact" and NGD with
refresh="subspace" take turns step by step, so that load from other processes
affects all three alike.  NGD refreshes its Fisher estimates on steps 1-10 and
then every 4th step, so its per-step cost is bimodal: the median is a
non-refresh step, the mean over whole refresh cycles is the amortised cost
(the default 60 timed steps after 12 warm-up steps hold 15 cycles); "refresh
ms" is the median of the refresh steps alone.  Each number is the median over
the repeats (each a fresh set of models), and each ratio is taken within a
repeat.  PASS/FAIL (target NGD <= 3x SGD) is judged on the mean.  Torch's thread count is left as it is (OMP_NUM_THREADS sets it) and
printed; numbers depend on the machine and its load.  Always exits 0.
"""

from __future__ import annotations

import argparse
import copy
import math
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from trainer.optim import NGD  # noqa: E402
from trainer.optim.ngd import REFRESH_MODES  # noqa: E402

TARGET = 3.0


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(784, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )


def _refresh_step(step: int) -> bool:
    """NGD's refresh schedule (trainer.optim.ngd): steps 1-10, then every 4th."""
    return step <= 10 or (step - 10) % 4 == 0


def _time_steps(steps: int, warmup: int, batch: int, seed: int = 0) -> tuple[dict[str, list[float]], list[int]]:
    """Per-step seconds of SGD and of NGD in each refresh mode ({"sgd": [...], "exact": [...], ...}) and the step
    numbers, the optimizers taking turns step by step so that load spikes hit them alike."""
    torch.manual_seed(seed)
    base = _model()
    models = {"sgd": base, **{mode: copy.deepcopy(base) for mode in REFRESH_MODES}}
    opts = {"sgd": torch.optim.SGD(base.parameters(), lr=0.01, momentum=0.9, nesterov=True)}
    for mode in REFRESH_MODES:
        opts[mode] = NGD(models[mode].parameters(), lr=0.01, alpha=0.1, eta=0.9, epsilon=1e-10, delta=5e-4,
                         momentum=0.9, nesterov=True, refresh=mode)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed + 1)
    data = [
        (torch.randn(batch, 784, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
        for _ in range(8)
    ]

    def one_step(model, opt, x, y):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in models}
    step_ids = []
    for i in range(1, warmup + steps + 1):
        x, y = data[i % len(data)]
        for name in models:
            t = one_step(models[name], opts[name], x, y)
            if i > warmup:
                times[name].append(t)
        if i > warmup:
            step_ids.append(i)
    return times, step_ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="timed steps per optimizer (a multiple of 4 spans whole "
                                                          "refresh cycles)")
    ap.add_argument("--warmup", type=int, default=12, help="untimed steps first (>= 10 skips NGD's start-up refreshes)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="independent runs; the table shows their medians")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        ap.error("--steps and --repeats must be >= 1")

    rows: dict[str, list[tuple[float, ...]]] = {}
    for seed in range(args.repeats):
        times, ids = _time_steps(args.steps, args.warmup, args.batch, seed=seed)
        sgd = times["sgd"]
        for name, xs in times.items():
            refresh = [t for t, i in zip(xs, ids) if _refresh_step(i)] or [math.nan]
            rows.setdefault(name, []).append((
                statistics.median(xs), statistics.fmean(xs), statistics.median(refresh),
                statistics.median(xs) / statistics.median(sgd), statistics.fmean(xs) / statistics.fmean(sgd)))

    print(f"784-256-256-10 MLP, batch {args.batch}, {args.steps} timed steps (after {args.warmup} warm-up), "
          f"SGD and NGD interleaved, median of {args.repeats} repeat(s); torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'optimizer':<16}{'median ms':>10}{'mean ms':>10}{'refresh ms':>11}{'median/SGD':>12}{'mean/SGD':>10}"
          f"  target <= {TARGET:g}x on the mean")
    for name, values in rows.items():
        med, mean, refresh, ratio_med, ratio_mean = (statistics.median(col) for col in zip(*values))
        label = "SGD" if name == "sgd" else f"NGD {name}"
        verdict = "" if name == "sgd" else ("PASS" if ratio_mean <= TARGET else "FAIL")
        shown = f"{'-':>11}" if name == "sgd" else f"{1e3 * refresh:>11.2f}"
        print(f"{label:<16}{1e3 * med:>10.2f}{1e3 * mean:>10.2f}{shown}{ratio_med:>11.2f}x{ratio_mean:>9.2f}x"
              f"  {verdict}")
    return 0


if __name__ == "__main__":
    main()
    sys.exit(0)
