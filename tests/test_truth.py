"""Truth models: bias-free nets, rank-r teachers, the teacher as a checkpoint, and the learning coefficient
the run records (checked against the closed forms)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch

from trainer.checkpoints import checkpoint_name, read_checkpoint
from trainer.config import ConfigError, TrainConfig
from trainer.data import build_teacher, dataset_spec_from_config
from trainer.learning_coefficient import deep_linear
from trainer.truth import true_learning_coefficient

TEACHER = dict(dataset="teacher", teacher_task="regression", teacher_samples=400, teacher_input_dim=6,
               teacher_outputs=5, teacher_noise_sigma=1.0, teacher_model_type="dlnn", teacher_hidden_nodes=4,
               teacher_hidden_layers=2, teacher_bias=False, teacher_rank=2)


def test_truth_run_holds_the_rank_r_teacher_and_records_aoyagis_coefficient(tmp_path, make_ckpts):
    out = make_ckpts(tmp_path / "ck", **TEACHER, model_type="dlnn", hidden_nodes=[4], hidden_layers=[2], bias=False,
                     experiment_type="standard", optimizer="sgd", num_epochs=1, truth_checkpoint=True)
    truth = read_checkpoint(out / "dlnn-2x4-nobias-truth" / checkpoint_name(0))
    assert not any("bias" in k for k in truth.tensors)
    product = truth.tensors["out.weight"] @ truth.tensors["fc2.weight"] @ truth.tensors["fc1.weight"]
    singular = torch.linalg.svdvals(product.double())
    assert singular[:2] == pytest.approx([1, 1], abs=1e-5) and (singular[2:] < 1e-5).all()  # rank 2, resolved
    for name in ("fc1.weight", "fc2.weight", "out.weight"):  # every layer at the least rank: the most
        layer = torch.linalg.svdvals(truth.tensors[name].double())  # singular true parameter (trainer/data.py)
        assert layer[:2] == pytest.approx([1, 1], abs=1e-5) and (layer[2:] < 1e-5).all(), name
    teacher = build_teacher(truth.meta["dataset_spec"])
    assert all(torch.equal(v, truth.tensors[k]) for k, v in teacher.state_dict().items())
    record = json.loads((out / "dlnn-2x4-nobias-truth" / "run.json").read_text())
    assert record["role"] == "truth" and record["status"] == "complete"
    assert record["learning_coefficient"]["value"] == deep_linear([6, 4, 4, 5], 2)
    trained = json.loads((out / "dlnn-2x4-nobias-sgd" / "run.json").read_text())
    assert trained["learning_coefficient"] == record["learning_coefficient"]


def test_bias_flag_defaults_to_biases_and_keeps_earlier_specs():
    cfg = TrainConfig(dataset="teacher", model_type="dlnn")
    spec = dataset_spec_from_config(cfg)
    assert "bias" not in spec["teacher_model"] and "teacher_rank" not in spec  # unchanged specs, unchanged hashes
    from trainer.models import build_model, model_spec_from_config

    (model_spec,) = model_spec_from_config(TrainConfig(model_type="dlnn", bias=False), (6,), 3)
    assert model_spec["bias"] is False
    assert all(m.bias is None for m in build_model(model_spec).modules() if isinstance(m, torch.nn.Linear))


def spec(widths, bias, teacher_bias=False, rank=None, task="regression", teacher_type="dlnn"):
    s = {"name": "teacher", "task": task, "teacher_model": {
        "type": teacher_type, "input_shape": [widths[0]], "outputs": widths[-1], "hidden_nodes": 3,
        "hidden_layers": 1, **({} if teacher_bias else {"bias": False})}}
    if rank is not None:
        s["teacher_rank"] = rank
    model = {"type": "dlnn", "input_shape": [widths[0]], "outputs": widths[-1], "hidden_nodes": widths[1] if
             len(widths) > 2 else 1, "hidden_layers": len(widths) - 2, **({} if bias else {"bias": False})}
    return model, s


def test_known_learning_coefficients():
    # linear regression: regular, d / 2 (weights and biases)
    assert true_learning_coefficient(*spec([10, 3], bias=True, teacher_bias=True))["value"] == (10 * 3 + 3) / 2
    # bias-free deep linear net: Aoyagi; with biases: + d_out / 2
    assert true_learning_coefficient(*spec([4, 5, 6], bias=False, rank=2))["value"] == deep_linear([4, 5, 6], 2)
    assert true_learning_coefficient(*spec([4, 5, 6], bias=True, rank=2))["value"] == deep_linear([4, 5, 6], 2) + 3
    # a deep default-init teacher (hidden width 3): its tiny product singular values are not resolved, so unknown;
    # with --teacher-rank 3 (every singular value 1) Aoyagi's value
    assert true_learning_coefficient(*spec([4, 5, 6], bias=False)) is None
    assert true_learning_coefficient(*spec([4, 5, 6], bias=False, rank=3))["value"] == deep_linear([4, 5, 6], 3)
    # unknown: classification, a nonlinear teacher, a teacher the student cannot realise
    assert true_learning_coefficient(*spec([4, 5, 6], bias=False, task="classification")) is None
    assert true_learning_coefficient(*spec([4, 5, 6], bias=False, teacher_type="ffnn")) is None
    assert true_learning_coefficient(*spec([4, 2, 6], bias=False, rank=3)) is None  # rank above the bottleneck
    assert true_learning_coefficient(*spec([4, 5, 6], bias=False, teacher_bias=True)) is None  # offset unreachable


@pytest.mark.parametrize("overrides, key", [
    (dict(truth_checkpoint=True, hidden_nodes=[5]), "truth_checkpoint"),
    (dict(truth_checkpoint=True, dataset="digits"), "truth_checkpoint"),
    (dict(teacher_rank=9), "teacher_rank"),
    (dict(teacher_rank=1, teacher_model_type="ffnn"), "teacher_rank"),
])
def test_truth_options_are_checked(overrides, key):
    settings = {**TEACHER, "model_type": "dlnn", "hidden_nodes": [4], "hidden_layers": [2], "bias": False,
                "experiment_type": "standard", "optimizer": "sgd", **overrides}
    with pytest.raises(ConfigError, match=key):
        TrainConfig(**settings).validate()


def test_validation_suite_quick_subset_lands_within_25_percent_of_the_truth(tmp_path, monkeypatch):
    """scripts/validate_llc.py --quick: linear regression and a rank-3 deep linear net (n = 990), trained by
    train-ckpts, estimated at the defaults at the true parameter and at the trained student, two cases at once."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "validate_llc.py"
    spec = importlib.util.spec_from_file_location("validate_llc", script)
    validate = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "validate_llc", validate)  # its dataclasses look themselves up there
    spec.loader.exec_module(validate)
    rows = tmp_path / "rows.jsonl"
    # as a user runs it: its own process, the two cases at once (--jobs 2, one process each)
    done = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path / "cases"), "--json",
                           str(rows), "--jobs", "2"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [json.loads(line) for line in rows.read_text().splitlines()]
    assert {(r["case"], r["point"]) for r in table} == {(c, p) for c in validate.QUICK for p in ("truth", "trained")}
    for r in table:
        assert abs(r["error"]) < 0.25, r
        assert r["truth"] == (5.0 if r["case"] == "linreg-4to2" else deep_linear([8, 8, 8, 8, 8], 3))


def _localization_script(monkeypatch):
    """scripts/llc_localization.py as a module (it imports validate_llc from its own folder)."""
    import importlib.util
    from pathlib import Path

    scripts = Path(__file__).resolve().parent.parent / "scripts"
    monkeypatch.syspath_prepend(str(scripts))
    spec = importlib.util.spec_from_file_location("llc_localization", scripts / "llc_localization.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    return sweep


def test_localization_sweep_shows_a_stronger_localization_pulling_a_singular_nets_estimate_down(tmp_path,
                                                                                                 monkeypatch):
    """scripts/llc_localization.py on the rank-3 8-8-8-8-8 deep linear net (n = 990) with short chains: gamma 100
    sits far below gamma 3 (-47% against +12% on the committed page), and the page shows every setting."""
    sweep = _localization_script(monkeypatch)
    suite = sys.modules["validate_llc"]  # imported by the sweep, from the scripts folder
    monkeypatch.setattr(sweep, "LOCALIZATIONS", ["3", "100"])
    monkeypatch.setattr(sweep, "BURNINS", [300, 600])
    case = next(c for c in suite.CASES if c.name == "dln-8x3-r3")
    rows = pd.DataFrame(sweep.sweep_rows(case, tmp_path))
    assert len(rows) == 4 and (rows.truth == deep_linear([8, 8, 8, 8, 8], 3)).all()
    at = rows.groupby("localization").llc.mean()
    assert at[100.0] < 0.75 * at[3.0]
    page = sweep.page(rows.assign(case=case.name), 60.0)
    assert page.count(f"| {case.name} | 990 |") == 2 and "burn-in 600" in page
    # the third table on the same trained case, with short chains: both points, the true parameter's expected
    # offset measured against the trained student's loss (w_0 is not the empirical minimum: a positive gap)
    monkeypatch.setattr(sweep, "LONG_BURNINS", [300, 600])
    long = pd.DataFrame(sweep.long_chain_rows(case, suite.checkpoints(case, tmp_path), "10", ("trained", "truth")))
    assert list(long.point) == ["trained"] * 2 + ["truth"] * 2 and list(long.n_burnin) == [300, 600] * 2
    assert (long[long.point == "trained"].gap == 0).all() and (long[long.point == "truth"].gap > 0).all()
    table = sweep.long_chain_page(long)
    assert table.count(f"| {case.name} | truth | 990 | 27.5 | {27.5 - long.gap.iloc[-1]:.3g} | 10 |") == 1
    assert table.count("drift") == 4 and "burn-in 600" in table
    # the fourth table: a relaxed burn-in is 3 / (eps gamma) within [auto, the cap], and at nbeta = n the true
    # parameter's expected offset is log n times that at n / log n (the same two losses, nbeta log n times larger)
    nbeta = 990 / math.log(990)
    assert sweep.relaxed_burnin(100 * nbeta, 1.0) == sweep.RELAXED_MAX_BURNIN  # 1.4 million steps: the cap
    assert sweep.relaxed_burnin(nbeta, 3.0) == math.ceil(3 / (0.03 / nbeta * 3.0)) == 4785
    assert sweep.relaxed_burnin(nbeta, 1000.0) == 1000  # 15 steps: the default's auto
    monkeypatch.setattr(sweep, "RELAXED_LOCALIZATIONS", ["100"])
    monkeypatch.setattr(sweep, "RELAXED_MAX_BURNIN", 300)
    relaxed = pd.DataFrame(sweep.relaxed_rows(case, suite.checkpoints(case, tmp_path), ("n/log n", "n")))
    assert list(relaxed.point) == ["trained"] * 2 + ["truth"] * 2 and (relaxed.n_burnin == 300).all()
    assert list(relaxed.nbeta) == pytest.approx([nbeta, 990.0] * 2)
    truth_gaps = relaxed[relaxed.point == "truth"].gap.tolist()
    assert truth_gaps[0] > 0 and truth_gaps[1] == pytest.approx(math.log(990) * truth_gaps[0], rel=1e-9)
    page = sweep.relaxed_page(relaxed)
    assert page.count(f"| {case.name} | truth | 990 | n |") == 1 and "gamma 100 [burn-in]" in page
    # the fifth table: each step relaxed for itself (3 / (eps gamma): a step 3x smaller runs 3x longer), and a capped
    # burn-in says how many relaxation times it covered
    assert sweep.relaxed_burnin(nbeta, 3.0, "0.01/nbeta", 10**6) == math.ceil(3 / (0.01 / nbeta * 3.0)) == 14353
    monkeypatch.setattr(sweep, "STEP_LOCALIZATIONS", ["100"])
    monkeypatch.setattr(sweep, "STEP_SIZES", ["0.03/nbeta", "0.003/nbeta"])
    monkeypatch.setattr(sweep, "STEP_MAX_BURNIN", 1200)
    steps = pd.DataFrame(sweep.step_rows(case, suite.checkpoints(case, tmp_path)["trained"]))
    assert list(steps.n_burnin) == [1000, 1200]  # 3 relaxation times at 0.03 / nbeta: 143 steps, under auto
    tau = [1 / (c / nbeta * 100) for c in (0.03, 0.003)]  # 47.8 and 478 steps
    assert list(steps.relaxation_times) == pytest.approx([b / t for b, t in zip(steps.n_burnin, tau)])
    table = sweep.step_page(steps)
    assert table.count(f"| {case.name} | 990 | 27.5 | 100 |") == 1 and "2.5 relaxation times" in table


def test_one_scale_fit_recovers_lambda_where_every_curvature_is_alike_and_the_page_shows_each_fit(monkeypatch):
    """scripts/llc_localization.py's correction of a strong localization: on llc(g) = lambda / (1 + g / k) (a regular
    model whose Hessian eigenvalues are all k) two strong localizations give lambda exactly; the page's fit columns
    are those fits, with their error against the truth."""
    sweep = _localization_script(monkeypatch)

    def llc(g: float, lam: float = 52.5, k: float = 0.8) -> float:
        return lam / (1 + g / k)

    assert sweep.one_scale_fit(0.3, llc(0.3), 1.0, llc(1.0)) == pytest.approx(52.5, rel=1e-12)
    assert sweep.one_scale_fit(0.1, llc(0.1, 7.0, 3.0), 0.3, llc(0.3, 7.0, 3.0)) == pytest.approx(7.0, rel=1e-12)
    # two curvatures, 1 and 0.01, half the directions each: the fit from strong localizations misses the flat half
    mixed = {g: 25.0 / (1 + g) + 25.0 / (1 + g / 0.01) for g in (0.1, 0.3, 1.0)}
    assert sweep.one_scale_fit(0.3, mixed[0.3], 1.0, mixed[1.0]) < 0.6 * 50.0
    rows = [{"case": "linreg", "n": 990, "truth": 50.0, "g": 0.01, "default": True, "llc": 49.0, "sem": 1.0,
             "healthy": True}]
    rows += [{"case": "linreg", "n": 990, "truth": 50.0, "g": g, "default": False, "llc": llc(g, 50.0, 1.0),
              "sem": 0.5, "healthy": True} for g in sweep.STRONG]
    table = sweep.extrapolation_page(pd.DataFrame(rows))
    assert table.count("| linreg | 990 | 50 | 49 +- 1 (-2%) (0.01) |") == 1
    assert len(re.findall(r"\| 50 \([+-]0%\)", table)) == len(sweep.FITS)  # -0%: rounding of the fit


def test_demo_relaxation_table_says_how_many_relaxation_times_each_burn_in_covered(tmp_path, monkeypatch):
    """scripts/demo_relaxation.py with short chains on the demo's own cut-off checkpoint (trained here): each cell's
    relaxation times are its burn-in over relaxation_steps, which at lambda_min <= 0 is 1 / (eps gamma)."""
    import importlib.util
    from pathlib import Path

    scripts = Path(__file__).resolve().parent.parent / "scripts"
    monkeypatch.syspath_prepend(str(scripts))
    spec = importlib.util.spec_from_file_location("demo_relaxation", scripts / "demo_relaxation.py")
    relax = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(relax)
    monkeypatch.setattr(relax, "BURNINS", [100, 300])
    path = relax.demo_checkpoint(tmp_path)
    assert path.exists() and path.name == "epoch-0010.safetensors"
    rows = pd.DataFrame(relax.relaxation_rows(path, "10", -0.2))
    n = len(relax.context_for(path).splits.train)
    tau = 1 / (0.03 / (n / math.log(n)) * 10)  # 1 / (eps gamma), eps = 0.03 / nbeta, nbeta = n / log n
    assert list(rows.n_burnin) == [100, 300]
    assert rows.relaxation_steps.tolist() == pytest.approx([tau, tau])
    assert rows.relaxation_times.tolist() == pytest.approx([100 / tau, 300 / tau])
    table = relax.table_text(rows)
    assert table.count("| 10 |") == 1 and table.count("drift") == 2 and "burn-in 300" in table
