#!/usr/bin/env python
"""Time an estimator task on analyze's dask worker against the same task in-process.

Usage: python scripts/bench_worker.py [--repeats 3] [--draws 300]

Trains a 784-256-256-10 ReLU MLP on `teacher` data (bench_llc.py's case (b), the NGD-vs-SGD study's model
size), then runs the `llc` estimator on its checkpoint (2 chains, control-variate gradients, batch 64, the
study's calibrated kind of setting) through `analyze.run`:

  in-process   --workers 0: the task in this process, no dask
  dask worker  --workers 1: a LocalCluster worker process, as `analyze` runs every task by default

and compares the task's own time (the llc row's `seconds`: model, data, chains, lambda_max; not the
cluster's start-up), on two checkpoints, the faster of the two (a fresh worker's first task also pays its
one-off imports and set-up, which a long analysis pays once). Target: dask worker / in-process <= 1.15.
A third line shows why it once was not: the same SGLD chains in two fresh processes, one with
MALLOC_TRIM_THRESHOLD_=65536 in its environment (what dask's nanny gives its workers unless told
otherwise; analyze/runner.py's worker_environ drops it), one without. Runs are interleaved and the median of --repeats is printed; exit status 0 either way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import analyze  # noqa: E402
from bench_llc import CASES, train_checkpoint  # noqa: E402

TARGET = 1.15
DASK_TRIM = "65536"  # distributed's default distributed.nanny.pre-spawn-environ MALLOC_TRIM_THRESHOLD_

CHAINS_ONLY = """
import sys, time, torch
torch.set_num_threads(1)
from pathlib import Path
from analyze.llc.calibrate import context_for
from analyze.llc.sampler import SGLDSettings, sample_losses
ctx = context_for(Path(sys.argv[1]))
x, y = ctx.splits.train.x, ctx.splits.train.y
s = SGLDSettings(lr=1e-6, localization=1000.0, nbeta=1000.0, chains=2, draws=int(sys.argv[2]), burnin=0,
                 batch_size=64, seed=0, control_variate=True)
start = time.perf_counter()
sample_losses(ctx.model, ctx.per_sample_loss, x, y, s)
print(time.perf_counter() - start)
"""


def task_seconds(ckpt: Path, workers: int, draws: int, out: Path) -> float:
    with open(os.devnull, "w") as quiet, redirect_stdout(quiet), redirect_stderr(quiet):  # analyze's summary
        result = analyze.run(ckpt.parent.parent, "llc", out=str(out), workers=workers, force=True, report=False,
                             epochs="2,3", llc_chains=2, llc_draws=draws, llc_burnin=0, llc_lr="0.01/nbeta",
                             llc_localization="1000", llc_batch_size="64")
    return float(result.load()["llc"].seconds.min())  # of two tasks: the one after the process warmed up


def chains_seconds(ckpt: Path, draws: int, trim: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    env["OMP_NUM_THREADS"] = "1"
    if trim is not None:
        env["MALLOC_TRIM_THRESHOLD_"] = trim
    out = subprocess.run([sys.executable, "-c", CHAINS_ONLY, str(ckpt), str(draws)], env=env, check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.split()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each (default: %(default)s)")
    ap.add_argument("--draws", type=int, default=300, help="SGLD steps per chain (default: %(default)s)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = train_checkpoint(CASES["b"][1], Path(tmp) / "ckpts")
        times: dict[str, list[float]] = {k: [] for k in ("in-process", "dask worker", "trim", "no trim")}
        for _ in range(args.repeats):
            times["in-process"].append(task_seconds(ckpt, 0, args.draws, Path(tmp) / "a0"))
            times["dask worker"].append(task_seconds(ckpt, 1, args.draws, Path(tmp) / "a1"))
            times["trim"].append(chains_seconds(ckpt, args.draws, DASK_TRIM))
            times["no trim"].append(chains_seconds(ckpt, args.draws, None))
    m = {k: statistics.median(v) for k, v in times.items()}
    worker = m["dask worker"] / m["in-process"]
    print(f"\n{'measure':<58} {'seconds':>9} {'ratio':>6}  target")
    print(f"{'llc task, in-process (--workers 0)':<58} {m['in-process']:>9.2f}")
    print(f"{'llc task, dask worker (--workers 1)':<58} {m['dask worker']:>9.2f} {worker:>6.2f}  "
          f"<= {TARGET}: {'PASS' if worker <= TARGET else 'FAIL'}")
    print(f"{'SGLD chains, glibc defaults':<58} {m['no trim']:>9.2f}")
    print(f"{'SGLD chains, MALLOC_TRIM_THRESHOLD_=' + DASK_TRIM + ' (dask default)':<58} {m['trim']:>9.2f} "
          f"{m['trim'] / m['no trim']:>6.2f}  (what worker_environ avoids)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
