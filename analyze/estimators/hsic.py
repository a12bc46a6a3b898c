"""`hsic`: the HSIC information plane of one checkpoint, one row per layer (algorithms.md section 4).

For each top-level layer T_l of the model (`model.named_children()`), on a fixed seeded probe set drawn
from a held-out split, in eval mode:

    hsic_x = HSIC(X, T_l)   ("complexity": dependence of the representation on the input)
    hsic_y = HSIC(Y, T_l)   ("generalization": dependence on the labels, or on the network's output)

Defaults: normalized HSIC (CKA with the biased statistic), Gaussian kernels with a per-variable
median-heuristic bandwidth (median of the off-diagonal pairwise distances), labels through the delta
kernel 1[y_i = y_j]. `--hsic-preset pyglow` reproduces the PyGlow HSIC notebook's convention instead:
Gaussian sigma = 5 for every variable, statistic tr(KHLH)/(m-1) = (m-1) HSIC_b, Y = softmax output,
every layer but the last, averaged over minibatches of 64 (PyGlow's numbers scale with m). See
docs/hsic.md.

Activations are captured with forward hooks; each hook turns its layer's output into a centred m x m
kernel at once and keeps only the two statistics, so memory is a few m x m float64 matrices plus one
forward pass, whatever the depth. A layer whose output is the very same tensor as the previous layer's
(Dropout in eval mode, Flatten of a contiguous map) reuses the previous kernel.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from analyze import hsic as hm
from analyze.estimators.base import Context, Estimator, EstimatorError, Option

COLUMNS = {"layer": "int64", "layer_name": str, "hsic_x": float, "hsic_y": float, "estimator": str, "kernel": str,
           "sigma_x": float, "sigma_y": float, "sigma_t": float, "y_source": str, "n_probe": "int64"}
# What --hsic-preset pyglow fixes, and the batch size it uses unless --hsic-batch-size is given.
PYGLOW = {"estimator": "pyglow", "kernel": "gaussian", "sigma": "5", "y": "output"}
PYGLOW_BATCH = 64  # the seed notebook's minibatch size
SIGMA_WORDS = ("median", "kornblith")


class HSICEstimator(Estimator):
    name = "hsic"
    tables = ("hsic",)
    version = 1
    options = (
        Option("probe", int, 1000, "probe-set size: a fixed seeded sample of the split (all of it if smaller; "
                                   "the table's n_probe says how many were used)"),
        Option("split", str, "val", "split the probe set is drawn from", choices=("train", "val", "test")),
        Option("estimator", str, "normalized",
               "statistic: normalized (CKA, biased HSIC), debiased (CKA with the unbiased HSIC), biased "
               "(tr(KHLH)/(m-1)^2), unbiased (Song et al. 2012), pyglow (tr(KHLH)/(m-1))",
               choices=("normalized", "debiased", "biased", "unbiased", "pyglow")),
        Option("kernel", str, "gaussian", "kernel on inputs, layer outputs and (with --hsic-y output) Y",
               choices=("gaussian", "linear")),
        Option("sigma", str, "median",
               "Gaussian bandwidth, per variable: median (median of the off-diagonal pairwise distances), "
               "kornblith (sigma^2 = 0.5^2 * median of all squared distances, diagonal included: Kornblith "
               "et al.'s CKA code), or an absolute number such as 5"),
        Option("y", str, "labels", "Y: labels (delta kernel; regression targets use --hsic-kernel) or output "
                                   "(the network's output, softmax probabilities for classifiers)",
               choices=("labels", "output")),
        Option("layers", str, "all", "all, or a comma list of layer names (model.named_children()); "
                                     "all excludes the last layer when --hsic-y output"),
        Option("preset", str, "none", "pyglow: Gaussian sigma 5 everywhere, statistic tr(KHLH)/(m-1), Y = "
                                      "softmax output, every layer but the last, batches of 64",
               choices=("none", "pyglow")),
        Option("batch_size", int, 0, "0: the whole probe set is one sample; K >= 4: average the statistics over "
                                     "the probe set's floor(probe / K) consecutive batches of K "
                                     "(0 means 64 with --hsic-preset pyglow)"),
        Option("seed", int, 0, "seed of the probe-set selection"),
    )

    def __init__(self, **values):
        self._explicit = frozenset(values)
        super().__init__(**values)

    # ------------------------------------------------------------------------------------ options
    def validate(self) -> None:
        o = self.opts
        if o["probe"] < 4:
            raise EstimatorError("--hsic-probe: must be at least 4")
        if o["batch_size"] < 0 or 0 < o["batch_size"] < 4:
            raise EstimatorError("--hsic-batch-size: must be 0 (whole probe set) or at least 4")
        if o["preset"] == "pyglow":
            explicit = getattr(self, "_explicit", frozenset())
            for key, value in PYGLOW.items():
                if key in explicit and not _same_value(key, o[key], value):
                    raise EstimatorError(f"--hsic-{key}: the pyglow preset fixes it to {value!r} "
                                         f"(got {o[key]!r}); drop the option or use --hsic-preset none")
            o.update(PYGLOW)
            if o["batch_size"] == 0:
                o["batch_size"] = PYGLOW_BATCH
        sigma = o["sigma"].strip().lower()
        if sigma not in SIGMA_WORDS:
            try:
                value = float(sigma)
            except ValueError:
                raise EstimatorError(f"--hsic-sigma: {o['sigma']!r} is not median, kornblith or a number") from None
            if not (value > 0 and math.isfinite(value)):
                raise EstimatorError(f"--hsic-sigma: {o['sigma']!r} must be a positive number")
        if o["kernel"] == "linear" and sigma != "median":
            raise EstimatorError("--hsic-sigma: applies to the gaussian kernel only (--hsic-kernel linear)")
        layers = o["layers"].strip()
        if not layers or (layers != "all" and not all(p.strip() for p in layers.split(","))):
            raise EstimatorError(f"--hsic-layers: {o['layers']!r} is not 'all' or a comma list of layer names")

    # -------------------------------------------------------------------------------------- run
    def run(self, ctx: Context) -> dict[str, pd.DataFrame]:
        o = self.opts
        model = ctx.model
        split = ctx.splits.split(o["split"])
        n = len(split)
        if n < 4:
            raise ValueError(f"hsic: the {o['split']} split has {n} samples; HSIC needs at least 4")
        probe = torch.randperm(n, generator=torch.Generator().manual_seed(o["seed"]))[:min(o["probe"], n)]
        size = min(o["batch_size"] or len(probe), len(probe))
        n_batches = len(probe) // size

        children = list(model.named_children())
        if not children:
            raise ValueError("hsic: the model has no named child modules to take layer outputs from")
        chosen = self._layers([name for name, _ in children])
        classification = ctx.splits.task == "classification"

        sums: dict[str, list[float]] = {}
        was_training = model.training
        model.eval()
        try:
            for b in range(n_batches):
                index = probe[b * size:(b + 1) * size]
                x, y = split.x[index].to(ctx.device), split.y[index].to(ctx.device)
                for name, values in self._one_batch(model, children, chosen, x, y, classification).items():
                    acc = sums.setdefault(name, [0.0] * len(values))
                    for i, v in enumerate(values):
                        acc[i] += v
        finally:
            model.train(was_training)

        rows = []
        for index, (name, _) in enumerate(children):
            if name not in chosen:
                continue
            hx, hy, sx, sy, st = (v / n_batches for v in sums[name])
            rows.append({"layer": index, "layer_name": name, "hsic_x": hx, "hsic_y": hy, "estimator": o["estimator"],
                         "kernel": o["kernel"], "sigma_x": sx, "sigma_y": sy, "sigma_t": st, "y_source": o["y"],
                         "n_probe": n_batches * size})
        return {"hsic": pd.DataFrame(rows, columns=list(COLUMNS)).astype(COLUMNS)}

    def _layers(self, names: list[str]) -> list[str]:
        spec = self.opts["layers"].strip()
        if spec == "all":
            return names[:-1] if self.opts["y"] == "output" else names
        wanted = [p.strip() for p in spec.split(",")]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise EstimatorError(f"--hsic-layers: no layer {', '.join(map(repr, unknown))} in this model "
                                 f"(layers: {', '.join(names)})")
        return [name for name in names if name in wanted]

    def _kernel(self, a: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Kernel matrix of the rows of `a` (flattened, float64) and the bandwidth used (NaN for linear)."""
        a = a.detach().reshape(a.shape[0], -1).to(torch.float64)
        if self.opts["kernel"] == "linear":
            return hm.linear_kernel(a), math.nan
        sigma = self.opts["sigma"].strip().lower()
        if sigma == "median":
            return hm.gaussian_kernel(a, "median", median_pairs="offdiag")
        if sigma == "kornblith":
            return hm.gaussian_kernel(a, "median", median_pairs="all", median_scale=0.5)
        return hm.gaussian_kernel(a, float(sigma))

    @torch.no_grad()
    def _one_batch(self, model, children, chosen, x, y, classification) -> dict[str, tuple[float, ...]]:
        """name -> (hsic_x, hsic_y, sigma_x, sigma_y, sigma_t) for one batch of probe samples."""
        stat = self.opts["estimator"]
        unbiased = stat in ("unbiased", "debiased")
        kx, sigma_x = self._kernel(x)
        px = hm.prepare(kx, unbiased)
        del kx
        if self.opts["y"] == "labels":
            if classification:
                ky, sigma_y = hm.delta_kernel(y), math.nan
            else:
                ky, sigma_y = self._kernel(y)
        else:  # a first pass for Y; the hooked pass below then needs only one layer's kernel at a time
            out = model(x)
            ky, sigma_y = self._kernel(torch.softmax(out.to(torch.float64), dim=1) if classification else out)
        py = hm.prepare(ky, unbiased)
        del ky

        results: dict[str, tuple[float, ...]] = {}
        previous: list = []  # [output tensor, its version, result] of the last hooked layer

        def make_hook(name: str):
            def hook(module, inputs, output):
                if not isinstance(output, torch.Tensor):
                    raise TypeError(f"hsic: layer {name!r} returns {type(output).__name__}, not a tensor")
                if previous and _same_tensor(previous[0], previous[1], output):
                    result = previous[2]
                else:
                    k, sigma_t = self._kernel(output)
                    pt = hm.prepare(k, unbiased)
                    del k
                    result = (hm.statistic(pt, px, stat), hm.statistic(pt, py, stat), sigma_t)
                results[name] = (result[0], result[1], sigma_x, sigma_y, result[2])
                previous[:] = [output, _version(output), result]
            return hook

        handles = []
        try:
            for name, module in children:
                if name in chosen:
                    handles.append(module.register_forward_hook(make_hook(name)))
            model(x)
        finally:
            for h in handles:
                h.remove()
            previous.clear()
        missing = [name for name in chosen if name not in results]
        if missing:
            raise ValueError(f"hsic: layer(s) {', '.join(missing)} did not run in the model's forward pass")
        return results


def _same_value(key: str, given, fixed) -> bool:
    if key == "sigma":
        try:
            return float(given) == float(fixed)
        except ValueError:
            return False
    return given == fixed


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors track no version: never treat them as unchanged
        return None


def _same_tensor(prev: torch.Tensor, prev_version: int | None, out: torch.Tensor) -> bool:
    """True if `out` flattens to exactly the rows `prev` flattened to, unmodified since (Dropout in eval
    mode returns its input; Flatten returns a view of a contiguous input)."""
    if prev_version is None or _version(out) != prev_version or _version(prev) != prev_version:
        return False
    return (out.device == prev.device and out.dtype == prev.dtype and out.numel() == prev.numel()
            and out.shape[0] == prev.shape[0] and out.is_contiguous() and prev.is_contiguous()
            and out.data_ptr() == prev.data_ptr())
