"""train-ckpts: checkpoints, experiments, resume, config handling and failure modes, on real runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import trainer
import trainer.experiment as experiment
from trainer.checkpoints import checkpoint_name, list_checkpoints, load_model, read_checkpoint
from trainer.cli import config_from_args, main
from trainer.config import NGD_REFRESH, ConfigError, TrainConfig, config_from_dict
from trainer.data import load_dataset
from trainer.models import build_model
from trainer.optim.factory import build_optimizer, optimizer_settings
from trainer.optim.ngd import REFRESH_MODES

# The study's args file, as shipped for scripts/reproduce_ngd_sgd.py.
STUDY_ARGS = json.loads((Path(__file__).parents[1] / "scripts" / "args_ngd_sgd.json").read_text())


def ckpt_tensors(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: read_checkpoint(p).tensors for _, _, p in list_checkpoints(run_dir)}


# ----------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("overrides", [
    dict(model_type="ffnn", hidden_nodes=[8], hidden_layers=[2]),
    dict(model_type="dlnn", hidden_nodes=[8], hidden_layers=[3]),
    dict(model_type="cnn", hidden_conv_layers=[1]),
    dict(model_type="layers", layers=["conv2d:4:3:1:1:relu", "flatten", "dropout:0.2", "dense:16:relu", "dense:10"]),
], ids=["ffnn", "dlnn", "cnn", "layers"])
def test_checkpoint_rebuilds_model_from_metadata_alone(tmp_path, overrides, make_ckpts):
    out = make_ckpts(tmp_path / "ck", experiment_type="standard", optimizer="sgd", num_epochs=1, **overrides)
    (run_dir,) = [p for p in out.iterdir()]
    path = run_dir / checkpoint_name(1)
    model, ckpt = load_model(path)  # only the file: model spec and weights from its metadata
    splits = load_dataset(ckpt.meta["dataset_spec"])
    assert ckpt.meta["epoch"] == 1 and ckpt.meta["run"] == run_dir.name
    # an independent rebuild: spec -> fresh module -> state dict from the file
    twin = build_model(json.loads(json.dumps(ckpt.meta["model_spec"])))
    twin.load_state_dict(ckpt.tensors)
    twin.eval()
    x = splits.val.x[:50]
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))
        assert not torch.equal(model(x), build_model(ckpt.meta["model_spec"]).eval()(x))  # weights matter


def test_epoch_zero_is_the_shared_initialisation_of_a_standard_experiment(tmp_path, make_ckpts):
    out = make_ckpts(tmp_path / "ck", experiment_type="standard", optimizer="both", num_epochs=2)
    sgd, ngd = ckpt_tensors(out / "ffnn-1x8-sgd"), ckpt_tensors(out / "ffnn-1x8-ngd")
    assert sgd.keys() == ngd.keys() == {checkpoint_name(e) for e in range(3)}
    for name in sgd[checkpoint_name(0)]:
        assert torch.equal(sgd[checkpoint_name(0)][name], ngd[checkpoint_name(0)][name])
    assert not torch.equal(sgd[checkpoint_name(2)]["fc1.weight"], ngd[checkpoint_name(2)]["fc1.weight"])
    logs = pd.read_parquet(out / "ffnn-1x8-sgd" / "epochs.parquet")
    assert logs.epoch.tolist() == [0, 1, 2] and logs.step.tolist() == [0, 19, 38]  # 1168 training samples / 64 -> 19 steps
    steps = pd.read_parquet(out / "ffnn-1x8-sgd" / "steps.parquet")
    assert steps.step.tolist() == list(range(1, 39)) and (steps.update_norm > 0).all()
    assert logs.val_loss.iloc[-1] < logs.val_loss.iloc[0]


def test_swap_lineage(tiny_ckpts):
    trunk, branches = tiny_ckpts / "ffnn-1x8-trunk", [tiny_ckpts / "ffnn-1x8-swap-sgd", tiny_ckpts / "ffnn-1x8-swap-ngd"]
    trunk_json = json.loads((trunk / "run.json").read_text())
    assert trunk_json["parent"] is None and trunk_json["optimizer"]["name"] == "sgd" and trunk_json["role"] == "trunk"
    assert [e for e, _, _ in list_checkpoints(trunk)] == [0, 1, 2]
    cut_step = read_checkpoint(trunk / checkpoint_name(2)).meta["step"]
    finals = []
    for branch, opt in zip(branches, ("sgd", "ngd")):
        record = json.loads((branch / "run.json").read_text())
        assert record["parent"] == {"run": "ffnn-1x8-trunk", "epoch": 2} and record["status"] == "complete"
        assert record["optimizer"]["name"] == opt and record["role"] == "branch"
        assert [e for e, _, _ in list_checkpoints(branch)] == [3]  # no padding, no copy of the parent's epochs
        logs = pd.read_parquet(branch / "epochs.parquet")
        assert logs.epoch.tolist() == [3]
        steps = pd.read_parquet(branch / "steps.parquet")
        assert steps.step.iloc[0] == cut_step + 1  # steps continue the trunk's count
        final = read_checkpoint(branch / checkpoint_name(3))
        assert final.meta["optimizer"] == opt and final.meta["step"] == cut_step + len(steps)
        finals.append(final.tensors)
    assert not torch.equal(finals[0]["fc1.weight"], finals[1]["fc1.weight"])


def test_sgd_branch_continues_from_the_parent_checkpoint(tiny_ckpts):
    """Retraining one epoch from the trunk's cut-off checkpoint with a fresh SGD reproduces the branch."""
    from trainer.loop import train_epoch
    from trainer.losses import nll_loss

    parent = read_checkpoint(tiny_ckpts / "ffnn-1x8-trunk" / checkpoint_name(2))
    model = build_model(parent.meta["model_spec"])
    model.load_state_dict(parent.tensors)
    splits = load_dataset(parent.meta["dataset_spec"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    seed = experiment.epoch_seed(3, 3)
    torch.manual_seed(seed)
    train_epoch(model, opt, nll_loss("classification"), splits.train, 64, torch.Generator().manual_seed(seed),
                epoch=3, first_step=parent.meta["step"])
    branch = read_checkpoint(tiny_ckpts / "ffnn-1x8-swap-sgd" / checkpoint_name(3)).tensors
    for name, value in model.state_dict().items():
        assert torch.equal(value, branch[name]), name


# ----------------------------------------------------------------------------------- resume
class Killed(BaseException):
    """Stands for a kill between two writes (BaseException so nothing catches it on the way)."""


@pytest.mark.parametrize("kill_before_resume_state", [False, True], ids=["after-epoch", "between-writes"])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, kill_before_resume_state, make_ckpts):
    settings = dict(experiment_type="standard", optimizer="both", num_epochs=4)
    reference = make_ckpts(tmp_path / "reference", **settings)

    real_save = experiment.save_resume_state
    calls = {"n": 0}

    def dying_save(path, *, epoch, step, optimizer_state):
        calls["n"] += 1
        if epoch == 2 and "ngd" in str(path):  # the NGD run dies during its epoch 2 bookkeeping
            if kill_before_resume_state:
                raise Killed()  # epoch-0002 checkpoint and logs written, resume state still at epoch 1
            real_save(path, epoch=epoch, step=step, optimizer_state=optimizer_state)
            raise Killed()
        return real_save(path, epoch=epoch, step=step, optimizer_state=optimizer_state)

    monkeypatch.setattr(experiment, "save_resume_state", dying_save)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(Killed):
        make_ckpts(interrupted, **settings)
    monkeypatch.setattr(experiment, "save_resume_state", real_save)
    assert json.loads((interrupted / "ffnn-1x8-ngd" / "run.json").read_text())["status"] == "running"
    with pytest.raises(experiment.RunExistsError):
        make_ckpts(interrupted, **settings)  # neither --resume nor --overwrite: refuse
    make_ckpts(interrupted, resume=True, **settings)

    for run in ("ffnn-1x8-sgd", "ffnn-1x8-ngd"):
        want, got = ckpt_tensors(reference / run), ckpt_tensors(interrupted / run)
        assert want.keys() == got.keys()
        for name in want:
            for key in want[name]:
                assert torch.equal(want[name][key], got[name][key]), (run, name, key)
        for log in ("steps.parquet", "epochs.parquet"):
            a, b = pd.read_parquet(reference / run / log), pd.read_parquet(interrupted / run / log)
            pd.testing.assert_frame_equal(a.drop(columns=["seconds"], errors="ignore"),
                                          b.drop(columns=["seconds"], errors="ignore"))


def test_resume_of_a_run_killed_in_its_first_epoch_keeps_the_run_folder(tmp_path, monkeypatch, make_ckpts):
    """Killed before the first resume state: the resume starts the run again in the same folder (a reader
    listing the output folder meanwhile must never find the run folder gone) and ends with the same bytes."""
    settings = dict(experiment_type="standard", optimizer="sgd", num_epochs=2)
    reference = make_ckpts(tmp_path / "reference", **settings)

    def dying_save(path, **state):
        raise Killed()  # epoch-0000 and epoch-0001 written, no resume state yet

    monkeypatch.setattr(experiment, "save_resume_state", dying_save)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(Killed):
        make_ckpts(interrupted, **settings)
    monkeypatch.undo()
    run = interrupted / "ffnn-1x8-sgd"
    assert not (run / "resume.safetensors").exists() and (run / checkpoint_name(0)).exists()
    held = os.open(run, os.O_RDONLY)  # held open, so a deleted folder's inode cannot be reused by a new one
    try:
        make_ckpts(interrupted, resume=True, **settings)
        assert run.stat().st_ino == os.fstat(held).st_ino
    finally:
        os.close(held)
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in (reference / run.name).iterdir())
    for name in (checkpoint_name(0), checkpoint_name(1), "resume.safetensors"):
        assert (run / name).read_bytes() == (reference / run.name / name).read_bytes(), name


def test_resume_refuses_a_different_configuration(tmp_path, make_ckpts):
    out = make_ckpts(tmp_path / "ck", experiment_type="standard", optimizer="sgd", num_epochs=1)
    with pytest.raises(ConfigError, match="different configuration"):
        make_ckpts(out, experiment_type="standard", optimizer="sgd", num_epochs=1, sgd_lr=0.1, resume=True)


RESUME_ARGV = ["--experiment-type", "standard", "--optimizer", "sgd", "--num-epochs", "3", "--hidden-nodes", "4",
               "--hidden-layers", "1", "--batch-size", "64", "--quiet"]


@pytest.mark.parametrize("damage", ["last-checkpoint-truncated", "resume-state-random", "running-and-truncated"])
def test_resume_verifies_its_files_and_redoes_what_it_cannot_trust(tmp_path, capsys, damage):
    """A damaged last checkpoint or resume state is not "already complete": --resume names the file, trains
    the run again and ends with every file equal to an uninterrupted run's, byte for byte."""
    reference, out = tmp_path / "reference", tmp_path / "out"
    for folder in (reference, out):
        assert main(RESUME_ARGV + ["--out", str(folder)]) == 0
    run, ref = out / "ffnn-1x4-sgd", reference / "ffnn-1x4-sgd"
    if damage == "resume-state-random":
        bad = run / "resume.safetensors"
        bad.write_bytes(os.urandom(4096))
    else:
        bad = run / checkpoint_name(3)
        bad.write_bytes(bad.read_bytes()[:100])
    if damage == "running-and-truncated":  # killed after its last checkpoint, before run.json said complete
        record = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**record, "status": "running"}))
    capsys.readouterr()
    assert main(RESUME_ARGV + ["--out", str(out), "--resume"]) == 0
    said = capsys.readouterr().out
    assert f"[ffnn-1x4-sgd] cannot resume: {bad}: " in said and "redoing the run from its initial weights" in said
    assert "already complete" not in said
    for name in [checkpoint_name(e) for e in range(4)] + ["resume.safetensors"]:
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name
    for log in ("steps.parquet", "epochs.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(ref / log).drop(columns="seconds", errors="ignore"),
                                      pd.read_parquet(run / log).drop(columns="seconds", errors="ignore"))
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert main(RESUME_ARGV + ["--out", str(out), "--resume"]) == 0  # now every file checks out
    assert "[ffnn-1x4-sgd] already complete" in capsys.readouterr().out


# ----------------------------------------------------------------------------------- config
def test_study_args_file_trains(tmp_path, recwarn, capsys):
    args = tmp_path / "args_ngd_sgd.json"
    args.write_text(json.dumps(STUDY_ARGS))
    out = tmp_path / "ck"
    code = main(["--config", str(args), "--dataset", "digits", "--hidden-nodes", "16", "--cut-off-epochs", "1",
                 "--num-epochs", "2", "--batch-size", "256", "--out", str(out), "--quiet"])
    assert code == 0
    assert capsys.readouterr().out.strip().endswith(f"; next: analyze {out}")  # says what to run next
    assert not [w for w in recwarn if "unknown keys" in str(w.message)]  # every study key is understood
    assert sorted(p.name for p in out.iterdir()) == ["ffnn-2x16-swap-ngd", "ffnn-2x16-swap-sgd", "ffnn-2x16-trunk"]
    record = json.loads((out / "ffnn-2x16-swap-ngd" / "run.json").read_text())
    assert record["optimizer"] == {"name": "ngd", "lr": 0.001, "alpha": 0.1, "eta": 0.9, "epsilon": 1e-10,
                                   "delta": 0.0005, "momentum": 0.9, "nesterov": True}
    assert record["seed"] == 2 and record["config"]["analysis_args"]["num_draws"] == 1000


def test_flags_override_the_config_file_and_unknown_keys_warn(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"num_epochs": 17, "sgd_lr": 0.5, "colour": "red"}))
    with pytest.warns(UserWarning, match="unknown keys: colour"):
        cfg = config_from_args(["--config", str(cfg_file), "--sgd-lr", "0.25", "--no-nesterov"])
    assert (cfg.num_epochs, cfg.sgd_lr, cfg.nesterov) == (17, 0.25, False)
    toml = tmp_path / "c.toml"
    toml.write_text('model_type = "dlnn"\nhidden_nodes = [4, 5]\nhidden_layers = [1, 2]\n')
    cfg = config_from_args(["--config", str(toml)])
    assert (cfg.model_type, cfg.hidden_nodes, cfg.hidden_layers) == ("dlnn", [4, 5], [1, 2])


def test_ngd_refresh_reaches_the_optimizer_from_flags_args_files_and_the_api(tmp_path, capsys, make_ckpts):
    assert NGD_REFRESH == REFRESH_MODES
    default = config_from_args([])
    # The default leaves the recorded settings (which --resume compares) as runs before the option had them.
    assert default.ngd_refresh == "exact" and "refresh" not in optimizer_settings("ngd", default)
    study = tmp_path / "args.json"  # the study's args file format, with the option in its first object
    study.write_text(json.dumps([{**STUDY_ARGS[0], "ngd_refresh": "subspace"}, *STUDY_ARGS[1:]]))
    assert config_from_args(["--config", str(study)]).ngd_refresh == "subspace"
    assert config_from_args(["--config", str(study), "--ngd-refresh", "exact"]).ngd_refresh == "exact"
    toml = tmp_path / "c.toml"
    toml.write_text('ngd_refresh = "subspace"\n')
    cfg = config_from_args(["--config", str(toml)])
    settings = optimizer_settings("ngd", cfg)
    assert settings["refresh"] == "subspace"
    assert build_optimizer(settings, [torch.nn.Parameter(torch.zeros(3))]).param_groups[0]["refresh"] == "subspace"
    assert main(["--ngd-refresh", "fast", "--out", str(tmp_path / "no")]) == 2
    assert capsys.readouterr().err.strip() == ("train-ckpts: error: invalid value for 'ngd_refresh': 'fast' is not "
                                               "one of exact, subspace")

    # Through trainer.train's keyword arguments into the run's record, and back.
    out = tmp_path / "ck"
    assert trainer.train(out=out, hidden_nodes=[8], hidden_layers=[1], experiment_type="standard", optimizer="ngd",
                         num_epochs=1, batch_size=64, ngd_lr=0.05, seed=3, quiet=True, ngd_refresh="subspace").ok
    record = json.loads((out / "ffnn-1x8-ngd" / "run.json").read_text())
    assert record["optimizer"]["refresh"] == record["config"]["ngd_refresh"] == "subspace"
    values = {k: v for k, v in record["config"].items() if k != "analysis_args"}
    assert config_from_dict(values).to_dict() == {**record["config"], "analysis_args": {}}
    same = dict(experiment_type="standard", optimizer="ngd", num_epochs=1, batch_size=64, resume=True)
    make_ckpts(out, ngd_refresh="subspace", **same)  # the same run: nothing to do
    with pytest.raises(ConfigError, match="different configuration"):  # its estimates are not the exact mode's
        make_ckpts(out, **same)


@pytest.mark.parametrize("values, key", [
    ({"num_epochs": 0}, "num_epochs"),
    ({"sgd_lr": -1}, "sgd_lr"),
    ({"eta": 2.0}, "eta"),
    ({"model_type": "transformer"}, "model_type"),
    ({"hidden_nodes": [8, 16], "hidden_layers": [1]}, "hidden_nodes"),
    ({"experiment_type": "swap", "cut_off_epochs": 20, "num_epochs": 10}, "cut_off_epochs"),
    ({"experiment_type": "swap", "optimizer": "sgd"}, "optimizer"),
    ({"momentum": "lots"}, "momentum"),
    ({"ngd_refresh": "fast"}, "ngd_refresh"),
    ({"model_type": "layers", "layers": ["dense:10:softmax"]}, "layers"),
    ({"model_type": "layers", "layers": ["conv2d:4:3"]}, "layers"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, capsys, values, key):
    cfg_file = tmp_path / "bad.json"
    cfg_file.write_text(json.dumps(values))
    assert main(["--config", str(cfg_file), "--out", str(tmp_path / "ck"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train-ckpts: error:") and f"'{key}'" in err and "\n" not in err
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("values, message", [
    ({"nesterov": "no"}, "invalid value for 'nesterov': 'no' must be true or false"),
    ({"num_epochs": "3"}, "invalid value for 'num_epochs': '3' must be an integer"),
    ({"hidden_nodes": ["8"]}, "invalid value for 'hidden_nodes': ['8'] must be a list of integers"),
    ({"hidden_layers": [True]}, "invalid value for 'hidden_layers': [True] must be a list of integers"),
    ({"model_type": "layers", "layers": [1]}, "invalid value for 'layers': [1] must be a list of text"),
    ({"ngd_refresh": 1}, "invalid value for 'ngd_refresh': 1 must be a string"),
])
def test_config_values_of_the_wrong_type_name_the_file_and_key(tmp_path, capsys, values, message):
    cfg_file = tmp_path / "typed.json"
    cfg_file.write_text(json.dumps(values))
    assert main(["--config", str(cfg_file), "--out", str(tmp_path / "ck"), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"train-ckpts: error: {cfg_file}: {message}"]
    assert not (tmp_path / "ck").exists()


def test_unparseable_config_file_names_it(tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    assert main(["--config", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_missing_dataset_folder_names_the_expected_files_and_the_package(tmp_path, capsys, monkeypatch):
    import trainer.data

    monkeypatch.setitem(trainer.data.DEBIAN_FOLDERS, "fashion-mnist", tmp_path / "no-package")
    assert main(["--dataset", "fashion-mnist", "--data-root", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert "FashionMNIST/raw" in err and "train-images-idx3-ubyte" in err and len(err.strip().splitlines()) == 1
    assert "apt-get install dataset-fashion-mnist" in err


def test_existing_run_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "ck"
    argv = ["--experiment-type", "standard", "--optimizer", "sgd", "--num-epochs", "1", "--hidden-nodes", "4",
            "--hidden-layers", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    before = (out / "ffnn-1x4-sgd" / checkpoint_name(1)).read_bytes()
    assert main(argv) == 2
    assert "already exist" in capsys.readouterr().err
    assert (out / "ffnn-1x4-sgd" / checkpoint_name(1)).read_bytes() == before  # untouched
    assert main(argv + ["--overwrite", "--seed", "9"]) == 0
    assert (out / "ffnn-1x4-sgd" / checkpoint_name(1)).read_bytes() != before


def test_cuda_when_unavailable_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["--device", "cuda", "--out", str(tmp_path / "ck")]) == 2
    assert "'device'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- failures
def test_nan_loss_stops_the_run_and_keeps_valid_checkpoints(tmp_path, capsys):
    out = tmp_path / "ck"
    code = main(["--experiment-type", "standard", "--optimizer", "sgd", "--sgd-lr", "1e12", "--num-epochs", "3",
                 "--hidden-nodes", "8", "--hidden-layers", "1", "--out", str(out), "--quiet"])
    assert code == 1
    run = out / "ffnn-1x8-sgd"
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "diverged" and "step" in record["diverged_at"]
    assert "stopped: loss became" in capsys.readouterr().out
    for _, _, path in list_checkpoints(run):
        model, _ = load_model(path)  # every file written is complete and loadable
        assert all(torch.isfinite(p).all() for p in model.parameters())
    logs = pd.read_parquet(run / "epochs.parquet")
    assert logs.epoch.max() < record["diverged_at"]["epoch"]


# ----------------------------------------------------------------------------------- datasets
def test_teacher_regression_uses_the_gaussian_nll_with_recorded_sigma(tmp_path, make_ckpts):
    out = make_ckpts(tmp_path / "ck", dataset="teacher", teacher_task="regression", teacher_outputs=2,
                     teacher_noise_sigma=0.5, teacher_model_type="dlnn", teacher_hidden_layers=2,
                     model_type="dlnn", hidden_nodes=[4], hidden_layers=[2],
                     experiment_type="standard", optimizer="sgd", num_epochs=2, sgd_lr=0.01)
    run = out / "dlnn-2x4-sgd"
    model, ckpt = load_model(run / checkpoint_name(2))
    spec = ckpt.meta["dataset_spec"]
    assert spec["noise_sigma"] == 0.5 and spec["teacher_model"]["type"] == "dlnn"
    splits = load_dataset(spec)
    assert splits.task == "regression" and splits.train.y.shape[1] == 2
    with torch.no_grad():
        residual = model(splits.val.x) - splits.val.y
    expected = (0.5 * residual.pow(2).sum(1) / 0.25).mean().item()
    logs = pd.read_parquet(run / "epochs.parquet")
    assert logs.val_loss.iloc[-1] == pytest.approx(expected, rel=1e-5)
    assert math.isnan(logs.val_acc.iloc[-1])
    # the noise level is what it says: residuals of the teacher itself are N(0, 0.25)
    assert load_dataset(spec).train.y.shape == splits.train.y.shape


def test_splits_are_seeded_and_disjoint():
    cfg = TrainConfig()
    from trainer.data import dataset_spec_from_config

    a, b = load_dataset(dataset_spec_from_config(cfg)), load_dataset(dataset_spec_from_config(cfg))
    assert torch.equal(a.train.x, b.train.x) and len(a.train) + len(a.val) + len(a.test) == 1797
    rows = {tuple(r.tolist()) for r in torch.cat([a.train.x, a.val.x, a.test.x]).flatten(1)}
    assert len(rows) > 1700  # splits do not share samples (digits has a few exact duplicates)
    cfg.data_seed = 99
    c = load_dataset(dataset_spec_from_config(cfg))
    assert not torch.equal(a.train.y, c.train.y)


def test_step_checkpoints(tmp_path, make_ckpts):
    out = make_ckpts(tmp_path / "ck", experiment_type="standard", optimizer="sgd", num_epochs=2, ckpt_every_steps=5)
    found = [(e, s) for e, s, _ in list_checkpoints(out / "ffnn-1x8-sgd")]
    # 19 steps per epoch: mid-epoch checkpoints at multiples of 5 that are not an epoch's end
    assert found == [(0, None), (1, 5), (1, 10), (1, 15), (1, None), (2, 20), (2, 25), (2, 30), (2, 35), (2, None)]
    meta = read_checkpoint(out / "ffnn-1x8-sgd" / checkpoint_name(2, 20)).meta
    assert (meta["epoch"], meta["step"], meta["kind"]) == (2, 20, "step")


def test_cli_entry_point_runs(tmp_path):
    exe = Path(sys.executable).with_name("train-ckpts")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--cut-off-epochs" in result.stdout and "--ngd-lr" in result.stdout


def test_diverging_ngd_run_stops_cleanly(tmp_path):
    """Exploding gradients must reach the trainer's non-finite-loss stop, not crash NGD's eigensolver."""
    statuses = experiment.run_experiment(TrainConfig(
        dataset="teacher", teacher_task="regression", model_type="dlnn", hidden_nodes=[8], hidden_layers=[1],
        experiment_type="standard", optimizer="ngd", num_epochs=3, ngd_lr=0.05, out=str(tmp_path / "ck"),
        quiet=True), log=lambda *a: None)
    assert statuses == {"dlnn-1x8-ngd": "diverged"}
    for _, _, path in list_checkpoints(tmp_path / "ck" / "dlnn-1x8-ngd"):
        load_model(path)


def test_jobs_train_the_branches_at_once_with_the_same_results(tmp_path):
    """--jobs 2 trains a swap's two branches in two processes (after the trunk): every checkpoint and resume
    state is byte for byte the one a single process writes, and the log lines are the same."""
    settings = dict(dataset="digits", model_type="ffnn", hidden_nodes=[8], hidden_layers=[1], experiment_type="swap",
                    optimizer="both", cut_off_epochs=2, num_epochs=3, batch_size=64, sgd_lr=0.05, ngd_lr=0.05, seed=3,
                    quiet=True)
    logs = {"one": [], "two": []}
    for name, jobs in (("one", 1), ("two", 2)):
        statuses = experiment.run_experiment(TrainConfig(out=str(tmp_path / name), jobs=jobs, **settings),
                                             log=logs[name].append)
        assert set(statuses.values()) == {"complete"}
    one, two = tmp_path / "one", tmp_path / "two"
    # the branches' epoch lines reach the caller's log from the child processes too (in either order)
    untimed = {name: sorted(line.rsplit("  ", 1)[0] for line in lines) for name, lines in logs.items()}  # "0.1s"
    assert untimed["two"] == untimed["one"]
    assert any(line.startswith("[ffnn-1x8-swap-ngd] epoch 3/3") for line in logs["two"])
    runs = sorted(p.name for p in one.iterdir() if p.is_dir())
    assert runs == sorted(p.name for p in two.iterdir() if p.is_dir()) and len(runs) == 3
    for run in runs:
        files = sorted(p.name for p in (one / run).glob("*.safetensors"))
        assert files and files == sorted(p.name for p in (two / run).glob("*.safetensors"))
        for name in files:
            assert (one / run / name).read_bytes() == (two / run / name).read_bytes(), (run, name)
        assert json.loads((two / run / "run.json").read_text())["status"] == "complete"
