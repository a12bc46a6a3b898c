"""HSIC information plane: the O(m^2) statistics against the doc's reference values and a naive numpy
implementation, their statistical properties, the estimator (hooks, probe, presets) and a real run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from analyze import hsic as hm
from analyze.catalog import CheckpointInfo
from analyze.estimators.base import Context, EstimatorError
from analyze.estimators.hsic import HSICEstimator
from trainer.checkpoints import list_checkpoints, load_model
from trainer.data import Split, Splits, load_dataset
from trainer.models import build_model

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ naive numpy reference
def np_sq_dists(a: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1)
    return ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)  # the m x m x d broadcast, fine for small m


def np_median_sigma_offdiag(a: np.ndarray) -> float:
    d = np.sqrt(np_sq_dists(a))
    return float(np.median(d[np.triu_indices(len(a), 1)]))


def np_gauss(a: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-np_sq_dists(a) / (2 * sigma ** 2))


def np_linear(a: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1)
    return a @ a.T


def np_hsic_b(K: np.ndarray, L: np.ndarray) -> float:
    m = len(K)
    H = np.eye(m) - np.ones((m, m)) / m
    return float(np.trace(K @ H @ L @ H)) / (m - 1) ** 2


def np_hsic_u(K: np.ndarray, L: np.ndarray) -> float:
    m = len(K)
    Kt, Lt, one = K - np.diag(np.diag(K)), L - np.diag(np.diag(L)), np.ones(m)
    value = (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((m - 1) * (m - 2))
             - 2 / (m - 2) * one @ Kt @ Lt @ one)
    return float(value) / (m * (m - 3))


def exact_hsic_u(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al.'s formula in exact rational arithmetic on the float64 kernel entries (no cancellation)."""
    from fractions import Fraction

    m = len(K)
    K = [[Fraction(float(v)) if i != j else Fraction(0) for j, v in enumerate(r)] for i, r in enumerate(K)]
    L = [[Fraction(float(v)) if i != j else Fraction(0) for j, v in enumerate(r)] for i, r in enumerate(L)]
    tr = sum(K[i][j] * L[j][i] for i in range(m) for j in range(m))
    k1l = sum(sum(K[i][j] for i in range(m)) * sum(L[j][k] for k in range(m)) for j in range(m))
    value = tr + sum(map(sum, K)) * sum(map(sum, L)) / ((m - 1) * (m - 2)) - Fraction(2, m - 2) * k1l
    return float(value / (m * (m - 3)))


def np_cka(K, L, hsic=np_hsic_b) -> float:
    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def t(a) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float64)


# ------------------------------------------------------------------------------------ analyze.hsic
@pytest.fixture(scope="module")
def reference_xy():
    np.random.seed(1337)
    X = np.random.randn(100, 10)
    Y = np.random.randn(100, 10) + X
    return t(X), t(Y)


def test_reference_values_of_the_algorithms_doc(reference_xy):
    X, Y = reference_xy
    KX, KY = hm.linear_kernel(X), hm.linear_kernel(Y)
    assert hm.hsic_normalized(KX, KY) == pytest.approx(0.55761, abs=1e-5)
    assert hm.hsic_normalized(KX, KY, unbiased=True) == pytest.approx(0.51346, abs=1e-5)
    assert hm.hsic(KX, KY, "debiased") == pytest.approx(0.51346, abs=1e-5)
    # Gaussian CKA: sigma^2 = 0.5^2 * median of ALL squared pairwise distances (diagonal zeros included)
    GX, sx = hm.gaussian_kernel(X, "median", median_pairs="all", median_scale=0.5)
    GY, sy = hm.gaussian_kernel(Y, "median", median_pairs="all", median_scale=0.5)
    assert hm.hsic_normalized(GX, GY) == pytest.approx(0.65483, abs=1e-5)
    d2 = np_sq_dists(X.numpy())
    assert sx ** 2 == pytest.approx(0.25 * np.median(d2), rel=1e-12)
    # the default median (off-diagonal distances) is a different bandwidth, so a different value
    GX2, sx2 = hm.gaussian_kernel(X, "median")
    assert sx2 == pytest.approx(np_median_sigma_offdiag(X.numpy()), rel=1e-12)
    assert abs(hm.hsic_normalized(GX2, hm.gaussian_kernel(Y, "median")[0]) - 0.65483) > 1e-3


def test_pyglow_statistic_is_m_minus_1_times_biased(reference_xy):
    X, Y = reference_xy
    for m in (10, 57, 100):
        K, _ = hm.gaussian_kernel(X[:m], 5.0)
        L, _ = hm.gaussian_kernel(Y[:m], 5.0)
        assert hm.hsic_pyglow(K, L) == pytest.approx((m - 1) * hm.hsic_biased(K, L), rel=1e-12)
        assert hm.hsic(K, L, "pyglow") / hm.hsic(K, L, "biased") == pytest.approx(m - 1, rel=1e-12)


def test_unbiased_is_centred_at_zero_under_independence_and_biased_is_not():
    g = torch.Generator().manual_seed(0)
    biased, unbiased = [], []
    for _ in range(40):
        X, Y = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randn(40, 2, generator=g, dtype=torch.float64)
        K, L = hm.gaussian_kernel(X)[0], hm.gaussian_kernel(Y)[0]
        biased.append(hm.hsic_biased(K, L))
        unbiased.append(hm.hsic_unbiased(K, L))
    biased, unbiased = np.array(biased), np.array(unbiased)
    sem_u = unbiased.std(ddof=1) / math.sqrt(len(unbiased))
    assert abs(unbiased.mean()) < 3 * sem_u  # mean over seeds consistent with 0
    assert (unbiased < 0).any() and (unbiased > 0).any()
    assert (biased > 0).all()  # HSIC_b = <HKH, HLH>/(m-1)^2 >= 0, and biased upwards by O(1/m)
    assert biased.mean() > 10 * sem_u and biased.mean() > 20 * abs(unbiased.mean())
    # and with real dependence the unbiased statistic is clearly positive
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    assert hm.hsic_unbiased(hm.gaussian_kernel(X)[0], hm.gaussian_kernel(X[:, :2] ** 2)[0]) > 10 * sem_u


@pytest.mark.parametrize("scale", [1e-3, 7.3, 250.0])
def test_normalized_hsic_is_invariant_to_scaling_a_representation(reference_xy, scale):
    X, Y = reference_xy
    for unbiased in (False, True):
        lin = hm.hsic_normalized(hm.linear_kernel(X), hm.linear_kernel(Y), unbiased)
        assert hm.hsic_normalized(hm.linear_kernel(scale * X), hm.linear_kernel(Y), unbiased) == pytest.approx(lin, rel=1e-10)
        for pairs in ("offdiag", "all"):
            ky = hm.gaussian_kernel(Y, median_pairs=pairs)[0]
            base = hm.hsic_normalized(hm.gaussian_kernel(X, median_pairs=pairs)[0], ky, unbiased)
            scaled = hm.hsic_normalized(hm.gaussian_kernel(scale * X, median_pairs=pairs)[0], ky, unbiased)
            assert scaled == pytest.approx(base, rel=1e-9)
    # an absolute bandwidth is not scale invariant (the reason the default is the median heuristic)
    ky = hm.gaussian_kernel(Y, 5.0)[0]
    assert hm.hsic_normalized(hm.gaussian_kernel(scale * X, 5.0)[0], ky) != pytest.approx(
        hm.hsic_normalized(hm.gaussian_kernel(X, 5.0)[0], ky), rel=1e-3)


@pytest.mark.parametrize("m", [7, 12, 31])
def test_o_m2_implementation_matches_naive_numpy(m):
    rng = np.random.default_rng(m)
    A = rng.normal(size=(m, 3, 4)) * 2.0 + 5.0  # offset: the Gram identity must not lose precision
    B = np.tanh(A.reshape(m, -1)[:, :5] + 0.5 * rng.normal(size=(m, 5)))
    labels = rng.integers(0, 3, size=m)
    sa, sb = np_median_sigma_offdiag(A), np_median_sigma_offdiag(B)
    naive = {"gauss": (np_gauss(A, sa), np_gauss(B, sb)), "gauss5": (np_gauss(A, 5.0), np_gauss(B, 5.0)),
             "linear": (np_linear(A), np_linear(B)), "delta": (np_linear(A), (labels[:, None] == labels).astype(float))}
    ours = {"gauss": (hm.gaussian_kernel(t(A))[0], hm.gaussian_kernel(t(B))[0]),
            "gauss5": (hm.gaussian_kernel(t(A), 5.0)[0], hm.gaussian_kernel(t(B), 5)[0]),
            "linear": (hm.linear_kernel(t(A)), hm.linear_kernel(t(B))),
            "delta": (hm.linear_kernel(t(A)), hm.delta_kernel(torch.as_tensor(labels)))}
    assert hm.gaussian_kernel(t(A))[1] == pytest.approx(sa, rel=1e-12)
    assert hm.median_sigma(hm.pairwise_sq_dists(t(A)), "all") == pytest.approx(math.sqrt(np.median(np_sq_dists(A))), rel=1e-12)
    np.testing.assert_allclose(hm.pairwise_sq_dists(t(A)).numpy(), np_sq_dists(A), rtol=1e-10, atol=1e-10)
    for key, (K, L) in naive.items():
        Kt, Lt = ours[key]
        np.testing.assert_allclose(Kt.numpy(), K, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(Lt.numpy(), L, rtol=1e-10, atol=1e-12)
        assert hm.hsic_biased(Kt, Lt) == pytest.approx(np_hsic_b(K, L), rel=1e-9)
        assert hm.hsic_unbiased(Kt, Lt) == pytest.approx(np_hsic_u(K, L), rel=1e-9, abs=1e-12)
        assert hm.hsic(Kt, Lt, "unbiased") == pytest.approx(np_hsic_u(K, L), rel=1e-9, abs=1e-12)
        assert hm.hsic(Kt, Lt, "biased") == pytest.approx(np_hsic_b(K, L), rel=1e-9)
        assert hm.hsic_pyglow(Kt, Lt) == pytest.approx((m - 1) * np_hsic_b(K, L), rel=1e-9)
        assert hm.hsic_normalized(Kt, Lt) == pytest.approx(np_cka(K, L), rel=1e-9)
        # exact arithmetic here: the literal float64 formula cancels badly in HSIC_u(K, K)
        assert hm.hsic_normalized(Kt, Lt, unbiased=True) == pytest.approx(np_cka(K, L, exact_hsic_u), rel=1e-10)
    # the batched information plane: X kernel and Y kernel centred once, one kernel per layer
    layers = [A, B, A[:, :2] ** 2]
    L_y = naive["delta"][1]
    plane = hm.information_plane(t(A), t(L_y), [t(x) for x in layers], kernel="gaussian", name="unbiased")
    for (hx, hy), T in zip(plane, layers):
        KT = np_gauss(T, np_median_sigma_offdiag(T))
        assert hx == pytest.approx(np_hsic_u(KT, naive["gauss"][0]), rel=1e-9, abs=1e-12)
        assert hy == pytest.approx(np_hsic_u(KT, L_y), rel=1e-9, abs=1e-12)


def test_unbiased_statistic_against_exact_rational_arithmetic():
    m = 7
    rng = np.random.default_rng(7)
    A = rng.normal(size=(m, 4)) * 2.0 + 5.0
    K, L = np_linear(A), np_gauss(np.tanh(A[:, :2]), 5.0)
    for P, Q in ((K, L), (K, K), (L, L)):
        assert hm.hsic_unbiased(t(P), t(Q)) == pytest.approx(exact_hsic_u(P, Q), rel=1e-12)
        assert hm.hsic(t(P), t(Q), "unbiased") == pytest.approx(exact_hsic_u(P, Q), rel=1e-12)


def test_degenerate_inputs():
    const = torch.ones(10, 4, dtype=torch.float64)
    K, sigma = hm.gaussian_kernel(const)
    assert sigma == 0 and torch.equal(K, torch.ones(10, 10, dtype=torch.float64))  # limit 1[d == 0]
    L = hm.gaussian_kernel(torch.randn(10, 3))[0]
    assert hm.hsic_biased(K, L) == pytest.approx(0, abs=1e-15)
    assert math.isnan(hm.hsic_normalized(K, L))  # 0/0: a constant representation has no CKA
    with pytest.raises(ValueError, match="at least 4"):
        hm.hsic_unbiased(K[:3, :3], L[:3, :3])


# ------------------------------------------------------------------------------------ the estimator
STUDY_SPEC_SMALL = {"type": "layers", "input_shape": [1, 8, 8], "outputs": 10,
                    "layers": ["conv2d:4:3:1:1:relu", "flatten", "dropout:0.4", "dense:16:relu", "dropout:0.2", "dense:10"]}


def fake_context(n=90, seed=0, spec=STUDY_SPEC_SMALL) -> Context:
    torch.manual_seed(seed)
    model = build_model(spec).eval()
    g = torch.Generator().manual_seed(seed + 1)
    split = Split(torch.randn(n, *spec["input_shape"], generator=g), torch.randint(0, 10, (n,), generator=g))
    splits = Splits(split, split, split, "classification", tuple(spec["input_shape"]), 10)
    info = CheckpointInfo("run", "sgd", 0, 0, Path("none"), "hash", {})
    return Context(model=model, checkpoint=info, device=torch.device("cpu"), splits=splits)


def np_layer_outputs(model, x) -> list[tuple[str, np.ndarray]]:
    """Every top-level layer's output by running the children by hand (no hooks)."""
    outs, h = [], x
    with torch.no_grad():
        for name, module in model.named_children():
            h = module(h)
            outs.append((name, h.reshape(len(x), -1).double().numpy().copy()))
    return outs


@pytest.mark.parametrize("options", [
    {},
    {"estimator": "unbiased", "kernel": "linear"},
    {"estimator": "biased", "sigma": "2.5", "y": "output"},
    {"estimator": "debiased", "sigma": "kornblith", "layers": "dense_1,conv2d_1"},
])
def test_estimator_matches_an_independent_computation(options):
    ctx = fake_context()
    frame = HSICEstimator(probe=500, **options).run(ctx)["hsic"]  # probe > split: all 90 samples
    x, y = ctx.splits.val.x, ctx.splits.val.y
    outs = np_layer_outputs(ctx.model, x)
    names = [n for n, _ in outs]
    stat = options.get("estimator", "normalized")
    hsic = {"normalized": np_cka, "biased": np_hsic_b, "unbiased": np_hsic_u,
            "debiased": lambda K, L: np_cka(K, L, np_hsic_u)}[stat]

    def kern(a):
        if options.get("kernel") == "linear":
            return np_linear(a), math.nan
        sigma = options.get("sigma", "median")
        s = {"median": np_median_sigma_offdiag(a),
             "kornblith": 0.5 * math.sqrt(np.median(np_sq_dists(a)))}.get(sigma) or float(sigma)
        return np_gauss(a, s), s

    KX, sx = kern(x.reshape(len(x), -1).double().numpy())
    if options.get("y") == "output":
        KY, sy = kern(torch.softmax(torch.tensor(outs[-1][1]), dim=1).numpy())
        expected_layers = names[:-1]
    else:
        KY, sy = (y[:, None] == y[None, :]).double().numpy(), math.nan
        expected_layers = names
    if "layers" in options:
        expected_layers = ["conv2d_1", "dense_1"]  # model order, whatever the option's order
    assert list(frame["layer_name"]) == expected_layers
    assert list(frame["layer"]) == [names.index(n) for n in expected_layers]
    assert (frame["n_probe"] == 90).all() and (frame["estimator"] == stat).all()
    assert (frame["y_source"] == options.get("y", "labels")).all()
    for row in frame.itertuples():
        KT, st = kern(dict(outs)[row.layer_name])
        assert row.hsic_x == pytest.approx(hsic(KT, KX), rel=1e-8, abs=1e-12)
        assert row.hsic_y == pytest.approx(hsic(KT, KY), rel=1e-8, abs=1e-12)
        for got, want in ((row.sigma_x, sx), (row.sigma_y, sy), (row.sigma_t, st)):
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-10)
    # eval mode: dropout is the identity, so a dropout row repeats the row before it
    if "dropout_1" in expected_layers:
        rows = frame.set_index("layer_name")
        assert rows.loc["dropout_1", "hsic_x"] == rows.loc["flatten_1", "hsic_x"]


def test_pyglow_preset_reproduces_the_pyglow_statistic():
    ctx = fake_context(n=150)
    est = HSICEstimator(preset="pyglow", probe=1000)
    assert est.opts["estimator"] == "pyglow" and est.opts["sigma"] == "5" and est.opts["y"] == "output"
    assert est.opts["batch_size"] == 64
    frame = est.run(ctx)["hsic"]
    names = [n for n, _ in ctx.model.named_children()]
    assert list(frame["layer_name"]) == names[:-1]  # every layer output but the last, Flatten and Dropout included
    assert (frame[["sigma_x", "sigma_y", "sigma_t"]] == 5.0).all().all()
    assert (frame["y_source"] == "output").all() and (frame["n_probe"] == 128).all()  # 2 batches of 64
    # independently: PyGlow's (m - 1) * HSIC_b per minibatch of 64, averaged over the batches
    probe = torch.randperm(150, generator=torch.Generator().manual_seed(0))
    expected = {n: [0.0, 0.0] for n in names}
    for b in range(2):
        idx = probe[64 * b:64 * (b + 1)]
        x = ctx.splits.val.x[idx]
        outs = np_layer_outputs(ctx.model, x)
        KX = np_gauss(x.reshape(64, -1).double().numpy(), 5.0)
        KY = np_gauss(torch.softmax(torch.tensor(outs[-1][1]), dim=1).numpy(), 5.0)
        for name, a in outs[:-1]:
            KT = np_gauss(a, 5.0)
            expected[name][0] += 63 * np_hsic_b(KT, KX) / 2
            expected[name][1] += 63 * np_hsic_b(KT, KY) / 2
    for row in frame.itertuples():
        assert row.hsic_x == pytest.approx(expected[row.layer_name][0], rel=1e-9)
        assert row.hsic_y == pytest.approx(expected[row.layer_name][1], rel=1e-9)
    # one batch of the whole probe set: the same statistic with m = 150
    whole = HSICEstimator(preset="pyglow", batch_size=1000).run(ctx)["hsic"]
    assert (whole["n_probe"] == 150).all()
    x = ctx.splits.val.x[probe]
    outs = np_layer_outputs(ctx.model, x)
    KT, KX = np_gauss(outs[3][1], 5.0), np_gauss(x.reshape(150, -1).double().numpy(), 5.0)
    assert whole.loc[3, "hsic_x"] == pytest.approx(149 * np_hsic_b(KT, KX), rel=1e-9)


def test_options_are_validated():
    with pytest.raises(EstimatorError, match="--hsic-estimator"):
        HSICEstimator(preset="pyglow", estimator="normalized")
    with pytest.raises(EstimatorError, match="--hsic-sigma"):
        HSICEstimator(preset="pyglow", sigma="median")
    HSICEstimator(preset="pyglow", sigma="5.0", y="output", estimator="pyglow")  # agreeing values are fine
    with pytest.raises(EstimatorError, match="--hsic-sigma"):
        HSICEstimator(sigma="wide")
    with pytest.raises(EstimatorError, match="--hsic-sigma"):
        HSICEstimator(sigma="-1")
    with pytest.raises(EstimatorError, match="--hsic-sigma"):
        HSICEstimator(kernel="linear", sigma="3")
    with pytest.raises(EstimatorError, match="--hsic-probe"):
        HSICEstimator(probe=3)
    with pytest.raises(EstimatorError, match="--hsic-batch-size"):
        HSICEstimator(batch_size=2)
    with pytest.raises(EstimatorError, match="--hsic-layers"):
        HSICEstimator(layers="fc1,,out")
    with pytest.raises(EstimatorError, match="--hsic-split"):
        HSICEstimator(split="holdout")
    with pytest.raises(EstimatorError, match="no layer 'fc9'"):
        HSICEstimator(layers="fc9").run(fake_context())
    # the preset's effective values are the config (so the task key does not depend on how it was spelled)
    a, b = HSICEstimator(preset="pyglow"), HSICEstimator(preset="pyglow", estimator="pyglow", y="output", batch_size=64)
    assert a.config() == b.config()
    assert HSICEstimator(**{k: v for k, v in a.opts.items()}).config() == a.config()  # rebuilt from its config


def test_probe_is_fixed_by_the_seed_and_uses_the_chosen_split():
    ctx = fake_context(n=120)
    ctx.splits.test = Split(ctx.splits.val.x[:50] * 3.0, ctx.splits.val.y[:50])
    one = HSICEstimator(probe=40, seed=3).run(ctx)["hsic"]
    assert one.equals(HSICEstimator(probe=40, seed=3).run(ctx)["hsic"])
    assert not one.equals(HSICEstimator(probe=40, seed=4).run(ctx)["hsic"])
    test = HSICEstimator(probe=1000, split="test").run(ctx)["hsic"]
    assert (test["n_probe"] == 50).all() and (one["n_probe"] == 40).all()


def test_hooks_are_removed_and_inference_mode_is_fine():
    ctx = fake_context()
    expected = HSICEstimator().run(ctx)["hsic"]
    with torch.inference_mode():  # no version counters: no kernel reuse, same numbers
        got = HSICEstimator().run(ctx)["hsic"]
    assert np.allclose(got[["hsic_x", "hsic_y"]], expected[["hsic_x", "hsic_y"]], rtol=1e-12, atol=0)
    assert all(not m._forward_hooks for m in ctx.model.modules())

    class Pair(torch.nn.Module):
        def forward(self, h):
            return h, h

    ctx.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Sequential(), Pair())
    with pytest.raises(TypeError, match="layer '2' returns tuple"):
        HSICEstimator(layers="1,2").run(ctx)
    assert all(not m._forward_hooks for m in ctx.model.modules())


# ---------------------------------------------------------------------------- a real trained network
def test_training_raises_the_last_hidden_layers_dependence_on_labels(tmp_path, make_ckpts):
    out = make_ckpts(tmp_path / "ck", hidden_nodes=[32], hidden_layers=[1], experiment_type="standard",
                     optimizer="sgd", num_epochs=5, sgd_lr=0.05, batch_size=32)
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    ckpts = list_checkpoints(run_dir)
    values = {}
    for epoch, _, path in (ckpts[0], ckpts[-1]):
        model, ckpt = load_model(path)
        meta = ckpt.meta
        info = CheckpointInfo(meta["run"], meta["optimizer"], meta["epoch"], meta["step"], path, "hash", meta)
        ctx = Context(model=model, checkpoint=info, device=torch.device("cpu"),
                      splits=load_dataset(meta["dataset_spec"]), loss_fn=None, per_sample_loss=None)
        frame = HSICEstimator().run(ctx)["hsic"].set_index("layer_name")
        assert list(frame.index) == ["flatten", "fc1", "relu1", "out"]
        values[epoch] = frame
    first, last = values[ckpts[0][0]], values[ckpts[-1][0]]
    assert ckpts[0][0] == 0 and ckpts[-1][0] == 5
    assert last.loc["relu1", "hsic_y"] > first.loc["relu1", "hsic_y"] + 0.05
    assert last.loc["out", "hsic_y"] > first.loc["out", "hsic_y"] + 0.05
    # the input layer's coordinates do not depend on the weights
    assert last.loc["flatten", "hsic_y"] == pytest.approx(first.loc["flatten", "hsic_y"], rel=1e-12)
    assert last.loc["flatten", "hsic_x"] == pytest.approx(1.0, rel=1e-12)
