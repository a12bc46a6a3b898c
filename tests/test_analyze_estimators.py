"""The built-in estimators against independent computations: numpy SVD, Pareto samples, a hand loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analyze.catalog import CheckpointInfo

from analyze.estimators.base import Context
from analyze.estimators.evaluate import Evaluate
from analyze.estimators.weights import Weights, fit_powerlaw
from trainer.checkpoints import load_model
from trainer.data import load_dataset
from trainer.losses import nll_loss
from trainer.models import build_model


def context(model, splits=None) -> Context:
    info = CheckpointInfo(run="r", optimizer="sgd", epoch=0, step=0, path=None, hash="", meta={})
    ctx = Context(model=model.eval(), checkpoint=info, device=torch.device("cpu"), splits=splits)
    if splits is not None:
        ctx.loss_fn = nll_loss(splits.task, splits.noise_sigma)
        ctx.per_sample_loss = nll_loss(splits.task, splits.noise_sigma, reduction="none")
    return ctx


def checkpoint_context(path, with_data=True) -> Context:
    model, ckpt = load_model(path)
    return context(model, load_dataset(ckpt.meta["dataset_spec"]) if with_data else None)


# ------------------------------------------------------------------ weights
@pytest.mark.parametrize("spec", [
    {"type": "ffnn", "input_shape": [1, 8, 8], "outputs": 10, "hidden_nodes": 16, "hidden_layers": 2},
    {"type": "cnn", "input_shape": [1, 8, 8], "outputs": 10, "extra_layers": 1},
])
def test_weights_match_numpy_svd(spec):
    torch.manual_seed(0)
    model = build_model(spec)
    rows = Weights().run(context(model))["weights"]
    matrices = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    assert rows["layer"].tolist() == list(range(len(matrices)))
    assert rows["layer_name"].tolist() == [n.removesuffix(".weight") for n, _ in matrices]
    for row, (_, p) in zip(rows.itertuples(), matrices):
        w = p.detach().double().numpy().reshape(p.shape[0], -1)
        s = np.linalg.svd(w, compute_uv=False)
        assert row.shape == "x".join(map(str, p.shape))
        assert row.n_eigenvalues == min(w.shape)
        assert row.spectral_norm == pytest.approx(s[0], rel=1e-6)
        assert row.frobenius_norm == pytest.approx(np.linalg.norm(w), rel=1e-6)
        assert row.stable_rank == pytest.approx(np.sum(s ** 2) / s[0] ** 2, rel=1e-6)
    if spec["type"] == "cnn":
        assert rows.set_index("layer_name").loc["conv1", "shape"] == "6x1x5x5"


def test_weights_of_a_real_checkpoint_need_no_data(tiny_ckpts):
    assert Weights.needs_data is False
    ctx = checkpoint_context(tiny_ckpts / "ffnn-1x8-trunk" / "epoch-0002.safetensors", with_data=False)
    rows = Weights().run(ctx)["weights"]
    assert rows["layer_name"].tolist() == ["fc1", "out"] and rows["shape"].tolist() == ["8x64", "10x8"]
    assert (rows["stable_rank"] >= 1).all() and (rows["stable_rank"] <= rows["n_eigenvalues"]).all()


@pytest.mark.parametrize("alpha", [1.7, 2.5, 4.0])
def test_powerlaw_mle_recovers_pareto_exponent(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    tail = 3.0 * (1 - rng.random(3000)) ** (-1 / (alpha - 1))  # density ~ x^-alpha above 3
    body = rng.uniform(0.05, 3.0, 1500)  # not a power law: the KS choice of xmin must cut it off
    for sample in (tail, np.concatenate([tail, body])):
        fitted, xmin, ks, n_tail = fit_powerlaw(sample)
        assert fitted == pytest.approx(alpha, rel=0.1)
        assert xmin == pytest.approx(3.0, rel=0.35) and 0 <= ks < 0.05 and n_tail > 1000


def test_powerlaw_fit_needs_a_tail():
    assert all(math.isnan(v) for v in fit_powerlaw(np.array([1.0, 2.0, 3.0, 4.0]))[:3])
    assert math.isnan(fit_powerlaw(np.ones(20))[0])  # no slope to fit
    assert not math.isnan(fit_powerlaw(np.arange(1.0, 9.0), min_tail=5)[0])


# ------------------------------------------------------------------ evaluate
def test_evaluate_matches_a_hand_written_loop(tiny_ckpts):
    path = tiny_ckpts / "ffnn-1x8-swap-ngd" / "epoch-0003.safetensors"
    ctx = checkpoint_context(path)
    rows = Evaluate(batch_size=100).run(ctx)["evaluate"].set_index("split")
    assert rows.index.tolist() == ["train", "val", "test"]
    model, splits = load_model(path)[0], ctx.splits
    assert not model.training
    for name in ("train", "val", "test"):
        split = splits.split(name)
        with torch.no_grad():
            logits = model(split.x)
            loss = F.cross_entropy(logits, split.y).item()
            acc = (logits.argmax(1) == split.y).float().mean().item()
        assert rows.loc[name, "loss"] == pytest.approx(loss, rel=1e-6)
        assert rows.loc[name, "accuracy"] == pytest.approx(acc, rel=1e-6)
        assert rows.loc[name, "n"] == len(split.y)
    whole = Evaluate(batch_size=100_000).run(ctx)["evaluate"].set_index("split")
    assert np.allclose(whole["loss"], rows["loss"], rtol=1e-6) and (whole["accuracy"] == rows["accuracy"]).all()


def test_evaluate_regression_uses_the_gaussian_nll_and_no_accuracy():
    spec = {"name": "teacher", "split_seed": 1, "val_fraction": 0.2, "test_fraction": 0.2, "task": "regression",
            "samples": 300, "input_dim": 4, "outputs": 2, "noise_sigma": 0.5,
            "teacher_model": {"type": "ffnn", "input_shape": [4], "outputs": 2, "hidden_nodes": 4,
                              "hidden_layers": 1}}
    splits = load_dataset(spec)
    torch.manual_seed(1)
    model = build_model({"type": "ffnn", "input_shape": [4], "outputs": 2, "hidden_nodes": 3, "hidden_layers": 1})
    rows = Evaluate(batch_size=7).run(context(model, splits))["evaluate"].set_index("split")
    with torch.no_grad():
        out = model(splits.test.x)
    expected = (0.5 * ((out - splits.test.y) ** 2).sum(1) / 0.5 ** 2).mean().item()
    assert rows.loc["test", "loss"] == pytest.approx(expected, rel=1e-6)
    assert rows["accuracy"].isna().all()
