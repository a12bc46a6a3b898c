"""Tests of analyze.estimators.hessian against the dense Hessian from torch.func.hessian."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from analyze.catalog import CheckpointInfo
from analyze.curvature.ggn import diag_ggn_batch_traces, ggn_diagonal_applies, subsample_stderr
from analyze.curvature.operators import CurvlinopsOperator, PyHessianOperator
from analyze.curvature.samples import batches_of, training_subset
from analyze.curvature.spectrum import bottom_eigenvalues, lanczos, slq_rank, top_eigenvalues
from analyze.curvature.taylor import TaylorQuadratic
from analyze.curvature.trace import hutchinson, rademacher
from analyze.estimators.base import Context, EstimatorError
from analyze.estimators.hessian import HessianEstimator
from trainer.checkpoints import load_model
from trainer.data import Split, Splits, load_dataset
from trainer.losses import nll_loss
from trainer.models import build_model

from helpers import reference_gradient, reference_hessian

SAMPLES = 600  # fewer than the default 1280 to keep the float64 reference Hessian quick
DIGITS = {"name": "digits", "split_seed": 0, "val_fraction": 0.15, "test_fraction": 0.2}


def make_ctx(model, splits, meta=None) -> Context:
    return Context(model=model.eval(), checkpoint=CheckpointInfo("run", "sgd", 0, 0, Path("ckpt"), "hash", meta or {}),
                   device=torch.device("cpu"), splits=splits,
                   loss_fn=nll_loss(splits.task, splits.noise_sigma),
                   per_sample_loss=nll_loss(splits.task, splits.noise_sigma, reduction="none"))


@pytest.fixture(scope="module")
def digits_ctx(tmp_path_factory, make_ckpts) -> Context:
    """A 64 -> 24 -> 10 ReLU MLP (1810 parameters) trained 5 epochs on digits by the real trainer."""
    out = make_ckpts(tmp_path_factory.mktemp("hess") / "ckpts", hidden_nodes=[24], hidden_layers=[1],
                     experiment_type="standard", optimizer="sgd", num_epochs=5, sgd_lr=0.05)
    path = sorted(out.glob("*/epoch-0005.safetensors"))[0]
    model, ckpt = load_model(path)
    return make_ctx(model, load_dataset(ckpt.meta["dataset_spec"]), ckpt.meta)


@pytest.fixture(scope="module")
def digits_reference(digits_ctx):
    Hm = reference_hessian(digits_ctx, SAMPLES)
    eigs = torch.linalg.eigvalsh(Hm).numpy()
    return {"H": Hm, "trace": Hm.trace().item(), "eigs": eigs[::-1].copy(),
            "rank": int(np.sum(np.abs(eigs) > 1e-2 * eigs[-1]))}


def test_exact_path_matches_torch_func_hessian(digits_ctx, digits_reference):
    out = HessianEstimator(samples=SAMPLES).run(digits_ctx)
    row = out["hessian"].iloc[0]
    ref = digits_reference
    assert row.n_params == 1810 and row.n_samples == SAMPLES
    assert row.rank_method == "exact" and row.trace_method == "hutchpp" and row.backend == "curvlinops"
    assert row.engine == "taylor"
    # diag(H) = diag(GGN) for a ReLU net with cross-entropy: BackPACK's exact GGN diagonal
    assert row.trace_exact_applies and row.trace_exact_method == "diag_ggn"
    assert row.trace_exact == pytest.approx(ref["trace"], rel=1e-5)
    assert abs(row.trace - ref["trace"]) < 3 * row.trace_stderr
    assert row.trace_stderr < 0.05 * ref["trace"]
    np.testing.assert_allclose(row.top_eigenvalues, ref["eigs"][:5], rtol=1e-5)
    assert row.lambda_max == pytest.approx(ref["eigs"][0], rel=1e-5)
    assert row.rank_estimate == ref["rank"] == row.rank_locked
    spectrum = out["hessian_spectrum"]
    assert len(spectrum) == 1810 and (spectrum.slq_run == 0).all()
    assert spectrum.weight.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(np.sort(spectrum.node), np.sort(ref["eigs"]), atol=1e-5 * ref["eigs"][0])


def test_lanczos_path_matches_torch_func_hessian(digits_ctx, digits_reference):
    """Forced SLQ (exact_below=0): Hutchinson, eigsh and the rank against the dense reference."""
    out = HessianEstimator(samples=SAMPLES, exact_below=0, trace_method="hutchinson").run(digits_ctx)
    row = out["hessian"].iloc[0]
    ref = digits_reference
    assert row.rank_method == "slq" and row.n_probes == 100
    assert row.trace_exact == pytest.approx(ref["trace"], rel=1e-5)
    assert abs(row.trace - ref["trace"]) < 3 * row.trace_stderr
    assert row.lambda_max == pytest.approx(ref["eigs"][0], rel=1e-4)
    np.testing.assert_allclose(row.top_eigenvalues, ref["eigs"][:5], rtol=1e-4)
    assert abs(row.rank_estimate - ref["rank"]) <= 0.1 * ref["rank"]
    spectrum = out["hessian_spectrum"]
    assert sorted(spectrum.slq_run.unique()) == [0, 1]
    np.testing.assert_allclose(spectrum.groupby("slq_run").weight.sum(), 1.0, rtol=1e-6)
    # rank = P * (weight above the cut), run by run, averaged
    cut = 1e-2 * row.lambda_max
    per_run = spectrum[spectrum.node.abs() > cut].groupby("slq_run").weight.sum() * 1810
    assert per_run.mean() == pytest.approx(row.rank_estimate)


def test_fast_curvature_mode_is_the_exact_trace_and_the_top_eigenvalue(digits_ctx, digits_reference):
    """--hessian-trace-method exact --hessian-spectrum false --hessian-top-k 1, the per-checkpoint mode of
    large studies: the diagonal Gauss-Newton trace (= Tr(H) on a ReLU net) and lambda_max, no SLQ."""
    out = HessianEstimator(samples=SAMPLES, batch_size=120, trace_method="exact", spectrum=False,  # no dense H either
                           top_k=1).run(digits_ctx)
    row = out["hessian"].iloc[0]
    assert row.trace == pytest.approx(digits_reference["trace"], rel=1e-5)
    assert row.trace == row.trace_exact and row.n_probes == 0
    assert row.lambda_max == pytest.approx(digits_reference["eigs"][0], rel=1e-4)
    assert list(row.top_eigenvalues) == [row.lambda_max]
    assert math.isnan(row.rank_estimate) and row.rank_method == "" and len(out["hessian_spectrum"]) == 0
    # its error bar: the standard error of a mean over the 600 samples, from 5 batches of 120; against the
    # per-sample traces' own standard deviation / sqrt(600) (batch means have 4 degrees of freedom: loose)
    x, y = training_subset(digits_ctx, SAMPLES, 0)
    per_sample = diag_ggn_batch_traces(digits_ctx.model, "classification", None, digits_ctx.loss_fn,
                                         batches_of(x, y, 1), SAMPLES)
    assert per_sample.mean() == pytest.approx(row.trace, rel=1e-5)
    independent = per_sample.std(ddof=1) / math.sqrt(SAMPLES)
    assert independent / 2.5 < row.trace_stderr == row.trace_exact_stderr < independent * 2.5
    sums = per_sample.reshape(5, -1).sum(1)
    assert subsample_stderr(sums, batches_of(x, y, 120)) == pytest.approx(
        (sums / 120).std(ddof=1) / math.sqrt(5))  # equal batches: the plain batch-means formula
    tanh = make_ctx(_layers_model(["flatten", "dense:8:tanh", "dense:10"]), digits_ctx.splits)
    with pytest.raises(EstimatorError, match="--hessian-trace-method exact"):
        HessianEstimator(samples=50, trace_method="exact").run(tanh)


def test_plain_slq_rank_is_noisy_and_deflation_fixes_it(digits_ctx, digits_reference):
    """Why the SLQ is deflated: plain SLQ's rank scatters by ~sqrt(2/rank) per run at any step count."""
    x, y = training_subset(digits_ctx, SAMPLES, 0)
    op = CurvlinopsOperator(digits_ctx.model, digits_ctx.loss_fn, [(x, y)], SAMPLES)
    cut = 1e-2 * digits_reference["eigs"][0]
    gen = torch.Generator().manual_seed(5)
    tridiagonals, _, _ = lanczos(op, 150, rademacher(4, op.P, gen, op.dtype, op.device))
    plain = []
    for T in tridiagonals:
        nodes, vecs = np.linalg.eigh(T)
        plain.append(op.P * (vecs[0] ** 2)[np.abs(nodes) > cut].sum())
    assert np.std(plain) > 0.03 * digits_reference["rank"]
    rank, locked, _ = slq_rank(op, 150, 2, cut, torch.Generator().manual_seed(5))
    assert locked > 0.8 * digits_reference["rank"]
    assert abs(rank - digits_reference["rank"]) <= 0.05 * digits_reference["rank"]


def test_bottom_eigenvalue_and_localization_margin_match_the_dense_hessian(digits_ctx, digits_reference):
    """lambda_min by Lanczos (which="SA") against the dense Hessian's smallest eigenvalue: a net 5 epochs into
    training is not at a minimum, so it is negative; the localization margin gamma + nbeta lambda_min says which
    localizations hold chains against that downward curvature."""
    from analyze.llc.stability import bottom_hessian_eigenvalue, localization_margin

    smallest = digits_reference["eigs"][-1]
    assert smallest < -1e-3 * digits_reference["eigs"][0]  # a real negative curvature, not rounding
    x, y = training_subset(digits_ctx, SAMPLES, 0)
    op = CurvlinopsOperator(digits_ctx.model, digits_ctx.loss_fn, [(x, y)], SAMPLES, engine="hvp")
    try:
        np.testing.assert_allclose(bottom_eigenvalues(op, 2, 0), digits_reference["eigs"][::-1][:2], rtol=2e-3)
    finally:
        op.close()
    lambda_min = bottom_hessian_eigenvalue(digits_ctx, samples=SAMPLES)
    assert lambda_min == pytest.approx(smallest, rel=2e-3)
    nbeta = 100.0
    assert localization_margin(-2 * nbeta * smallest, nbeta, lambda_min) > 0
    assert localization_margin(-0.5 * nbeta * smallest, nbeta, lambda_min) < 0


def test_gradient_offset_matches_the_dense_quadratic_model(digits_ctx, digits_reference):
    """The LLC's downward shift at a checkpoint that is not stationary, (nbeta^2 / 2)(g'x + gamma |x|^2) with
    x = (nbeta H + gamma I)^-1 g, by CG on curvlinops' products against the dense float64 solve; where gamma is
    below -nbeta lambda_min, no offset but a direction of curvature below -gamma / nbeta (and above lambda_min)."""
    from analyze.llc.stationarity import gradient_offset

    H = digits_reference["H"]
    g = reference_gradient(digits_ctx, SAMPLES)
    nbeta, smallest = 100.0, float(digits_reference["eigs"][-1])
    gamma = -2 * nbeta * smallest  # A positive definite
    x = torch.linalg.solve(nbeta * H + gamma * torch.eye(len(g), dtype=H.dtype), g)
    dense = 0.5 * nbeta ** 2 * float(g @ x + gamma * x @ x)
    # the same shift as the Gaussian's E[nbeta (L - L*)] minus its curvature share, computed the long way
    mu, cov = -nbeta * x, torch.linalg.inv(nbeta * H + gamma * torch.eye(len(g), dtype=H.dtype))
    long_way = nbeta * float(g @ mu + 0.5 * mu @ H @ mu)
    assert -long_way == pytest.approx(dense, rel=1e-9) and float(torch.trace(H @ cov)) > 0
    result = gradient_offset(digits_ctx, nbeta, gamma, samples=SAMPLES, rtol=1e-6)
    assert result.grad_norm == pytest.approx(float(g.norm()), rel=1e-4)
    assert result.offset == pytest.approx(dense, rel=1e-3) and math.isnan(result.negative_curvature)
    below = gradient_offset(digits_ctx, nbeta, -0.5 * nbeta * smallest, samples=SAMPLES)
    assert math.isnan(below.offset)
    assert smallest * (1 + 1e-3) <= below.negative_curvature < 0.5 * smallest


def test_pyhessian_backend_agrees_with_default(digits_ctx, digits_reference):
    x, y = training_subset(digits_ctx, SAMPLES, 0)
    default = CurvlinopsOperator(digits_ctx.model, digits_ctx.loss_fn, [(x, y)], SAMPLES)
    pyh = PyHessianOperator(digits_ctx.model, digits_ctx.loss_fn, [(x, y)], SAMPLES)
    try:
        # Same seed, same probes: the same numbers up to float rounding.
        same_a = hutchinson(default, 100, torch.Generator().manual_seed(1))
        same_b = hutchinson(pyh, 100, torch.Generator().manual_seed(1))
        assert same_a[0] == pytest.approx(same_b[0], rel=1e-5)
        # Independent probes: within 3 combined standard errors.
        t_a, se_a = hutchinson(default, 100, torch.Generator().manual_seed(2))
        t_b, se_b = hutchinson(pyh, 100, torch.Generator().manual_seed(3))
        assert abs(t_a - t_b) < 3 * math.hypot(se_a, se_b)
        assert abs(t_b - digits_reference["trace"]) < 3 * se_b
        # Largest algebraic eigenvalues through pyhessian's hvp too.
        np.testing.assert_allclose(top_eigenvalues(pyh, 3, 0), digits_reference["eigs"][:3], rtol=1e-4)
    finally:
        pyh.close()
    # pyhessian ran on a copy: no graph-carrying gradients left on the checkpoint's model
    assert all(p.grad is None for p in digits_ctx.model.parameters())


def test_pyhessian_estimator_row_and_dataloader_mode():
    torch.manual_seed(0)
    splits = load_dataset(DIGITS)
    model = build_model({"type": "ffnn", "input_shape": [1, 8, 8], "outputs": 10, "hidden_nodes": 6,
                         "hidden_layers": 1})
    ctx = make_ctx(model, splits)
    common = dict(samples=200, trace_method="hutchinson", probes=30, seed=4)
    a = HessianEstimator(**common).run(ctx)["hessian"].iloc[0]
    # several batches: pyhessian's dataloader mode (size-weighted mean over batches)
    b = HessianEstimator(backend="pyhessian", batch_size=64, **common).run(ctx)["hessian"].iloc[0]
    assert b.backend == "pyhessian" and b.engine == "hvp" and b.n_probes == 30
    assert b.trace == pytest.approx(a.trace, rel=1e-4)  # same seed: same probes
    assert b.trace_exact == pytest.approx(a.trace_exact, rel=1e-5)
    np.testing.assert_allclose(b.top_eigenvalues, a.top_eigenvalues, rtol=1e-4)
    assert b.rank_estimate == a.rank_estimate


def _layers_model(layers, input_shape=(1, 8, 8), outputs=10):
    return build_model({"type": "layers", "input_shape": list(input_shape), "outputs": outputs, "layers": layers})


TAYLOR_MODELS = {
    "conv-maxpool-dropout": lambda: _layers_model(["conv2d:3:3:1:1:relu", "maxpool2d:2", "flatten", "dropout:0.3",
                                                   "dense:7:relu", "dense:10"]),
    "lenet": lambda: build_model({"type": "cnn", "input_shape": [1, 8, 8], "outputs": 10, "extra_layers": 0}),
    "tanh-sigmoid": lambda: _layers_model(["flatten", "dense:9:tanh", "dense:7:sigmoid", "dense:10"]),
    "relu-mlp": lambda: build_model({"type": "ffnn", "input_shape": [1, 8, 8], "outputs": 10, "hidden_nodes": 7,
                                     "hidden_layers": 2}),
    "leaky": lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.LeakyReLU(0.1),
                                         torch.nn.Linear(8, 10)),
}


@pytest.mark.parametrize("name", sorted(TAYLOR_MODELS))
def test_taylor_quadratic_forms_equal_hvp(name):
    """The forward-mode quadratic forms v^T H v equal v^T (H v) from curvlinops (float64)."""
    torch.manual_seed(1)
    model = TAYLOR_MODELS[name]().double().eval()
    splits = load_dataset(DIGITS)
    x, y = splits.train.x[:50].double(), splits.train.y[:50]
    loss = nll_loss("classification")
    op = CurvlinopsOperator(model, loss, [(x[:30], y[:30]), (x[30:], y[30:])], 50)
    assert op.engine == "taylor"
    V = torch.randn(op.P, 5, dtype=torch.float64)
    V[:, 0] = rademacher(1, op.P, torch.Generator().manual_seed(0), torch.float64, "cpu")[:, 0]
    expected = (V * op.matmat(V)).sum(dim=0)
    torch.testing.assert_close(op.quadratic(V), expected, rtol=1e-9, atol=1e-12)


def test_taylor_regression_loss():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    loss = nll_loss("regression", 0.3)
    op = CurvlinopsOperator(model, loss, [(x, y)], 40)
    V = torch.randn(op.P, 4, dtype=torch.float64)
    torch.testing.assert_close(op.quadratic(V), (V * op.matmat(V)).sum(dim=0), rtol=1e-9, atol=1e-12)
    assert CurvlinopsOperator(model, loss, [(x, y)], 40, engine="hvp").engine == "hvp"


def _teacher_regression():
    return load_dataset({"name": "teacher", "split_seed": 0, "val_fraction": 0.15, "test_fraction": 0.2,
                         "task": "regression", "samples": 300, "input_dim": 5, "outputs": 2, "noise_sigma": 0.3,
                         "teacher_model": {"type": "ffnn", "input_shape": [5], "outputs": 2, "hidden_nodes": 4,
                                           "hidden_layers": 1}})


@pytest.mark.parametrize("case", ["conv", "regression", "tanh"])
def test_trace_exact_where_it_applies(case):
    torch.manual_seed(3)
    if case == "regression":
        splits = _teacher_regression()
        model = build_model({"type": "ffnn", "input_shape": [5], "outputs": 2, "hidden_nodes": 8,
                             "hidden_layers": 2})
    else:
        splits = load_dataset(DIGITS)
        layers = (["conv2d:2:3:1:1:relu", "maxpool2d:2", "flatten", "dropout:0.4", "dense:5:relu", "dense:10"]
                  if case == "conv" else ["flatten", "dense:8:tanh", "dense:10"])
        model = _layers_model(layers)
    ctx = make_ctx(model, splits)
    ref = reference_hessian(ctx, 120).trace().item()
    row = HessianEstimator(samples=120, probes=30, dtype="float64").run(ctx)["hessian"].iloc[0]
    if case == "tanh":  # f is not piecewise linear in each weight: only the dense trace is exact
        assert not row.trace_exact_applies and row.trace_exact_method == "dense"
        nan_row = HessianEstimator(samples=120, probes=30, exact_below=0, lanczos_steps=20, slq_runs=1).run(ctx)
        assert math.isnan(nan_row["hessian"].trace_exact.iloc[0])
        assert not nan_row["hessian"].trace_exact_applies.iloc[0]
    else:
        assert row.trace_exact_applies and row.trace_exact_method == "diag_ggn"
    assert row.trace_exact == pytest.approx(ref, rel=1e-8)
    assert abs(row.trace - ref) < 3 * row.trace_stderr


def test_applicability_rules():
    relu = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    assert ggn_diagonal_applies(relu)
    shared = torch.nn.Linear(3, 3)
    assert not ggn_diagonal_applies(torch.nn.Sequential(shared, torch.nn.ReLU(), shared))
    assert not ggn_diagonal_applies(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.GELU()))

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) * self.fc(x)

    assert not ggn_diagonal_applies(Custom())
    assert TaylorQuadratic.build(Custom(), list(Custom().parameters()), None, [], 1) is None
    # End to end on a model that is not a Sequential: curvlinops products, dense exact trace.
    torch.manual_seed(0)
    x, y = torch.randn(60, 3), torch.randint(0, 3, (60,))
    split = Split(x, y)
    ctx = make_ctx(Custom(), Splits(split, split, split, task="classification", input_shape=(3,), outputs=3))
    row = HessianEstimator(probes=12, top_k=3).run(ctx)["hessian"].iloc[0]
    assert row.engine == "hvp" and not row.trace_exact_applies and row.trace_exact_method == "dense"
    assert row.trace_exact == pytest.approx(reference_hessian(ctx, 60).trace().item(), rel=1e-5)
    assert row.n_samples == 60 and len(row.top_eigenvalues) == 3


def test_samples_determinism_and_options(digits_ctx):
    n_train = len(digits_ctx.splits.train)
    x, y = training_subset(digits_ctx, 1280, 0)
    assert len(y) == n_train < 1280  # fewer if the split is smaller
    x1, _ = training_subset(digits_ctx, 100, 7)
    x2, _ = training_subset(digits_ctx, 100, 7)
    x3, _ = training_subset(digits_ctx, 100, 8)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert not digits_ctx.splits.train.x.requires_grad
    with pytest.raises(EstimatorError, match="--hessian-probes"):
        HessianEstimator(probes=1)
    with pytest.raises(EstimatorError, match="--hessian-probes"):
        HessianEstimator(trace_method="hutchpp", probes=4)
    with pytest.raises(EstimatorError, match="--hessian-rank-threshold"):
        HessianEstimator(rank_threshold=1.5)
    with pytest.raises(EstimatorError, match="--hessian-backend"):
        HessianEstimator(backend="torch")


def test_deterministic_given_seed():
    torch.manual_seed(0)
    model = build_model({"type": "ffnn", "input_shape": [1, 8, 8], "outputs": 10, "hidden_nodes": 5,
                         "hidden_layers": 1})
    ctx = make_ctx(model, load_dataset(DIGITS))
    opts = dict(samples=150, probes=12, exact_below=0, lanczos_steps=30, slq_runs=2, top_k=2)
    a, b = HessianEstimator(**opts).run(ctx), HessianEstimator(**opts).run(ctx)
    c = HessianEstimator(seed=1, **opts).run(ctx)
    cols = ["trace", "trace_stderr", "trace_exact", "lambda_max", "rank_estimate"]
    assert a["hessian"][cols].equals(b["hessian"][cols])
    assert a["hessian_spectrum"].equals(b["hessian_spectrum"])
    assert a["hessian"].trace.iloc[0] != c["hessian"].trace.iloc[0]
    assert a["hessian"].top_eigenvalues.iloc[0] == b["hessian"].top_eigenvalues.iloc[0]
    assert list(a["hessian"].columns) == [
        "trace", "trace_stderr", "trace_method", "trace_exact", "trace_exact_stderr", "trace_exact_applies",
        "trace_exact_method",
        "n_probes", "top_eigenvalues", "lambda_max", "rank_estimate", "rank_threshold", "rank_method",
        "rank_locked", "n_params", "n_samples", "backend", "engine", "seconds"]
    assert list(a["hessian_spectrum"].columns) == ["slq_run", "node", "weight"]
    assert not model.training
