"""LLC/WBIC estimator: known truths, backend agreement, identities, reproducibility, diagnostics."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analyze.llc.calibrate import calibrate, context_for
from analyze.llc.calibration_table import recommended_setting
from analyze.llc.stability import bottom_hessian_eigenvalue
from analyze.catalog import CheckpointInfo
from analyze.estimators.base import Context, EstimatorError
from analyze.estimators.llc import LLCEstimator
from analyze.llc.statistics import chain_left_basin, not_at_minimum
from analyze.llc.sampler import SGLDSettings, chain_seed, sample_losses
from trainer.checkpoints import checkpoint_name
from trainer.data import load_dataset
from trainer.losses import nll_loss
from trainer.models import build_model


def linear_regression_context(d: int, sigma: float = 0.5, samples: int = 2000) -> Context:
    """Full-rank linear regression with d parameters (d - 1 weights and a bias) at its least-squares
    solution: a regular model, so its learning coefficient is exactly d / 2."""
    spec = {"name": "teacher", "split_seed": 0, "val_fraction": 0.1, "test_fraction": 0.1, "task": "regression",
            "samples": samples, "input_dim": d - 1, "outputs": 1, "noise_sigma": sigma,
            "teacher_model": {"type": "dlnn", "input_shape": [d - 1], "outputs": 1, "hidden_nodes": 1,
                              "hidden_layers": 0}}
    splits = load_dataset(spec)
    model = build_model(spec["teacher_model"])
    design = torch.cat([splits.train.x, torch.ones(len(splits.train), 1)], 1).double()
    solution = torch.linalg.lstsq(design, splits.train.y.double()).solution
    with torch.no_grad():
        model.out.weight.copy_(solution[:-1].T)
        model.out.bias.copy_(solution[-1])
    info = CheckpointInfo("linreg", "none", 0, 0, None, "-", {})
    return Context(model=model.eval(), checkpoint=info, device=torch.device("cpu"), splits=splits,
                   loss_fn=nll_loss("regression", sigma), per_sample_loss=nll_loss("regression", sigma, "none"))


@pytest.fixture(scope="module")
def mlp_context(tmp_path_factory, make_ckpts) -> Context:
    out = make_ckpts(tmp_path_factory.mktemp("llc") / "ck", experiment_type="standard", optimizer="sgd",
                     num_epochs=5, hidden_nodes=[16], sgd_lr=0.05)
    return context_for(out / "ffnn-1x16-sgd" / checkpoint_name(5))


@pytest.mark.parametrize("d", [10, 30])
def test_regular_model_llc_is_half_the_dimension(d):
    """Full-batch gradients, no localization, a small step: the estimate lands on d / 2."""
    ctx = linear_regression_context(d)
    row = LLCEstimator(chains=4, draws=3000, burnin=300, lr=1e-4, localization=0.0, batch_size=0).run(ctx)["llc"].iloc[0]
    assert abs(row.llc_mean - d / 2) < 0.1 * d / 2
    assert abs(row.llc_mean - d / 2) < 4 * row.llc_sem + 0.03 * d / 2  # and consistent with its own error
    assert row.rhat < 1.1 and not row.diverged and not row.left_basin and row.wbic_exact
    assert not row.not_at_minimum


def test_regular_model_llc_does_not_depend_on_the_temperature():
    """At nbeta = n (temperature 1) the Gaussian posterior of a regular model narrows by sqrt(log n), and the
    estimate nbeta (E L - L_n(w*)) is d / 2 all the same; the row records the nbeta it ran at."""
    ctx = linear_regression_context(10)
    row = LLCEstimator(chains=4, draws=3000, burnin=300, lr="0.001/nbeta", localization=0.0, batch_size=0,
                       nbeta="n").run(ctx)["llc"].iloc[0]
    assert row.nbeta == row.n and not row.wbic_exact
    assert abs(row.llc_mean - 5) < 0.1 * 5 and abs(row.llc_mean - 5) < 4 * row.llc_sem + 0.03 * 5


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop-sgld"])
def test_fast_and_devinterp_backends_agree(mlp_context, sampler):
    common = dict(chains=4, draws=800, burnin=300, lr=1e-4, localization=100.0, batch_size=128, seed=1,
                  sampler=sampler, gradient="minibatch")
    fast = LLCEstimator(backend="fast", **common).run(mlp_context)["llc"].iloc[0]
    ref = LLCEstimator(backend="devinterp", **common).run(mlp_context)["llc"].iloc[0]
    assert fast.init_loss == ref.init_loss  # both use the full-data L_n(w*)
    tolerance = 3 * math.hypot(fast.llc_sem, ref.llc_sem) + 0.05 * abs(ref.llc_mean)
    assert abs(fast.llc_mean - ref.llc_mean) <= tolerance, (fast.llc_mean, ref.llc_mean, tolerance)
    assert ref.backend == "devinterp" and fast.backend == "fast"


def test_devinterp_adapter_gives_chains_fresh_independent_batches():
    """devinterp 2.0.1 replays its first epoch's batches forever and gives every chain the same ones;
    through the adapter, no batch comes back one epoch later and the two chains' batches differ."""
    from analyze.llc.devinterp import sample_losses_devinterp

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, labels = torch.randn(200, 3), torch.randint(0, 2, (200,))
    seen: list[frozenset] = []

    def recording_loss(out, ids):  # the adapter's targets are the sample ids themselves here
        seen.append(frozenset(ids.tolist()))
        return torch.nn.functional.cross_entropy(out, labels[ids], reduction="none")

    steps, batch = 24, 50
    settings = SGLDSettings(lr=1e-4, localization=10.0, nbeta=10.0, chains=2, draws=steps, burnin=0,
                            batch_size=batch, seed=0)
    traces = sample_losses_devinterp(model, recording_loss, x, torch.arange(200), settings)
    assert traces.shape == (2, steps) and np.isfinite(traces).all()
    chain0, chain1 = seen[-2 * steps:-steps], seen[-steps:]  # devinterp's init-loss batch comes first
    assert all(len(b) <= batch for b in chain0 + chain1)
    per_epoch = 200 // batch
    assert not any(chain0[t] == chain0[t + per_epoch] for t in range(steps - per_epoch))
    assert not any(a == b for a, b in zip(chain0, chain1))


def test_wbic_identity(mlp_context):
    """WBIC = n L_n(w*) + LLC log n, from the same draws at nbeta = n / log n."""
    out = LLCEstimator(chains=2, draws=100, burnin=20, nbeta="n/log n").run(mlp_context)["llc"].iloc[0]
    n = out.n
    assert out.nbeta == pytest.approx(n / math.log(n))
    assert out.wbic == pytest.approx(n * out.init_loss + out.llc_mean * math.log(n), rel=1e-10)
    assert not out.wbic_exact  # localization 100 makes it an approximation, and it says so
    exact = LLCEstimator(chains=2, draws=20, burnin=5, localization=0.0).run(mlp_context)["llc"].iloc[0]
    assert exact.wbic_exact


@pytest.mark.parametrize("sampler,batch,control_variate", [("sgld", 0, False), ("rmsprop-sgld", 0, False),
                                                           ("sgld", 10, False), ("sgld", 10, True)])
def test_sampler_follows_the_update_rule_exactly(sampler, batch, control_variate):
    """Three steps of the vmapped sampler equal the update rule written out for each chain, with each
    chain's own noise and batch streams: w <- w - eps/2 G (nbeta g(w) + gamma (w - w*)) + sqrt(eps G) N,
    G = 1 for SGLD and 1 / (sqrt(V) + 0.1) with V <- 0.99 V + 0.01 g^2 for RMSProp-SGLD (devinterp's);
    g(w) = grad L_B(w), or grad L_n(w*) + grad L_B(w) - grad L_B(w*) with control variates (the recorded
    loss likewise L_B(w), or L_n(w*) + L_B(w) - L_B(w*))."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).eval()
    x, y = torch.randn(50, 3), torch.randint(0, 2, (50,))
    settings = SGLDSettings(lr=1e-3, localization=30.0, nbeta=20.0, chains=2, draws=3, burnin=0, batch_size=batch,
                            seed=4, sampler=sampler, control_variate=control_variate)
    per_sample = nll_loss("classification", reduction="none")
    traces = sample_losses(model, per_sample, x, y, settings)
    names, w_star = zip(*[(name, p.detach().clone()) for name, p in model.named_parameters()])

    def loss_and_grad(params, rows):
        params = [p.detach().requires_grad_(True) for p in params]
        loss = per_sample(torch.func.functional_call(model, dict(zip(names, params)), (x[rows],)), y[rows]).mean()
        return loss.double().item(), torch.autograd.grad(loss, params)

    everything = torch.arange(50)
    loss_star, grad_star = loss_and_grad(w_star, everything)
    for c in range(2):
        noise = torch.Generator().manual_seed(chain_seed(4, c, 1))
        batches = torch.Generator().manual_seed(chain_seed(4, c, 0))
        w = list(w_star)
        v = [torch.zeros_like(p) for p in w_star]
        for t in range(3):
            rows = torch.randint(0, 50, (batch,), generator=batches) if batch else everything
            loss, grads = loss_and_grad(w, rows)
            if control_variate:
                loss_ref, grads_ref = loss_and_grad(w_star, rows)
                loss = loss_star + loss - loss_ref
                grads = [gs + g - gr for gs, g, gr in zip(grad_star, grads, grads_ref)]
            assert traces[c, t] == pytest.approx(loss, rel=1e-5)
            eta = torch.empty(sum(p.numel() for p in w)).normal_(generator=noise).split([p.numel() for p in w])
            v = [0.99 * vi + 0.01 * g ** 2 for vi, g in zip(v, grads)]
            G = [1 / (vi.sqrt() + 0.1) if sampler == "rmsprop-sgld" else torch.ones_like(vi) for vi in v]
            w = [p - 0.5e-3 * Gi * (20.0 * g + 30.0 * (p - p0)) + (1e-3 * Gi).sqrt() * e.view_as(p)
                 for p, g, p0, e, Gi in zip(w, grads, w_star, eta, G)]


def test_control_variate_removes_the_heating_of_small_batches():
    """Linear regression at n = 18,000 with a batch of 16 at the default step: plain minibatch gradients heat
    the chains far above d / 2 (11.2 +- 1.5 here); the control-variate gradients (SGLD-CV) land on it."""
    ctx = linear_regression_context(10, sigma=1.0, samples=22_500)
    common = dict(chains=4, draws=2000, burnin=500, batch_size="16", seed=2)
    plain = LLCEstimator(gradient="minibatch", **common).run(ctx)["llc"].iloc[0]
    cv = LLCEstimator(gradient="control-variate", **common).run(ctx)["llc"].iloc[0]
    assert cv.gradient == "control-variate" and cv.batch_size == 16 and cv.n == 18_000
    assert abs(cv.llc_mean - 5) < 0.15 * 5 + 2 * cv.llc_sem, cv.llc_mean
    assert plain.llc_mean > 1.5 * 5, plain.llc_mean


def test_reproducible_and_independent_chains(mlp_context):
    def traces(**kw):
        est = LLCEstimator(draws=60, burnin=10, **kw)
        return est.sample(mlp_context, est.settings(len(mlp_context.splits.train)))

    a, b = traces(chains=2, seed=5), traces(chains=2, seed=5)
    assert np.array_equal(a, b)  # same seed: identical
    assert not np.allclose(a[0], a[1])  # chains differ from each other
    c = traces(chains=2, seed=6)
    assert not np.allclose(a, c)  # another seed: other chains
    four = traces(chains=4, seed=5)
    np.testing.assert_allclose(four[:2], a, rtol=1e-5, atol=1e-7)  # chain c does not depend on the chain count


def test_diverging_chain_is_flagged_never_averaged(mlp_context):
    row = LLCEstimator(chains=2, draws=50, burnin=0, lr=1e20, localization=0.0).run(mlp_context)["llc"].iloc[0]
    assert row.diverged and row.n_diverged >= 1
    assert math.isnan(row.llc_mean) and math.isnan(row.wbic)
    assert any(math.isnan(v) for v in row.llc_per_chain)


def test_left_basin_is_detected(mlp_context):
    """A step far too large with no localization walks the chains away to chance-level loss."""
    row = LLCEstimator(chains=2, draws=300, burnin=0, lr=3e-2, localization=0.0).run(mlp_context)["llc"].iloc[0]
    assert not row.diverged
    assert row.left_basin and row.chains_left_basin >= 1
    assert row.mean_sampled_loss > row.init_loss + 0.5 * (row.chance_loss - row.init_loss)


def test_untrained_checkpoint_is_flagged_not_at_a_minimum(mlp_context):
    """At initialisation the chains descend below L_n(w*): the LLC is undefined there and says so;
    the trained checkpoint of the same run is not flagged."""
    settings = dict(chains=2, draws=100, burnin=50)
    init = context_for(mlp_context.checkpoint.path.parent / checkpoint_name(0))
    row = LLCEstimator(**settings).run(init)["llc"].iloc[0]
    assert row.not_at_minimum and row.mean_sampled_loss < row.init_loss
    trained = LLCEstimator(**settings).run(mlp_context)["llc"].iloc[0]
    assert not trained.not_at_minimum and trained.llc_mean > 0
    assert not_at_minimum(-2.0, 0.5) and not not_at_minimum(-1.0, 0.5) and not not_at_minimum(-5.0, math.nan)


def test_left_basin_rule_on_synthetic_traces():
    rng = np.random.default_rng(0)
    flat = 0.1 + 0.01 * rng.standard_normal(400)
    assert not chain_left_basin(flat, init_loss=0.05, chance_loss=2.3)
    to_chance = np.linspace(0.05, 2.2, 400)
    assert chain_left_basin(to_chance, init_loss=0.05, chance_loss=2.3)
    rising = 0.05 + np.linspace(0, 0.6, 400)  # not yet halfway but still climbing
    assert chain_left_basin(rising, init_loss=0.05, chance_loss=2.3)


def test_chain_table_thinning_and_burnin(mlp_context):
    tables = LLCEstimator(chains=3, draws=40, burnin=10, thin=5).run(mlp_context)
    chains = tables["llc_chains"]
    assert sorted(chains.chain.unique()) == [0, 1, 2]
    assert chains.groupby("chain").size().tolist() == [10, 10, 10]  # 50 steps, every 5th
    assert chains.burnin.sum() == 3 * 2 and chains.draw.min() == -10
    row = tables["llc"].iloc[0]
    assert len(row.llc_per_chain) == 3 and row.n_draws == 40 and row.n_burnin == 10


@pytest.mark.parametrize("options, flag", [
    (dict(nbeta="lots"), "--llc-nbeta"),
    (dict(nbeta="-3"), "--llc-nbeta"),
    (dict(sampler="sgnht"), "--llc-sampler"),
    (dict(backend="jax"), "--llc-backend"),
    (dict(chains="two"), "--llc-chains"),
    (dict(colour=1), "--llc-colour"),
    (dict(lr="fast"), "--llc-lr"),
    (dict(lr="0/nbeta"), "--llc-lr"),
    (dict(lr="-1e-4"), "--llc-lr"),
    (dict(localization="lots*nbeta"), "--llc-localization"),
    (dict(localization="-1"), "--llc-localization"),
    (dict(batch_size="big"), "--llc-batch-size"),
    (dict(batch_size="-5"), "--llc-batch-size"),
    (dict(backend="devinterp"), "--llc-gradient minibatch"),
])
def test_bad_options_name_the_flag(options, flag):
    with pytest.raises(EstimatorError, match=flag):
        LLCEstimator(**options)


def test_calibration_finds_the_truth_at_equal_sampling_time():
    """On a regular model (lambda = 5), calibrate runs every step for the same sampling time and prefers the weakest
    localization at which every step is healthy; where its two steps disagree (step-size bias) it tries a smaller
    step there before accepting a stronger localization, and recommends a setting within 15% of the truth."""
    ctx = linear_regression_context(10)
    study = dict(chains=4, draws=400, burnin=100)
    full = calibrate(ctx, lrs=["0.3/nbeta", "0.1/nbeta"], localizations=["1000", "1"],
                     nbetas=["n/log n"], common=dict(chains=4, draws=300, burnin=100, batch_size="0"),
                     progress=False, study=study, precision=0)
    # the pick ran once more at the study's length and was healthy there; a run at a third of its step with 3x the
    # burn-in and draws agrees with it (the step plateau of relaxed chains) and is recommended with its lengths
    confirmation = full[full.stage == "confirmation"]
    assert list(confirmation.check) == ["study length", "step"] and confirmation.healthy.all()
    assert list(confirmation.recommended) == [False, True]
    assert (confirmation.n_chains.iloc[0], confirmation.n_draws.iloc[0]) == (4, 400)
    step = confirmation.iloc[1]
    assert (step.lr_option, step.n_burnin, step.n_draws) == ("0.011/nbeta", 300, 1200)  # 3x: equal time
    assert step.llc_at_larger_step == confirmation.llc_mean.iloc[0] and step.agrees_with_larger_step
    setting = recommended_setting(full)
    assert (setting["lr"], setting["localization"], setting["burnin"], setting["draws"]) == ("0.011/nbeta", "1", 300,
                                                                                             1200)
    assert abs(setting["llc_mean"] - 5) < 0.15 * 5 and setting["llc_at_larger_step"] == step.llc_at_larger_step
    assert math.isnan(setting["llc_at_smaller_step"])  # nothing checked the recommended step in turn
    table = full[full.stage == "grid"]
    time_budget = table.n_draws * table.lr_nbeta
    assert np.allclose(time_budget, time_budget.iloc[0], rtol=0.02)  # a 3x smaller step runs 3x longer
    weak = table[table.localization_option == "1"].set_index("lr_option")
    assert not weak.loc["0.1/nbeta", "agrees_with_larger_step"]  # the step-size bias of the largest step
    # the smaller step was added at the weak localization, not at the strong one, and it is the recommendation
    assert len(table) == 5 and list(weak.index) == ["0.3/nbeta", "0.1/nbeta", "0.033/nbeta"]
    assert table.recommended.sum() == 1
    rec = table[table.recommended].iloc[0]
    assert rec.lr_option == "0.033/nbeta" and rec.localization_option == "1"
    assert rec.healthy and rec.agrees_with_larger_step
    assert abs(rec.llc_mean - 5) < 0.15 * 5
    # gamma 1000 is healthy too, but pulls the estimate far below the truth: the weaker localization wins
    strong = table[(table.localization_option == "1000") & (table.lr_option != "0.3/nbeta")]
    assert (strong.llc_mean < 0.6 * 5).all()
    # the stability product eps x nbeta x lambda_max, lambda_max against the exact Hessian of the mean Gaussian NLL
    # on the same 1280 samples: X~^T X~ / (m sigma^2), X~ the inputs with a column of ones
    from analyze.curvature.samples import training_subset

    x, _ = training_subset(ctx, 1280, 0)
    design = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    spectrum = torch.linalg.eigvalsh(design.T @ design / (len(x) * 0.5 ** 2))
    exact = spectrum[-1].item()
    assert table.lambda_max.iloc[0] == pytest.approx(exact, rel=1e-4)
    np.testing.assert_allclose(table.step_curvature, table.lr_nbeta * exact, rtol=1e-4)
    # a regular model's Hessian is positive definite: every localization's margin gamma + nbeta lambda_min is too
    assert table.lambda_min.iloc[0] == pytest.approx(spectrum[0].item(), rel=2e-3)
    np.testing.assert_allclose(table.localization_margin, table.localization + table.nbeta * spectrum[0].item(),
                               rtol=2e-3)


def test_more_chains_bring_the_standard_error_to_the_precision_asked():
    from analyze.llc.calibrate import MAX_CHAINS, more_chains

    row = {"n_chains": 4, "llc_mean": 5.0, "llc_sem": 0.5}
    assert more_chains(row, 0.05) == 16  # (0.5 / 0.25)^2 = 4 times the chains
    assert more_chains({**row, "llc_sem": 0.3}, 0.05) == 6  # 4 x 1.44 = 5.76, rounded up
    assert more_chains({**row, "llc_sem": 0.2}, 0.05) == 4  # already precise enough
    assert more_chains({**row, "llc_sem": 2.0}, 0.05) == MAX_CHAINS  # 256 asked, capped
    assert more_chains({**row, "n_chains": 20, "llc_sem": 2.0}, 0.05) == 20  # never fewer than it ran
    assert more_chains(row, 0) == 4 and more_chains({**row, "llc_sem": float("nan")}, 0.05) == 4
    # a run whose own error looks precise, from chains that spread by SD 1 in the runs before it: 16 chains
    assert more_chains({**row, "llc_sem": 0.05}, 0.05, spread=1.0) == 16


def test_the_chains_spread_is_pooled_over_healthy_runs():
    """The demo's three confirmation runs at gamma 3 (4 chains each, SDs 3.69, 6.61 and 0.65): pooled by degrees of
    freedom, sqrt((13.65 + 43.7 + 0.42) / 3) = 4.39; an unhealthy run and a one-chain run do not count."""
    from analyze.llc.calibrate import pooled_spread

    def run(sd, chains=4, healthy=True):
        return {"llc_std": sd, "n_chains": chains, "healthy": healthy}

    demo = [run(3.695), run(6.606), run(0.650)]
    assert pooled_spread(demo) == pytest.approx(math.sqrt((3.695 ** 2 + 6.606 ** 2 + 0.650 ** 2) / 3))
    assert pooled_spread(demo + [run(50.0, healthy=False), run(50.0, chains=1)]) == pooled_spread(demo)
    assert pooled_spread([run(2.0, chains=2), run(4.0, chains=6)]) == pytest.approx(math.sqrt((4 + 5 * 16) / 6))
    assert math.isnan(pooled_spread([run(1.0, chains=1)]))


def test_calibration_confirms_with_the_chains_its_precision_needs():
    """A confirmed pick whose standard error is above `precision` of its LLC runs once more, at its settled burn-in,
    with the chains that bring it there; that run is the recommendation, its chains included."""
    from analyze.llc.calibrate import more_chains

    ctx = linear_regression_context(10)
    full = calibrate(ctx, lrs=["0.3/nbeta", "0.1/nbeta"], localizations=["1"], nbetas=["n/log n"],
                     common=dict(chains=4, draws=300, burnin=100, batch_size="0"), progress=False,
                     study=dict(chains=2, draws=400, burnin=300), precision=0.002)
    confirmation = full[full.stage == "confirmation"]
    assert list(confirmation.check) == ["study length", "step", "chains"] and confirmation.healthy.all()
    first, precise = confirmation.iloc[1], confirmation.iloc[2]
    assert first.agrees_with_larger_step  # the step check is the pick
    assert first.llc_sem > 0.002 * first.llc_mean  # two chains are not precise enough for 0.2%
    assert precise.n_chains == more_chains(first.to_dict(), 0.002) > 2
    assert (precise.n_draws, precise.n_burnin, precise.lr_option) == (first.n_draws, first.n_burnin, first.lr_option)
    assert list(confirmation.recommended) == [False, False, True]
    setting = recommended_setting(full)
    assert (setting["chains"], setting["llc_sem"]) == (precise.n_chains, precise.llc_sem)
    # the comparison printed with it is its step check's: against the pick at three times the step
    assert setting["llc_at_larger_step"] == first.llc_at_larger_step == confirmation.llc_mean.iloc[0]
    assert abs(setting["llc_mean"] - 5) < 0.15 * 5
    # at the default precision (5%) the same two chains suffice: no extra run
    default = calibrate(ctx, lrs=["0.3/nbeta", "0.1/nbeta"], localizations=["1"], nbetas=["n/log n"],
                        common=dict(chains=4, draws=300, burnin=100, batch_size="0"), progress=False,
                        study=dict(chains=2, draws=400, burnin=300))
    assert (default.stage == "confirmation").sum() == 2 and recommended_setting(default)["chains"] == 2


def test_a_step_unstable_in_the_stiffest_direction_is_not_healthy():
    from analyze.llc.statistics import healthy
    from analyze.llc.stability import STABLE_STEP

    row = {"diverged": False, "left_basin": False, "not_at_minimum": False, "rhat": 1.0, "drift": 0.0}
    assert healthy({**row, "step_curvature": 0.5 * STABLE_STEP})
    assert not healthy({**row, "step_curvature": STABLE_STEP})


def test_llc_rows_record_the_steps_stability_and_their_health():
    """Every llc row measures lambda_max at its checkpoint (against the exact Hessian of linear regression) and
    is healthy only when eps x nbeta x lambda_max < 2: a step that is still stable (< 4) but inflates the
    stiffest direction's variance is flagged, though nothing in its chains looks wrong."""
    from analyze.curvature.samples import training_subset
    from analyze.llc.stability import STABLE_STEP

    ctx = linear_regression_context(10)
    x, _ = training_subset(ctx, 1280, 0)
    design = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    exact = torch.linalg.eigvalsh(design.T @ design / (len(x) * 0.5 ** 2))[-1].item()
    common = dict(chains=4, draws=400, burnin=200, batch_size="0", localization="1")
    small = LLCEstimator(lr=f"{0.25 / exact:.4g}/nbeta", **common).run(ctx)["llc"].iloc[0]
    large = LLCEstimator(lr=f"{3 / exact:.4g}/nbeta", **common).run(ctx)["llc"].iloc[0]
    assert small.lambda_max == pytest.approx(exact, rel=1e-4)
    assert small.step_curvature == pytest.approx(0.25, rel=1e-3) and small.healthy
    assert large.step_curvature == pytest.approx(3, rel=1e-3) and large.step_curvature >= STABLE_STEP
    assert not large.diverged and not large.left_basin and not large.healthy
    assert large.llc_mean > small.llc_mean + 2 * math.hypot(small.llc_sem, large.llc_sem)  # the bias it flags
    skipped = LLCEstimator(lr="0.03/nbeta", stability=False, **common).run(ctx)["llc"].iloc[0]
    assert math.isnan(skipped.lambda_max) and skipped.healthy  # not measured: only the chains decide


def test_calibration_runs_only_stable_steps_and_adds_smaller_ones_on_a_stiff_model():
    """With every given step unstable (eps x nbeta x lambda_max >= 2), calibrate runs none of them and adds as many
    stable steps a factor 3 apart below them; their recommendation lands on the truth (lambda = 5)."""
    from analyze.llc.calibrate import stable_steps
    from analyze.llc.stability import STABLE_STEP

    assert stable_steps(["0.1/nbeta", "1/nbeta"], 100.0, 10.0) == ["0.1/nbeta", "0.033/nbeta"]
    assert stable_steps(["0.3/nbeta", "1/nbeta"], 100.0, 10.0) == ["0.1/nbeta", "0.033/nbeta"]
    assert stable_steps(["0.01/nbeta", "0.1/nbeta"], 100.0, 1.0) == ["0.1/nbeta", "0.01/nbeta"]
    ctx = linear_regression_context(10)  # lambda_max about 4.5
    table = calibrate(ctx, lrs=["1/nbeta", "0.7/nbeta", "0.5/nbeta"], localizations=["1"], nbetas=["n/log n"],
                      common=dict(chains=4, draws=300, burnin=100, batch_size="0"), progress=False)
    assert list(table.lr_option) == ["0.17/nbeta", "0.056/nbeta", "0.019/nbeta"]
    assert (table.step_curvature < STABLE_STEP).all() and (table.step_curvature > 0.5).any()
    assert table.n_draws.iloc[1] == pytest.approx(3 * table.n_draws.iloc[0], rel=0.02)  # equal sampling time
    rec = table[table.recommended].iloc[0]
    assert abs(rec.llc_mean - 5) < 0.15 * 5


def test_a_grid_point_still_settling_runs_again_with_a_longer_burn_in():
    """Chains started at the checkpoint with almost no burn-in are still moving out to the posterior during their
    draws (drift far above 3): calibrate runs that point once more with SETTLE_BURNIN x the burn-in, and the row
    records the longer burn-in; a point that is healthy at once is not run again."""
    from analyze.llc.calibrate import SETTLE_BURNIN, grid_point, still_settling

    ctx = linear_regression_context(10)
    common = dict(chains=4, draws=200, burnin=1, batch_size="0")
    first = LLCEstimator(lr="0.01/nbeta", localization="1", stability=False, seed=0, **common).run(ctx)["llc"]
    first = first.iloc[0].to_dict()  # the grid point's first attempt (its seed is 1009 x seed + index = 0)
    assert abs(first["drift"]) > 3 and still_settling(first)
    row = grid_point(ctx, "0.01/nbeta", "1", "n/log n", "0.01/nbeta", common, 0, math.nan)
    assert row["n_burnin"] == SETTLE_BURNIN and row["llc_mean"] != first["llc_mean"]
    settled = grid_point(ctx, "0.1/nbeta", "1", "n/log n", "0.1/nbeta", {**common, "burnin": 200}, 0, math.nan)
    assert settled["healthy"] and settled["n_burnin"] == 200
    assert not still_settling({**settled, "healthy": False, "left_basin": True, "drift": 9.0})


def test_a_pick_that_fails_at_the_studys_length_is_not_recommended():
    """The grid's pick (0.033/nbeta at gamma 1) runs again at the study's length; with 40 draws its chains fail the
    health test (R-hat) at the study's burn-in, 3x and 9x it: that localization is set aside, and as the stronger
    one has no two steps that agree, nothing is recommended."""
    ctx = linear_regression_context(10)
    table = calibrate(ctx, lrs=["0.3/nbeta", "0.1/nbeta"], localizations=["1000", "1"], nbetas=["n/log n"],
                      common=dict(chains=4, draws=300, burnin=100, batch_size="0"), progress=False,
                      study=dict(chains=4, draws=40, burnin=4))
    confirmation = table[table.stage == "confirmation"]
    assert list(confirmation.n_burnin) == [4, 12, 36] and (confirmation.n_draws == 40).all()
    assert set(confirmation.lr_option) == {"0.033/nbeta"} and not confirmation.healthy.any()
    assert table[table.stage == "grid"].healthy.all()  # the short grid chains saw nothing wrong
    assert not table.recommended.any() and recommended_setting(table) is None


def test_a_confirmation_that_disagrees_with_its_grid_point_runs_again_at_the_grid_points_burn_in():
    """The grid point is the plateau's evidence. A confirmation run with fewer burn-in steps that does not agree with
    it (here: a grid row that claims 50 +- 0.1 after 900 burn-in steps, on a model whose LLC is 5) runs once more at
    the grid point's burn-in, and that run is the recommendation; one that agrees runs once."""
    from analyze.llc.calibrate import confirm, shorter_and_disagreeing

    ctx = linear_regression_context(10)
    common = dict(chains=4, draws=300, burnin=100, batch_size="0")
    grid = pd.DataFrame([{"nbeta_option": "n/log n", "localization_option": "1", "lr_option": "0.1/nbeta",
                          "localization": 1.0, "lr": 0.1, "nbeta": 200.0, "healthy": True,
                          "agrees_with_larger_step": True, "llc_mean": 50.0, "llc_sem": 0.1, "n_burnin": 900,
                          "stage": "grid"}])
    study = dict(chains=4, draws=300, burnin=100)
    # the loss holds every direction of a regular model: 100 burn-in steps cover 3 relaxation times
    lambda_min = bottom_hessian_eigenvalue(ctx)
    table = confirm(ctx, grid, ["n/log n"], ["1"], common, study, math.nan, lambda_min, progress=False)
    confirmation = table[table.stage == "confirmation"]
    assert list(confirmation.check) == ["study length", "grid burn-in", "step"]
    assert list(confirmation.n_burnin) == [100, 900, 2700] and confirmation.healthy.all()
    assert list(confirmation.recommended) == [False, False, True]  # the step check at the grid point's burn-in x 3
    assert abs(confirmation.llc_mean.iloc[1] - 5) < 0.15 * 5 and abs(confirmation.llc_mean.iloc[2] - 5) < 0.15 * 5
    assert shorter_and_disagreeing(confirmation.iloc[0], grid.iloc[0])
    # a grid point the confirmation agrees with: one run, at the study's burn-in
    agreeing = grid.assign(llc_mean=confirmation.llc_mean.iloc[0], llc_sem=confirmation.llc_sem.iloc[0])
    table = confirm(ctx, agreeing, ["n/log n"], ["1"], common, study, math.nan, lambda_min, progress=False)
    assert list(table[table.stage == "confirmation"].n_burnin) == [100, 300]  # and the step check
    # a confirmation with at least the grid point's burn-in is never run again, whatever it gives
    assert not shorter_and_disagreeing({**confirmation.iloc[0].to_dict(), "n_burnin": 900}, grid.iloc[0])


def with_dead_inputs(ctx: Context, dead: int) -> Context:
    """The linear regression with its first `dead` inputs always 0, refitted: their weights are exactly flat
    directions (the loss does not see them), and the learning coefficient is (d - dead) / 2."""
    for split in (ctx.splits.train, ctx.splits.val, ctx.splits.test):
        split.x[:, :dead] = 0.0
    live = torch.cat([ctx.splits.train.x[:, dead:], torch.ones(len(ctx.splits.train), 1)], 1).double()
    solution = torch.linalg.lstsq(live, ctx.splits.train.y.double()).solution
    with torch.no_grad():
        ctx.model.out.weight.zero_()
        ctx.model.out.weight[:, dead:].copy_(solution[:-1].T)
        ctx.model.out.bias.copy_(solution[-1])
    return ctx


def test_a_confirmed_burn_in_covers_the_relaxation_of_the_flattest_direction():
    """Where only the localizer holds a direction, the chains' spread along it relaxes in 1/(eps gamma) steps. On a
    linear regression with 4 dead inputs (lambda_min = 0, LLC 3): gamma 1 would need 3 x 1/(eps gamma) burn-in
    steps, beyond the 9 x 100 confirm runs at most, so it is set aside unrun; gamma 10's pick runs at the study's
    100 burn-in steps and once more at 3 relaxation times, the two agree (the dead weights do not move the loss), so
    the shorter stands and is checked at a third of its step (relaxed), which agrees and is recommended."""
    from analyze.llc.calibrate import RELAXATION_TIMES, confirm
    from analyze.llc.stability import relaxation_steps

    ctx = with_dead_inputs(linear_regression_context(10), 4)
    lambda_min = bottom_hessian_eigenvalue(ctx)
    assert abs(lambda_min) < 1e-4
    nbeta = len(ctx.splits.train) / math.log(len(ctx.splits.train))
    eps = 0.1 / nbeta
    assert relaxation_steps(eps, 10.0, nbeta, lambda_min) == pytest.approx(1 / (eps * 10), rel=1e-3)
    # a regular direction relaxes through its curvature: 1 / (eps (gamma + nbeta h))
    assert relaxation_steps(eps, 10.0, nbeta, 2.0) == pytest.approx(1 / (eps * (10 + 2 * nbeta)))
    assert relaxation_steps(eps, 10.0, nbeta, -2.0) == relaxation_steps(eps, 10.0, nbeta, 0.0)  # a dip counts as 0
    assert relaxation_steps(eps, 10.0, nbeta, math.nan) == relaxation_steps(eps, 10.0, nbeta, 0.0)  # so does no value
    assert relaxation_steps(eps, 0.0, nbeta, 0.0) == math.inf

    grid = pd.DataFrame([grid_row(1.0, 0.1, nbeta), grid_row(10.0, 0.1, nbeta)])
    common, study = dict(chains=4, draws=300, burnin=100, batch_size="0"), dict(chains=4, draws=300, burnin=100)
    table = confirm(ctx, grid, ["n/log n"], ["1", "10"], common, study, math.nan, lambda_min, progress=False)
    confirmation = table[table.stage == "confirmation"]
    needed = math.ceil(RELAXATION_TIMES / (eps * 10))
    assert 100 < needed <= 900 and RELAXATION_TIMES / (eps * 1) > 900
    assert set(confirmation.localization_option) == {"10"}  # gamma 1 was set aside without a run
    assert list(confirmation.n_burnin) == [100, needed, 3 * needed] and confirmation.healthy.all()
    # the step check at a third of the step covers as many relaxation times (3x the longer burn-in), agrees with the
    # shorter run (which agrees with the relaxed one) and is recommended
    assert confirmation.check.iloc[2] == "step" and confirmation.agrees_with_larger_step.iloc[2]
    assert confirmation.llc_at_larger_step.iloc[2] == confirmation.llc_mean.iloc[0]
    assert list(confirmation.recommended) == [False, False, True]
    assert abs(confirmation.llc_mean.iloc[0] - 3) < 0.15 * 3
    assert list(table[table.stage == "grid"].recommended) == [False, True]
    # with gamma 1 alone there is nothing to recommend
    alone = confirm(ctx, grid.iloc[:1], ["n/log n"], ["1"], common, study, math.nan, lambda_min, progress=False)
    assert not alone.recommended.any() and (alone.stage == "grid").all()


def grid_row(loc: float, c: float, nbeta: float, agrees: bool = True) -> dict:
    """A healthy calibration grid row at step c/nbeta and localization `loc` (LLC 3 +- 0.1 after 100 steps)."""
    return {"nbeta_option": "n/log n", "localization_option": f"{loc:g}", "lr_option": f"{c:.2g}/nbeta",
            "localization": loc, "lr": c / nbeta, "nbeta": nbeta, "healthy": True, "agrees_with_larger_step": agrees,
            "llc_mean": 3.0, "llc_sem": 0.1, "n_burnin": 100, "stage": "grid"}


def test_a_pick_too_slow_to_relax_starts_from_the_plateaus_larger_step():
    """The grid's plateau at gamma 10 ends at 0.033/nbeta, whose 3 relaxation times are beyond the 9 x 100 burn-in
    steps confirm runs at most; its larger neighbour 0.1/nbeta relaxes within them. The confirmation starts there,
    relaxes, and its step check at a third of the step (0.033/nbeta, with the step check's longer budget) agrees:
    the plateau's pick is recommended at the check's lengths. From a pick that needs a plateau, a check that never
    agrees sets the localization aside (test_a_relaxed_pick_off_the_step_plateau_moves_to_the_smaller_step)."""
    from analyze.llc.calibrate import RELAXATION_TIMES, confirm, relaxable_start

    ctx = with_dead_inputs(linear_regression_context(10), 4)
    lambda_min = bottom_hessian_eigenvalue(ctx)
    nbeta = len(ctx.splits.train) / math.log(len(ctx.splits.train))
    grid = pd.DataFrame([grid_row(10.0, 0.1, nbeta, agrees=False), grid_row(10.0, 0.1 / 3, nbeta)])
    needed = math.ceil(RELAXATION_TIMES * nbeta / (0.1 * 10))
    assert 100 < needed <= 900 < 3 * needed
    assert relaxable_start(grid, 1, lambda_min, 900) == 0 and relaxable_start(grid, 1, lambda_min, 3 * needed) == 1
    assert relaxable_start(grid, 1, lambda_min, needed - 1) is None  # neither relaxes: set aside unrun
    assert relaxable_start(grid.assign(agrees_with_larger_step=False), 1, lambda_min, 900) is None  # no plateau
    common, study = dict(chains=4, draws=300, burnin=100, batch_size="0"), dict(chains=4, draws=300, burnin=100)
    table = confirm(ctx, grid, ["n/log n"], ["10"], common, study, math.nan, lambda_min, progress=False)
    confirmation = table[table.stage == "confirmation"]
    assert list(confirmation.check) == ["study length", "relaxation", "step"] and confirmation.healthy.all()
    assert list(confirmation.lr_option) == ["0.1/nbeta", "0.1/nbeta", "0.033/nbeta"]
    assert list(confirmation.n_burnin) == [100, needed, 3 * needed]
    assert list(confirmation.recommended) == [False, False, True] and confirmation.agrees_with_larger_step.iloc[2]
    assert list(table[table.stage == "grid"].recommended) == [False, True]  # the plateau's pick
    assert abs(confirmation.llc_mean.iloc[2] - 3) < 0.15 * 3


def test_a_confirmation_that_disagrees_with_its_relaxed_run_is_replaced_by_it():
    """A healthy confirmation run whose burn-in is under 3 relaxation times is checked against a real run at 3: one
    that cannot be right (it claims 50 +- 0.1 where the LLC is 3) is replaced by the relaxed run, with its burn-in;
    one that agrees is kept (the shorter burn-in); one whose burn-in already covers them runs nothing more."""
    from analyze.llc.calibrate import RELAXATION_TIMES, relaxed, settled_point

    ctx = with_dead_inputs(linear_regression_context(10), 4)
    lambda_min = bottom_hessian_eigenvalue(ctx)
    nbeta = len(ctx.splits.train) / math.log(len(ctx.splits.train))
    common = dict(chains=4, draws=300, burnin=100, batch_size="0")

    def run_pick(options: dict, seed_block: int, attempts: int = 3, check: str = "", lr: str = "0.1/nbeta"):
        return settled_point(ctx, lr, "10", "n/log n", {**common, **options}, attempts, seed_block, math.nan)

    short = {"lr": 0.1 / nbeta, "localization": 10.0, "nbeta": nbeta, "n_burnin": 100, "healthy": True,
             "llc_mean": 50.0, "llc_sem": 0.1}
    pick, attempts = relaxed([short], run_pick, lambda_min, progress=False)
    needed = math.ceil(RELAXATION_TIMES * nbeta / (0.1 * 10))
    assert pick == 1 and len(attempts) == 2 and attempts[1]["n_burnin"] == needed and attempts[1]["healthy"]
    assert abs(attempts[1]["llc_mean"] - 3) < 0.15 * 3
    agreeing = {**short, "llc_mean": attempts[1]["llc_mean"], "llc_sem": attempts[1]["llc_sem"]}
    pick, attempts = relaxed([agreeing], run_pick, lambda_min, progress=False)
    assert pick == 0 and len(attempts) == 2
    pick, attempts = relaxed([{**short, "n_burnin": needed}], run_pick, lambda_min, progress=False)
    assert pick == 0 and len(attempts) == 1


def step_check_case(ctx: Context, c: float, localization: float, common: dict, **row) -> tuple:
    """What step_plateau gets from confirm: run_pick at the pick's localization (rows tagged with their check), and
    a relaxed healthy pick at step c/nbeta with `row`'s burn-in, draws and estimate."""
    from analyze.llc.calibrate import settled_point

    nbeta = len(ctx.splits.train) / math.log(len(ctx.splits.train))

    def run_pick(options: dict, seed_block: int, attempts: int = 3, check: str = "", lr: str = f"{c:g}/nbeta"):
        rows = settled_point(ctx, lr, f"{localization:g}", "n/log n", {**common, **options}, attempts, seed_block,
                             math.nan)
        return [{**r, "check": check} for r in rows]

    pick = {"lr": c / nbeta, "lr_nbeta": c, "lr_option": f"{c:g}/nbeta", "localization": localization, "nbeta": nbeta,
            "localization_option": f"{localization:g}", "nbeta_option": "n/log n", "n_chains": common["chains"],
            "healthy": True, "check": "relaxation", **row}
    return run_pick, pick


def test_a_relaxed_pick_off_the_step_plateau_moves_to_the_smaller_step(capsys):
    """A relaxed pick runs once more at a third of its step (3x the burn-in and draws). One that cannot be right (it
    claims 50 +- 0.1 where the LLC is 3) disagrees with that run, which replaces it and is checked in turn at a third
    of its own step: those two agree, and the smaller of the two is recommended. Where the second check would pass
    the longest burn-in, the first smaller step is recommended unchecked; a pick on the plateau is recommended at the
    step of its first check, which agrees."""
    from analyze.llc.calibrate import step_plateau

    ctx = with_dead_inputs(linear_regression_context(10), 4)
    lambda_min = bottom_hessian_eigenvalue(ctx)
    common = dict(chains=4, draws=300, burnin=300, batch_size="0")
    run_pick, wrong = step_check_case(ctx, 0.3, 30.0, common, n_burnin=300, n_draws=300, llc_mean=50.0, llc_sem=0.1)
    pick, attempts = step_plateau([wrong], 0, run_pick, lambda_min, 10_000, progress=False)
    assert pick == 2 and [a["check"] for a in attempts] == ["relaxation", "step", "step"]
    assert [a["lr_option"] for a in attempts] == ["0.3/nbeta", "0.1/nbeta", "0.033/nbeta"]
    assert [a["n_burnin"] for a in attempts] == [300, 900, 2700]
    assert [a["n_draws"] for a in attempts] == [300, 900, 2700]
    assert [a["agrees_with_larger_step"] for a in attempts[1:]] == [False, True]
    assert attempts[2]["llc_at_larger_step"] == attempts[1]["llc_mean"]
    assert abs(attempts[1]["llc_mean"] - 3) < 0.15 * 3
    # the second check would need 2,700 burn-in steps: beyond 2,000 the smaller step is recommended unchecked
    pick, attempts = step_plateau([wrong], 0, run_pick, lambda_min, 2_000, progress=True)
    assert pick == 1 and len(attempts) == 2
    assert ("no step plateau and a third of 0.1/nbeta would need 2,700 burn-in steps, more than 2,000; recommending "
            "the smallest step run, 0.1/nbeta") in capsys.readouterr().err
    # a pick started above the grid's plateau bottom (relaxable_start) needs the plateau: set aside
    pick, attempts = step_plateau([wrong], 0, run_pick, lambda_min, 2_000, progress=True, plateau_required=True)
    assert pick is None and len(attempts) == 2
    assert "no step plateau and a third of 0.1/nbeta would need 2,700" in capsys.readouterr().err
    # a pick on the plateau: its check agrees at once, and is recommended (the smaller step bias)
    right = {**wrong, "llc_mean": attempts[1]["llc_mean"], "llc_sem": attempts[1]["llc_sem"]}
    pick, attempts = step_plateau([right], 0, run_pick, lambda_min, 10_000, progress=False)
    assert pick == 1 and len(attempts) == 2 and attempts[1]["agrees_with_larger_step"]


def test_a_step_check_still_settling_leaves_the_checked_step_recommended(capsys):
    """A step check whose chains are unhealthy by R-hat alone (90 draws, 27 burn-in steps) says nothing about the
    step: the pick it checked stays recommended, and calibrate says so in one line; the printed recommendation
    shows the check's LLC as unsettled, not as a plateau test."""
    from analyze.llc.calibrate import confirmation_rows, step_plateau, still_settling
    from analyze.llc.calibrate_command import recommended_text

    ctx = linear_regression_context(10)
    lambda_min = bottom_hessian_eigenvalue(ctx)
    common = dict(chains=4, draws=200, burnin=1, batch_size="0")
    run_pick, pick_row = step_check_case(ctx, 0.1, 1.0, common, n_burnin=1, n_draws=30, llc_mean=5.0, llc_sem=0.1)
    pick, attempts = step_plateau([pick_row], 0, run_pick, lambda_min, 10_000, progress=True)
    check = attempts[1]
    assert (check["lr_option"], check["n_draws"]) == ("0.033/nbeta", 90)
    assert not check["healthy"] and still_settling(check) and check["rhat"] > 1.1
    assert pick == 0 and len(attempts) == 2
    assert "the step check's chains were still settling" in capsys.readouterr().err
    assert step_plateau([pick_row], 0, run_pick, lambda_min, 10_000, progress=False, plateau_required=True)[0] is None
    table = pd.DataFrame(confirmation_rows(attempts, pick))
    setting = recommended_setting(table)
    assert (setting["lr"], setting["llc_at_smaller_step"]) == ("0.1/nbeta", check["llc_mean"])
    assert not setting["smaller_step_healthy"]
    assert recommended_text(setting, "sgld").endswith(
        f"at a third of the step, relaxed: {check['llc_mean']:.3g}, its chains still settling: no plateau test)")


def test_calibration_gives_up_a_localization_whose_chains_roam(mlp_context):
    """Without localization the MLP's chains roam (R-hat far above 1.1) even with 3x the burn-in: the smaller steps
    at that localization are not run (they would cost the most), while at a localization where the chains are
    healthy every step runs."""
    table = calibrate(mlp_context, lrs=["0.1/nbeta", "0.03/nbeta"], localizations=["0", "1000"], nbetas=["n/log n"],
                      common=dict(chains=2, draws=60, burnin=30, batch_size="0"), progress=False)
    free = table[table.localization_option == "0"]
    assert len(free) == 1 and not free.healthy.iloc[0] and free.lr_option.iloc[0] == "0.1/nbeta"
    assert free.n_burnin.iloc[0] == 90 and free.rhat.iloc[0] > 1.1  # the settling rerun ran, and did not help
    assert len(table[table.localization_option == "1000"]) == 2 and table.attrs["given_up"] == ["0"]


def test_agreement_uses_the_standard_errors():
    from analyze.llc.calibrate import agree

    def est(mean, sem, chains=4):
        return {"llc_mean": mean, "llc_sem": sem, "n_chains": chains}

    assert agree(est(10.0, 1.0), est(12.0, 1.0))  # 2 < 2 x 1.41 + 0.6
    assert not agree(est(10.0, 0.1), est(12.0, 0.1))
    assert not agree(est(10.0, math.nan), est(10.0, 0.1))
    # the demo's MLP at gamma 1 (cut-off checkpoint): 50.1 +- 1.43 at 0.03/nbeta and 43.3 +- 1.40 at 0.01/nbeta, 4
    # chains each, are no plateau (2 normal errors + 5%: 6.5 < 6.8); Student's t (2.52 x 2.0 + 2.5 = 7.5) would
    # have accepted them, and gamma 1 was recommended where the chains descend
    assert not agree(est(43.34, 1.400), est(50.13, 1.431))


def test_recommendation_skips_a_localization_where_any_step_is_unhealthy():
    from analyze.llc.calibrate import recommend

    table = pd.DataFrame({
        "nbeta_option": ["n/log n"] * 4, "localization_option": ["1", "1", "100", "100"],
        "localization": [1.0, 1.0, 100.0, 100.0], "lr": [2e-4, 1e-4, 2e-4, 1e-4],
        "healthy": [False, True, True, True], "agrees_with_larger_step": [False, True, False, True]})
    assert recommend(table, ["n/log n"], ["1", "100"]) == 3
    assert recommend(table.assign(healthy=False), ["n/log n"], ["1", "100"]) is None


def test_a_plateau_must_reach_the_smallest_step():
    """The demo's MLP at gamma 1: 51 and 50 at 0.1 and 0.03 / nbeta agree, but 43 at 0.01 falls away, so the larger
    pair is no plateau and nothing is recommended there; the stronger localization's bottom plateau is."""
    from analyze.llc.calibrate import bottom_plateau, recommend

    table = pd.DataFrame({
        "nbeta_option": ["n/log n"] * 6, "localization_option": ["1"] * 3 + ["10"] * 3,
        "localization": [1.0] * 3 + [10.0] * 3, "lr": [0.1, 0.03, 0.01] * 2, "healthy": [True] * 6,
        "agrees_with_larger_step": [False, True, False, False, False, True]})
    assert bottom_plateau(table[table.localization_option == "1"]).empty
    assert list(bottom_plateau(table[table.localization_option == "10"]).lr) == [0.01]
    assert recommend(table, ["n/log n"], ["1", "10"]) == 5
    table.loc[2, "agrees_with_larger_step"] = True  # now 0.01 agrees with 0.03 too: the plateau runs up to 0.03
    assert recommend(table, ["n/log n"], ["1", "10"]) == 1


def test_standard_error_matches_the_spread_over_chain_seeds(mlp_context, make_ckpts):
    """Over 20 chain seeds, the SD of llc_mean matches the mean reported llc_sem within a factor 1.5, on a deep
    linear net (where ArviZ's within-chain mcse was 6x too large) and on a ReLU MLP."""
    out = make_ckpts(Path(tempfile.mkdtemp()) / "ck", dataset="teacher", teacher_task="regression",
                     teacher_samples=600, teacher_input_dim=4, teacher_outputs=4, teacher_noise_sigma=1.0,
                     teacher_model_type="dlnn", teacher_hidden_nodes=3, teacher_hidden_layers=2, teacher_bias=False,
                     teacher_rank=2, model_type="dlnn", hidden_nodes=[3], hidden_layers=[2], bias=False,
                     experiment_type="standard", optimizer="sgd", batch_size=600, sgd_lr=0.05, num_epochs=60,
                     truth_checkpoint=True)
    for ctx, localization in ((context_for(out / "dlnn-2x3-nobias-truth" / checkpoint_name(0)), "10"),
                              (mlp_context, "100")):
        rows = pd.DataFrame([LLCEstimator(seed=seed, chains=4, draws=300, burnin=300, localization=localization)
                             .run(ctx)["llc"].iloc[0] for seed in range(20)])
        spread, reported = rows.llc_mean.std(ddof=1), rows.llc_sem.mean()
        assert spread / 1.5 < reported < spread * 1.5, (spread, reported)


def test_relative_options_take_their_value_at_this_nbeta():
    from analyze.estimators.llc import AUTO_BATCH, AUTO_BATCH_CV

    plain = LLCEstimator(lr="0.03/nbeta", localization="0.5*nbeta", gradient="minibatch").settings(n=10_000)
    nbeta = 10_000 / math.log(10_000)
    assert plain.nbeta == pytest.approx(nbeta) and not plain.control_variate
    assert plain.lr * plain.nbeta == pytest.approx(0.03) and plain.localization == pytest.approx(0.5 * nbeta)
    assert plain.batch_size == math.ceil(AUTO_BATCH * 0.03 * nbeta) > AUTO_BATCH_CV
    cv = LLCEstimator(lr="0.03/nbeta").settings(n=10_000)  # the default: control variates, a capped batch
    assert cv.control_variate and cv.batch_size == AUTO_BATCH_CV
    assert LLCEstimator().settings(n=1_000).batch_size == math.ceil(AUTO_BATCH * 0.03 * 1_000 / math.log(1_000))
    assert LLCEstimator(lr="1/nbeta", gradient="minibatch").settings(n=100).batch_size == 100  # at most n
    assert LLCEstimator(lr="1e-4", localization="100", batch_size="64").settings(n=5000).lr == 1e-4
    # burn-in 'auto' (the default): 1,000 steps at n = 1,000, growing as sqrt(nbeta) beyond
    assert LLCEstimator().settings(n=1_000).burnin == 1_000 and LLCEstimator().settings(n=300).burnin == 1_000
    n = 59_940
    assert LLCEstimator().settings(n=n).burnin == round(1_000 * math.sqrt(n / math.log(n) / 145.0)) == 6_130
    assert LLCEstimator(burnin=250).settings(n=n).burnin == 250
    with pytest.raises(EstimatorError, match="--llc-burnin"):
        LLCEstimator(burnin="soon").validate()


def test_drift_flags_a_chain_still_settling():
    from analyze.llc.statistics import drift

    rng = np.random.default_rng(0)
    steady = rng.normal(1.0, 0.1, size=(4, 400))
    settling = steady + np.linspace(0, 0.2, 400)  # the loss still rising through the kept draws
    assert abs(drift(steady, 10.0)) < 3 < drift(settling, 10.0)
    assert math.isnan(drift(steady[:1], 10.0))  # one chain: nothing to compare


def test_calibrate_command_writes_a_table_that_joins_the_analysis(tiny_ckpts, capsys):
    """`analyze calibrate` writes through the analysis store: analyze.load() returns the table, and its
    ckpt_hash is the one every estimator table uses for the same checkpoint."""
    import analyze
    from analyze.cli import main

    ckpt = tiny_ckpts / "ffnn-1x8-trunk" / checkpoint_name(2)
    assert main([str(tiny_ckpts), "--estimators", "evaluate", "--epochs", "2", "--runs", "*trunk",
                 "--workers", "0", "--no-report"]) == 0
    assert main(["calibrate", str(ckpt), "--lr", "1e-4", "--localization", "100", "--chains", "2",
                 "--draws", "20", "--burnin", "5"]) == 0
    assert "calibration table:" in capsys.readouterr().out
    tables = analyze.load(tiny_ckpts / "analysis")
    calibration, evaluate = tables["calibration"], tables["evaluate"]
    assert len(calibration) == 1 and calibration.run.iloc[0] == "ffnn-1x8-trunk" and calibration.epoch.iloc[0] == 2
    assert calibration.ckpt_hash.iloc[0] == evaluate.ckpt_hash.iloc[0]
    # a rerun replaces its own rows rather than adding a second set
    assert main(["calibrate", str(ckpt), "--lr", "1e-4", "--localization", "100", "--chains", "2",
                 "--draws", "20", "--burnin", "5"]) == 0
    assert len(analyze.load(tiny_ckpts / "analysis")["calibration"]) == 1


def test_calibrate_says_when_the_checkpoint_is_not_at_a_minimum(mlp_context, tmp_path, capsys):
    from analyze.cli import main

    init = mlp_context.checkpoint.path.parent / checkpoint_name(0)
    assert main(["calibrate", str(init), "--lr", "3e-4", "--localization", "100", "--chains", "2",
                 "--draws", "100", "--burnin", "50", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "is not at a local minimum" in out and "recommended:" not in out
    assert "lambda_min of the Hessian at the checkpoint: -" in out  # an untrained net curves down somewhere


def test_analyze_warns_when_llc_estimates_are_not_healthy(tiny_ckpts, capsys):
    """An estimate whose step is unstable in the stiffest direction (as the defaults' step can be on a large, stiff
    model) is marked in the summary and named in one warning line that points to analyze calibrate."""
    from analyze.cli import main

    common = [str(tiny_ckpts), "--estimators", "llc", "--epochs", "2", "--runs", "*trunk", "--workers", "0",
              "--no-report", "--llc-chains", "2", "--llc-draws", "40", "--llc-burnin", "20"]
    assert main(common + ["--llc-lr", "3/nbeta"]) == 0
    captured = capsys.readouterr()
    assert "NOT HEALTHY" in captured.out
    warning = [line for line in captured.err.splitlines() if "not healthy" in line]
    assert len(warning) == 1 and "1 of 1 LLC estimates" in warning[0] and "analyze calibrate" in warning[0]


@pytest.mark.parametrize("argv, flag", [
    (["--confirm-chains", "1"], "--confirm-chains"),
    (["--confirm-draws", "-5"], "--confirm-draws"),
    (["--precision", "1.5"], "--precision"),
    (["--lr", "fast"], "--lr:"),
    (["--localization", "x"], "--localization:"),
    (["--nbeta", "bogus"], "--nbeta:"),
    (["--batch-size", "big"], "--batch-size:"),
    (["--confirm-burnin", "soon"], "--confirm-burnin"),
])
def test_calibrate_refuses_bad_options_in_one_line_before_loading(tmp_path, capsys, argv, flag):
    from analyze.cli import main

    assert main(["calibrate", str(tmp_path / "missing.safetensors"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("analyze calibrate: error:") and flag in err
    assert "--llc-" not in err  # the option as calibrate calls it, not as the llc estimator does
