"""Time the Hessian trace: default backend against pyhessian at an equal probe count, and trace_exact.

Usage: python scripts/bench_hessian.py [--probes 100] [--samples 1280] [--repeats 3] [--threads 1]

Model: a 784-256-256-10 ReLU MLP (seeded init) on random inputs and labels, cross-entropy, float32,
all samples in one batch. Timed, each from scratch (operator set-up included) and interleaved so that
load from other processes affects all alike; the median over repeats is printed:

  default hutchinson   the `hessian` estimator's default backend (curvlinops; quadratic forms by the
                       forward-mode Taylor pass) with Hutchinson and exactly --probes probes
  default hutch++      the same with Hutch++ (the estimator's default trace method)
  curvlinops hvp       Hutchinson on curvlinops' Hessian-vector products (engine=hvp)
  pyhessian            pyhessian 0.1's hvp (single-batch mode, cuda=False) in a loop over exactly
                       --probes Rademacher vectors (its own trace() stops early)
  trace_exact          the exact trace: BackPACK's DiagGGNExact (the diagonal GGN equals the
                       Hessian diagonal for ReLU nets with cross-entropy)

Targets: default hutchinson >= 1.5x faster than pyhessian; trace_exact >= 10x faster than the default
estimate. PASS/FAIL is printed; the exit status is 0 either way (timings on a shared machine are noisy).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from analyze.curvature.ggn import diag_ggn_trace  # noqa: E402
from analyze.curvature.operators import CurvlinopsOperator, PyHessianOperator  # noqa: E402
from analyze.curvature.trace import hutchinson, hutchpp  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--samples", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as analyze workers)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10)).eval()
    x = torch.randn(args.samples, 784)
    y = torch.randint(0, 10, (args.samples,))
    loss_fn = torch.nn.functional.cross_entropy
    batches, n = [(x, y)], args.samples
    P = sum(p.numel() for p in model.parameters())

    def stochastic(make_op, method):
        def run():
            op = make_op()
            try:
                estimate = hutchpp if method == "hutchpp" else hutchinson
                return estimate(op, args.probes, torch.Generator().manual_seed(1))
            finally:
                op.close()
        return run

    methods = {
        "default hutchinson": stochastic(lambda: CurvlinopsOperator(model, loss_fn, batches, n), "hutchinson"),
        "default hutch++": stochastic(lambda: CurvlinopsOperator(model, loss_fn, batches, n), "hutchpp"),
        "curvlinops hvp": stochastic(lambda: CurvlinopsOperator(model, loss_fn, batches, n, engine="hvp"),
                                     "hutchinson"),
        "pyhessian": stochastic(lambda: PyHessianOperator(model, loss_fn, batches, n), "hutchinson"),
        "trace_exact": lambda: (diag_ggn_trace(model, "classification", None, loss_fn, batches, n), 0.0),
    }
    # Warm-up with a few probes: first calls pay for imports and torch.func set-up.
    probes, args.probes = args.probes, 6
    for run in methods.values():
        run()
    args.probes = probes

    times: dict[str, list[float]] = {name: [] for name in methods}
    values: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeats):
        for name, run in methods.items():
            start = time.perf_counter()
            values[name] = run()
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"784-256-256-10 MLP, P = {P}, {args.samples} samples, {args.probes} probes, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}")
    print(f"{'method':<20} {'seconds':>8} {'trace':>12} {'stderr':>9}")
    for name in methods:
        trace, stderr = values[name]
        print(f"{name:<20} {median[name]:8.2f} {trace:12.4f} {stderr:9.4f}")
    speedup = median["pyhessian"] / median["default hutchinson"]
    exact_ratio = median["default hutchinson"] / median["trace_exact"]
    exact_ratio_pp = median["default hutch++"] / median["trace_exact"]
    print(f"pyhessian / default (hutchinson, equal probes): {speedup:5.2f}x  "
          f"[{'PASS' if speedup >= 1.5 else 'FAIL'}: target >= 1.5x]")
    print(f"pyhessian / curvlinops hvp:                    {median['pyhessian'] / median['curvlinops hvp']:5.2f}x")
    print(f"default hutchinson / trace_exact:              {exact_ratio:5.1f}x  "
          f"[{'PASS' if exact_ratio >= 10 else 'FAIL'}: target >= 10x]")
    print(f"default hutch++ / trace_exact:                 {exact_ratio_pp:5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
