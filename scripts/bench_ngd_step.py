"""Time one training step with NGD against torch.optim.SGD on a 784-256-256-10 MLP.

Usage: python scripts/bench_ngd_step.py [--steps 50] [--warmup 12] [--batch 128]

Each timed step is a full forward + backward + optimizer step on random data
(batch 128, cross-entropy); SGD and NGD steps alternate so that load from
other processes affects both alike.  NGD refreshes its Fisher estimates on
steps 1-10 and then every 4th step, so its per-step cost is bimodal: the
median is a non-refresh step, the mean is the amortised cost.  Both are
printed; PASS/FAIL (target NGD <= 3x SGD) is judged on the median.  Torch's
default thread count is kept (and printed), so numbers depend on the machine
and its load.  Always exits 0.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from trainer.optim import NGD  # noqa: E402

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


def _time_steps(steps: int, warmup: int, batch: int, seed: int = 0) -> tuple[list[float], list[float], list[int]]:
    """Per-step seconds for SGD and NGD, interleaved so load spikes hit both alike."""
    torch.manual_seed(seed)
    sgd_model = _model()
    ngd_model = copy.deepcopy(sgd_model)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    ngd = NGD(ngd_model.parameters(), lr=0.01, alpha=0.1, eta=0.9, epsilon=1e-10, delta=5e-4,
              momentum=0.9, nesterov=True)
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

    t_sgd, t_ngd, step_ids = [], [], []
    for i in range(1, warmup + steps + 1):
        x, y = data[i % len(data)]
        a = one_step(sgd_model, sgd, x, y)
        b = one_step(ngd_model, ngd, x, y)
        if i > warmup:
            t_sgd.append(a)
            t_ngd.append(b)
            step_ids.append(i)
    return t_sgd, t_ngd, step_ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50, help="timed steps per optimizer")
    ap.add_argument("--warmup", type=int, default=12, help="untimed steps first (>= 10 skips NGD's start-up refreshes)")
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")

    sgd, ngd, ids = _time_steps(args.steps, args.warmup, args.batch)
    refresh = [t for t, i in zip(ngd, ids) if _refresh_step(i)]
    plain = [t for t, i in zip(ngd, ids) if not _refresh_step(i)]

    def fmt(xs, f):
        return f"{1e3 * f(xs):>10.2f}" if xs else f"{'-':>10}"

    print(f"784-256-256-10 MLP, batch {args.batch}, {args.steps} timed steps (after {args.warmup} warm-up), "
          f"SGD and NGD interleaved; torch {torch.__version__}, {torch.get_num_threads()} threads (default)")
    print(f"{'ms/step':<26}{'median':>10}{'mean':>10}{'n':>6}")
    for name, xs in [("SGD", sgd), ("NGD (all steps)", ngd),
                     ("NGD, no refresh", plain), ("NGD, refresh steps", refresh)]:
        print(f"{name:<26}{fmt(xs, statistics.median)}{fmt(xs, statistics.fmean)}{len(xs):>6}")
    ratio_med = statistics.median(ngd) / statistics.median(sgd)
    ratio_mean = statistics.fmean(ngd) / statistics.fmean(sgd)
    verdict = "PASS" if ratio_med <= TARGET else "FAIL"
    print(f"NGD/SGD: median {ratio_med:.2f}x (target <= {TARGET:g}x: {verdict}); "
          f"mean, i.e. amortised over refreshes, {ratio_mean:.2f}x")
    return 0


if __name__ == "__main__":
    main()
    sys.exit(0)
