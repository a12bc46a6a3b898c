"""Tests of analyze.estimators.fim (nngeometry 0.4 Fisher traces)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from analyze.catalog import CheckpointInfo

from analyze.estimators.base import Context, EstimatorError
from analyze.estimators.fim import FIMEstimator, softmax_fisher_root
from analyze.curvature.samples import training_subset
from analyze.estimators.hessian import HessianEstimator
from trainer.checkpoints import load_model
from trainer.data import Split, Splits, load_dataset
from trainer.losses import nll_loss
from trainer.models import build_model

DIGITS = {"name": "digits", "split_seed": 0, "val_fraction": 0.15, "test_fraction": 0.2}


def make_ctx(model, splits) -> Context:
    return Context(model=model.eval(), checkpoint=CheckpointInfo("run", "sgd", 0, 0, Path("ckpt"), "hash", {}),
                   device=torch.device("cpu"), splits=splits, loss_fn=nll_loss(splits.task, splits.noise_sigma),
                   per_sample_loss=nll_loss(splits.task, splits.noise_sigma, reduction="none"))


def hooks_of(model):
    return {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
                   dict(m._backward_pre_hooks)) for name, m in model.named_modules()}


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory, make_ckpts) -> Context:
    """A 64 -> 24 -> 10 ReLU MLP trained 5 epochs on digits by the real trainer."""
    out = make_ckpts(tmp_path_factory.mktemp("fim") / "ckpts", hidden_nodes=[24], hidden_layers=[1],
                     experiment_type="standard", optimizer="sgd", num_epochs=5, sgd_lr=0.05)
    model, ckpt = load_model(sorted(out.glob("*/epoch-0005.safetensors"))[0])
    return make_ctx(model, load_dataset(ckpt.meta["dataset_spec"]))


def test_diagonal_fisher_trace_equals_hessian_trace_exact(trained_digits):
    """ReLU MLP + cross-entropy: true Fisher = GGN, and diag(GGN) = diag(Hessian): equal traces."""
    fim = FIMEstimator(samples=600).run(trained_digits)["fim"].iloc[0]
    hess = HessianEstimator(samples=600, probes=30, top_k=1).run(trained_digits)["hessian"].iloc[0]
    assert hess.trace_exact_method == "diag_ggn"
    assert fim.trace_diag == pytest.approx(hess.trace_exact, rel=1e-5)
    assert fim.n_samples == hess.n_samples == 600 and fim.n_params == 1810
    assert fim.variant == "classif_symmetric_root"
    assert 0 < fim.trace_kfac and fim.trace_kfac == pytest.approx(fim.trace_diag, rel=0.5)
    assert list(FIMEstimator().run(trained_digits)["fim"].columns) == [
        "trace_diag", "trace_kfac", "n_samples", "n_params", "variant", "seconds"]


def test_nngeometry_cholesky_root_is_nan_when_confident_but_agrees_otherwise(trained_digits):
    """nngeometry's classif_logits root: NaN on a trained net in float32; the same Fisher elsewhere."""
    bad = FIMEstimator(samples=600, root="cholesky").run(trained_digits)["fim"].iloc[0]
    assert bad.variant == "classif_logits" and torch.isnan(torch.tensor(bad.trace_diag))
    torch.manual_seed(0)
    fresh = make_ctx(build_model({"type": "ffnn", "input_shape": [1, 8, 8], "outputs": 10, "hidden_nodes": 12,
                                  "hidden_layers": 1}), trained_digits.splits)
    a = FIMEstimator(samples=300, root="cholesky").run(fresh)["fim"].iloc[0]
    b = FIMEstimator(samples=300).run(fresh)["fim"].iloc[0]
    assert a.trace_diag == pytest.approx(b.trace_diag, rel=1e-4)
    assert a.trace_kfac == pytest.approx(b.trace_kfac, rel=1e-4)
    with pytest.raises(EstimatorError, match="--fim-root"):
        FIMEstimator(root="cholesky", dtype="float64")


def test_symmetric_root_reproduces_softmax_fisher():
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    rows = torch.stack([torch.autograd.grad(softmax_fisher_root(logits)[:, c].sum(), logits)[0]
                        for c in range(6)], dim=1)  # (4, 6 outputs, 6 logits)
    p = torch.softmax(logits.detach(), dim=1)
    expected = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    torch.testing.assert_close(rows.transpose(1, 2) @ rows, expected)


def test_kfac_trace_of_a_linear_classifier():
    """One Linear layer: KFAC trace = tr(A) tr(G) = mean(|x|^2 + 1) * mean(1 - |p|^2); exact for one sample."""
    torch.manual_seed(1)
    splits = load_dataset(DIGITS)
    model = build_model({"type": "ffnn", "input_shape": [1, 8, 8], "outputs": 10, "hidden_nodes": 1,
                         "hidden_layers": 0}).double()
    ctx = make_ctx(model, splits)
    row = FIMEstimator(samples=200, batch_size=64, dtype="float64").run(ctx)["fim"].iloc[0]
    x, _ = training_subset(ctx, 200, 0)
    x = x.double().flatten(1)
    p = torch.softmax(model(x), dim=1).detach()
    expected = ((x ** 2).sum(1) + 1).mean() * (1 - (p ** 2).sum(1)).mean()
    assert row.trace_kfac == pytest.approx(expected.item(), rel=1e-10)
    diag = ((x ** 2).sum(1) + 1) * (1 - (p ** 2).sum(1))  # per-sample Fisher trace of g (x) [x, 1]
    assert row.trace_diag == pytest.approx(diag.mean().item(), rel=1e-10)
    one = FIMEstimator(samples=1, dtype="float64").run(ctx)["fim"].iloc[0]
    assert one.trace_kfac == pytest.approx(one.trace_diag, rel=1e-10)


def test_regression_fisher_is_jtj_over_sigma_squared():
    splits = load_dataset({"name": "teacher", "split_seed": 0, "val_fraction": 0.15, "test_fraction": 0.2,
                           "task": "regression", "samples": 300, "input_dim": 5, "outputs": 2, "noise_sigma": 0.3,
                           "teacher_model": {"type": "ffnn", "input_shape": [5], "outputs": 2, "hidden_nodes": 4,
                                             "hidden_layers": 1}})
    torch.manual_seed(2)
    model = build_model({"type": "ffnn", "input_shape": [5], "outputs": 2, "hidden_nodes": 6, "hidden_layers": 1})
    ctx = make_ctx(model, splits)
    row = FIMEstimator(samples=100, dtype="float64").run(ctx)["fim"].iloc[0]
    x, _ = training_subset(ctx, 100, 0)
    m64 = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in m64.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(m64, p, (x.double(),)))(params)
    jtj = sum((j ** 2).sum().item() for j in jac.values()) / 100  # tr(J^T J) / n
    assert row.variant == "regression"
    assert row.trace_diag == pytest.approx(jtj / 0.3 ** 2, rel=1e-10)
    # and it equals the Gauss-Newton part of the Hessian of the Gaussian NLL (exact for ReLU nets)
    hess = HessianEstimator(samples=100, probes=6, dtype="float64").run(ctx)["hessian"].iloc[0]
    assert hess.trace_exact_method == "diag_ggn"
    assert row.trace_diag == pytest.approx(hess.trace_exact, rel=1e-10)


def test_hooks_removed_after_a_failing_call(trained_digits):
    model = trained_digits.model
    before = hooks_of(model)
    clean = FIMEstimator(samples=200).run(trained_digits)["fim"].iloc[0]
    # Wrong input width: the forward pass raises inside nngeometry, after it registered its hooks.
    train = trained_digits.splits.train
    broken = Splits(Split(train.x[:, :, :7, :], train.y), trained_digits.splits.val, trained_digits.splits.test,
                    task="classification", input_shape=(1, 7, 8), outputs=10)
    ctx = copy.copy(trained_digits)
    ctx.splits = broken
    with pytest.raises(RuntimeError):
        FIMEstimator(samples=200).run(ctx)
    assert hooks_of(model) == before
    assert all(not h for hooks in hooks_of(model).values() for h in hooks)
    assert not train.x.requires_grad and not broken.train.x.requires_grad
    assert not model.training
    # A later call on the same model sees no stale hooks: the same numbers as before the failure.
    again = FIMEstimator(samples=200).run(trained_digits)["fim"].iloc[0]
    assert again.trace_diag == clean.trace_diag and again.trace_kfac == clean.trace_kfac


def test_options_and_determinism(trained_digits):
    with pytest.raises(EstimatorError, match="--fim-samples"):
        FIMEstimator(samples=0)
    a = FIMEstimator(samples=100, seed=3).run(trained_digits)["fim"]
    b = FIMEstimator(samples=100, seed=3, batch_size=7).run(trained_digits)["fim"]
    c = FIMEstimator(samples=100, seed=4).run(trained_digits)["fim"]
    assert a.trace_diag.iloc[0] == pytest.approx(b.trace_diag.iloc[0], rel=1e-5)
    assert a.trace_diag.iloc[0] != c.trace_diag.iloc[0]
    assert FIMEstimator().run(trained_digits)["fim"].n_samples.iloc[0] == len(trained_digits.splits.train)
