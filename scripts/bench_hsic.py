"""Time the HSIC information plane of one checkpoint of the study's HSIC network: ours vs a naive one.

Usage: python scripts/bench_hsic.py [--m 1000] [--naive-m 160] [--repeats 2]

Network: the seed study's `layers` model (conv2d 16 3x3 + flatten + dropout + dense 500 + dropout +
dense 200 + dropout + dense 10) on 28x28 inputs, random weights (seeded) and random N(0, 1) inputs.
Both implementations compute the same thing: the PyGlow statistic tr(K H L H)/(m - 1), Gaussian kernel
sigma = 5, Y = softmax output, every layer but the last, one batch of m probe samples, in float64:

  ours   analyze.estimators.hsic.HSICEstimator(preset="pyglow", probe=m, batch_size=m): pairwise squared
         distances by the Gram identity (O(m^2 + m d) memory), O(m^2) centring, each layer's kernel
         computed once inside a forward hook (a layer whose output is the same tensor as the previous
         one's, Flatten and eval-mode Dropout here, reuses it);
  ours (analyze.hsic, no reuse)  the layer outputs collected first, then analyze.hsic.information_plane:
         the same O(m^2) kernels, but every layer's kernel computed (no reuse across layers);
  naive  the layer outputs collected first, then per layer the m x m x d difference tensor, its norm,
         explicit H and tr(K H L H) by matrix products (O(m^2 d) memory, O(m^3) time); X's and Y's
         kernels are also computed once.

The conv layer's output has d = 16*28*28 = 12544, so the naive m x m x d float64 tensor needs
m^2 * 100 kB: 100 GB at m = 1000. The naive method therefore runs only at --naive-m (default 160:
2.6 GB), ours at the same m and at --m. Each measurement runs in a fresh subprocess (one torch thread)
that reports its best wall time of --repeats runs and its peak resident memory (getrusage maxrss; it
includes the interpreter, torch and the model, shown on the 'baseline' row: model + inputs + one
forward pass). Always exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = {"type": "layers", "input_shape": [1, 28, 28], "outputs": 10,
        "layers": ["conv2d:16:3:1:1:relu", "flatten", "dropout:0.4", "dense:500:relu", "dropout:0.4",
                   "dense:200:relu", "dropout:0.2", "dense:10"]}
SIGMA = 5.0
CONV_D = 16 * 28 * 28


def _setup(m: int):
    import torch

    from trainer.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    x = torch.randn(m, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    return model, x


def _ours(model, x) -> list[float]:
    import torch

    from analyze.catalog import CheckpointInfo

    from analyze.estimators.base import Context
    from analyze.estimators.hsic import HSICEstimator
    from trainer.data import Split, Splits

    m = len(x)
    split = Split(x, torch.zeros(m, dtype=torch.long))
    ctx = Context(model=model, checkpoint=CheckpointInfo("bench", "sgd", 0, 0, pathlib.Path("-"), "-", {}),
                  device=torch.device("cpu"), splits=Splits(split, split, split, "classification", (1, 28, 28), 10))
    frame = HSICEstimator(preset="pyglow", probe=m, batch_size=m).run(ctx)["hsic"]
    return [v for pair in zip(frame["hsic_x"], frame["hsic_y"]) for v in pair]


def _layer_outputs(model, x):
    """The probes in the estimator's order (a joint permutation does not change HSIC; kept for equality)
    and every top-level layer's output, flattened to (m, -1)."""
    import torch

    m = len(x)
    x = x[torch.randperm(m, generator=torch.Generator().manual_seed(0))]
    outs, h = [], x
    with torch.no_grad():
        for _, module in model.named_children():
            h = module(h)
            outs.append(h.reshape(m, -1))
    return x, outs


def _naive(model, x) -> list[float]:
    import torch

    m = len(x)
    x, outs = _layer_outputs(model, x)
    outs = [t.to(torch.float64) for t in outs]
    y = torch.softmax(outs[-1], dim=1)

    def kernel(a):
        z = a[:, None, :] - a[None, :, :]  # m x m x d
        d2 = z.pow_(2).sum(dim=2)
        del z
        return torch.exp(-d2 / (2 * SIGMA ** 2))

    H = torch.eye(m, dtype=torch.float64) - torch.full((m, m), 1.0 / m, dtype=torch.float64)

    def stat(K, L):
        return float(torch.trace(K @ H @ L @ H)) / (m - 1)

    KX, KY = kernel(x.reshape(m, -1).to(torch.float64)), kernel(y)
    values = []
    for t in outs[:-1]:
        KT = kernel(t)
        values += [stat(KT, KX), stat(KT, KY)]
    return values


def _ours_math(model, x) -> list[float]:
    import torch

    from analyze import hsic as hm

    x, outs = _layer_outputs(model, x)
    KY, _ = hm.gaussian_kernel(torch.softmax(outs[-1].to(torch.float64), dim=1), SIGMA)
    plane = hm.information_plane(x, KY, outs[:-1], kernel="gaussian", sigma=SIGMA, name="pyglow")
    return [v for pair in plane for v in pair]


def child(kind: str, m: int, repeats: int) -> None:
    model, x = _setup(m)
    fn = {"baseline": lambda mo, xx: [float(mo(xx).sum())], "ours": _ours, "ours_math": _ours_math,
          "naive": _naive}[kind]
    best, values = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        values = fn(model, x)
        best = min(best, time.perf_counter() - t0)
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    print(json.dumps({"seconds": best, "maxrss_mb": maxrss_kb / 1024, "values": values}))


def measure(kind: str, m: int, repeats: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--m", str(m), "--repeats", str(repeats)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=1000, help="probe size for our implementation")
    ap.add_argument("--naive-m", type=int, default=160, help="probe size at which both run (naive needs m^2 * 100 kB)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (best is reported)")
    ap.add_argument("--child", choices=("baseline", "ours", "ours_math", "naive"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.m, args.repeats)
        return 0

    def naive_gb(m):
        return m * m * CONV_D * 8 / 1e9

    print(f"HSIC information plane, study network (conv2d 16 + dense 500/200, 28x28), 7 layers, PyGlow statistic, "
          f"float64, 1 torch thread, best of {args.repeats}; each row a fresh process")
    print(f"naive m x m x d float64 difference tensor for the conv layer (d = {CONV_D}): "
          f"{naive_gb(args.naive_m):.1f} GB at m = {args.naive_m}, {naive_gb(args.m):.0f} GB at m = {args.m} (not run)")
    rows = [("baseline (model + forward)", "baseline", args.naive_m), ("ours (estimator)", "ours", args.naive_m),
            ("ours (analyze.hsic, no reuse)", "ours_math", args.naive_m), ("naive", "naive", args.naive_m),
            ("baseline (model + forward)", "baseline", args.m), ("ours (estimator)", "ours", args.m),
            ("ours (analyze.hsic, no reuse)", "ours_math", args.m)]
    results = {}
    print(f"{'implementation':<28}{'m':>6}{'seconds':>10}{'peak RSS MB':>13}")
    for label, kind, m in rows:
        r = measure(kind, m, args.repeats)
        results[(kind, m)] = r
        if "error" in r:
            print(f"{label:<28}{m:>6}   failed: {r['error']}")
        else:
            print(f"{label:<28}{m:>6}{r['seconds']:>10.3f}{r['maxrss_mb']:>13.0f}")
    print(f"{'naive':<28}{args.m:>6}   not run: needs {naive_gb(args.m):.0f} GB for one layer's differences")
    naive = results[("naive", args.naive_m)]
    for kind, label in (("ours", "ours (estimator)"), ("ours_math", "ours (analyze.hsic, no reuse)")):
        ours = results[(kind, args.naive_m)]
        if "error" not in ours and "error" not in naive:
            diff = max(abs(a - b) / max(abs(b), 1e-300) for a, b in zip(ours["values"], naive["values"]))
            print(f"at m = {args.naive_m}, naive / {label}: time {naive['seconds'] / ours['seconds']:.1f}x, peak RSS "
                  f"{naive['maxrss_mb']:.0f} vs {ours['maxrss_mb']:.0f} MB; largest relative difference of the "
                  f"{len(ours['values'])} coordinates {diff:.1e}")
    return 0


if __name__ == "__main__":
    main()
    sys.exit(0)
