"""The analyzer's core on real checkpoints: catalog, epoch specs, keys, store, load(), and the CLI's errors.

In-process runs use --workers 0 (the same task code without dask); tests/test_analyze_dask.py covers dask.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

import analyze
from analyze.catalog import EpochSpec, EpochSpecError, build_catalog
from analyze.cli import main, parse_args
from analyze.store import KEY_COLUMNS, Store, config_hash, file_hash, task_key
from trainer.checkpoints import read_checkpoint, save_checkpoint

TRUNK, SGD, NGD = "ffnn-1x8-trunk", "ffnn-1x8-swap-sgd", "ffnn-1x8-swap-ngd"


def run_cli(*args) -> int:
    return main([str(a) for a in args] + ["--workers", "0"])


def add_step_checkpoint(ckpts: Path, epoch: int = 1, step: int = 7) -> Path:
    """A mid-epoch checkpoint in the trunk, as train-ckpts --ckpt-every-steps writes it."""
    src = read_checkpoint(ckpts / TRUNK / f"epoch-{epoch:04d}.safetensors")
    m = src.meta
    return save_checkpoint(ckpts / TRUNK / f"epoch-{epoch:04d}-step-{step:08d}.safetensors", src.tensors,
                           run=TRUNK, epoch=epoch, step=step, optimizer=m["optimizer"], model_spec=m["model_spec"],
                           dataset_spec=m["dataset_spec"], kind="step")


# ------------------------------------------------------------------ epochs spec
@pytest.mark.parametrize("text, expected", [
    ("0,5,10-12", {0, 5, 10, 11, 12}),
    ("10-20:2", {10, 12, 14, 16, 18, 20}),
    ("last", {25}),
    ("0,last", {0, 25}),
    ("22-", {22, 23, 24, 25}),
    ("20-:3", {20, 23}),
    (None, set(range(26))),
    ("all", set(range(26))),
])
def test_epoch_spec_selects(text, expected):
    assert EpochSpec.parse(text).select(range(26)) == expected


@pytest.mark.parametrize("text", ["x", "5-2", "1-3:0", "3:2", "-4", "1,,2", "last-2"])
def test_epoch_spec_rejects_bad_items_naming_the_option(text):
    with pytest.raises(EpochSpecError, match="^--epochs: "):
        EpochSpec.parse(text)


# ------------------------------------------------------------------ keys
def test_task_keys_depend_on_content_estimator_and_config_only():
    base = task_key("abc", "weights", {"estimator": "weights", "version": 1, "min_tail": 5})
    assert base == task_key("abc", "weights", {"min_tail": 5, "version": 1, "estimator": "weights"})  # key order
    assert base != task_key("abd", "weights", {"estimator": "weights", "version": 1, "min_tail": 5})
    assert base != task_key("abc", "evaluate", {"estimator": "weights", "version": 1, "min_tail": 5})
    assert base != task_key("abc", "weights", {"estimator": "weights", "version": 1, "min_tail": 6})
    assert base != task_key("abc", "weights", {"estimator": "weights", "version": 2, "min_tail": 5})
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1}) != config_hash({"a": 1, "b": 3})


# ------------------------------------------------------------------ catalog
def test_catalog_finds_runs_parents_checkpoints_and_hashes(tiny_ckpts):
    step_ckpt = add_step_checkpoint(tiny_ckpts)
    catalog = build_catalog(tiny_ckpts)
    assert catalog.warnings == []
    runs = {r.name: r for r in catalog.runs}
    assert set(runs) == {TRUNK, SGD, NGD}
    assert runs[TRUNK].parent is None and runs[SGD].parent == (TRUNK, 2) and runs[NGD].parent == (TRUNK, 2)
    assert runs[NGD].optimizer == "ngd"
    trunk = [(c.epoch, c.step, c.path.name) for c in runs[TRUNK].checkpoints]
    # the mid-epoch checkpoint of epoch 1 comes before the end of epoch 1; steps from the metadata
    assert trunk == [(0, 0, "epoch-0000.safetensors"), (1, 7, step_ckpt.name), (1, 19, "epoch-0001.safetensors"),
                     (2, 38, "epoch-0002.safetensors")]
    assert [(c.epoch, c.step) for c in runs[SGD].checkpoints] == [(3, 57)]
    for c in catalog.checkpoints:
        assert c.hash == file_hash(c.path) and len(c.hash) == 32
        assert c.meta["model_spec"]["type"] == "ffnn"
    assert len({c.hash for c in catalog.checkpoints}) == len(catalog.checkpoints)


def test_catalog_selects_runs_and_epochs(tiny_ckpts):
    add_step_checkpoint(tiny_ckpts)
    catalog = build_catalog(tiny_ckpts, runs="*swap*", epochs=EpochSpec.parse("last"))
    assert sorted(r.name for r in catalog.selected) == [NGD, SGD]
    assert len(catalog.runs) == 3  # runs.parquet still lists every run
    catalog = build_catalog(tiny_ckpts, runs=f"{TRUNK},nothing*", epochs=EpochSpec.parse("1"))
    assert [(c.run, c.epoch, c.step) for c in catalog.checkpoints] == [(TRUNK, 1, 7), (TRUNK, 1, 19)]


def test_bad_run_json_is_one_warning_and_the_run_is_skipped(tiny_ckpts):
    (tiny_ckpts / SGD / "run.json").write_text("{not json")
    record = json.loads((tiny_ckpts / NGD / "run.json").read_text())
    del record["role"], record["optimizer"]
    (tiny_ckpts / NGD / "run.json").write_text(json.dumps(record))
    catalog = build_catalog(tiny_ckpts)
    assert [r.name for r in catalog.runs] == [TRUNK]
    assert len(catalog.warnings) == 2
    bad_json, lacking = sorted(catalog.warnings, key=lambda w: SGD in w)[::-1]
    assert bad_json.startswith(str(tiny_ckpts / SGD / "run.json")) and "not valid JSON" in bad_json
    assert lacking.startswith(str(tiny_ckpts / NGD / "run.json")) and "role" in lacking and "optimizer" in lacking
    assert all("\n" not in w and "skipped" in w for w in catalog.warnings)


def test_checkpoints_without_run_json_are_one_warning(tiny_ckpts):
    (tiny_ckpts / SGD / "run.json").unlink()
    (tiny_ckpts / "notes").mkdir()  # a folder without checkpoints is not worth a word
    catalog = build_catalog(tiny_ckpts)
    assert SGD not in [r.name for r in catalog.runs]
    assert catalog.warnings == [f"{tiny_ckpts / SGD}: checkpoints but no run.json; folder skipped"]


def test_cli_warns_about_a_bad_run_and_analyses_the_rest(tiny_ckpts, capsys):
    (tiny_ckpts / SGD / "run.json").write_text("[1, 2")
    assert run_cli(tiny_ckpts, "--estimators", "weights") == 0
    err = capsys.readouterr().err
    assert f"analyze: warning: {tiny_ckpts / SGD / 'run.json'}: not valid JSON" in err
    tables = analyze.load(tiny_ckpts / "analysis")
    assert set(tables["weights"]["run"]) == {TRUNK, NGD}


# ------------------------------------------------------------------ store
def test_store_parts_markers_errors_and_reading_a_table(tmp_path):
    store = Store(tmp_path / "out")
    keys = {"run": "r", "optimizer": "sgd", "epoch": 3, "step": 57, "ckpt_hash": "h", "config_hash": "c"}
    assert store.completed() == set()
    store.write_error("k1", keys, estimator="e", error="RuntimeError", message="boom")
    frames = {"t": pd.DataFrame({"x": [1.0, 2.0]}), "u": pd.DataFrame({"y": [1]}), "empty": pd.DataFrame()}
    assert store.write_parts("k1", keys, frames) == {"t": 2, "u": 1}
    assert not (tmp_path / "out" / "empty").exists()  # nothing to type an empty part with
    assert store.completed() == set()  # parts alone do not complete a task
    store.finish("k1", {"key": "k1"})
    assert store.completed() == {"k1"}
    assert not store.part_path("errors", "k1").exists()  # success clears the earlier error
    # a recomputation that no longer fills table u drops its old part
    store.reopen("k1")
    assert store.completed() == set()
    store.write_parts("k1", keys, {"t": pd.DataFrame({"x": [5.0]})})
    assert not store.part_path("u", "k1").exists()
    store.write_parts("k2", {**keys, "epoch": 4}, {"t": pd.DataFrame({"x": [3.0]})})
    table = pd.read_parquet(tmp_path / "out" / "t").sort_values("epoch", ignore_index=True)
    assert list(table.columns) == list(KEY_COLUMNS) + ["x"]
    assert table["epoch"].tolist() == [3, 4] and table["x"].tolist() == [5.0, 3.0]
    assert str(table["epoch"].dtype) == "int64"


# ------------------------------------------------------------------ end to end in-process
def test_run_load_and_epochs_frame(tiny_ckpts, capsys):
    add_step_checkpoint(tiny_ckpts)
    out = tiny_ckpts / "analysis"
    assert run_cli(tiny_ckpts) == 0
    printed = capsys.readouterr().out
    assert f"tables in {out}: evaluate, runs, training, weights, xcorr" in printed  # xcorr: --report's
    assert f"report: {out / 'report.html'}" in printed and (out / "report.html").stat().st_size > 100_000
    assert TRUNK in printed and "4/4" in printed  # 4 trunk checkpoints (one mid-epoch) analysed
    tables = analyze.load(out)
    assert set(tables) == {"evaluate", "weights", "runs", "training", "epochs", "xcorr"}
    ev = tables["evaluate"]
    assert list(ev.columns[:6]) == list(KEY_COLUMNS)
    assert len(ev) == 6 * 3 and set(ev["split"]) == {"train", "val", "test"}
    assert len(pd.read_parquet(out / "evaluate")) == len(ev)  # plain pandas reads a table too
    runs = tables["runs"].set_index("run")
    assert runs.loc[SGD, "parent_run"] == TRUNK and runs.loc[SGD, "parent_epoch"] == 2
    assert runs.loc[TRUNK, "role"] == "trunk" and runs.loc[NGD, "optimizer"] == "ngd"
    assert sorted(tables["training"]["run"].unique()) == sorted([TRUNK, SGD, NGD])

    epochs = tables["epochs"]
    assert [(r, e) for r, e in zip(epochs["run"], epochs["epoch"])] == [
        (NGD, 3), (SGD, 3), (TRUNK, 0), (TRUNK, 1), (TRUNK, 2)]  # no row for the mid-epoch checkpoint
    for column in ("eval_train_loss", "eval_train_acc", "eval_val_loss", "eval_val_acc", "eval_test_loss",
                   "eval_test_acc", "train_loss", "val_loss", "optimizer", "role"):
        assert column in epochs
    # the trainer logs val/test loss of the same weights on the same splits
    assert (epochs["eval_val_loss"] - epochs["val_loss"]).abs().max() < 1e-5
    assert (epochs["eval_test_acc"] - epochs["test_acc"]).abs().max() < 1e-9
    assert epochs["eval_train_loss"].notna().all()


def test_epochs_frame_picks_up_later_estimators_scalars(tiny_ckpts):
    out = tiny_ckpts / "analysis"
    assert run_cli(tiny_ckpts, "--estimators", "evaluate", "--runs", TRUNK) == 0
    ev = analyze.load(out)["evaluate"]
    first = ev[ev["split"] == "train"][list(KEY_COLUMNS)].reset_index(drop=True)
    store = Store(out)
    for i, keys in first.iterrows():  # what a future llc/hessian estimator will write
        keys = keys.to_dict()
        store.write_parts(f"llc{i}", keys, {"llc": pd.DataFrame({"llc_mean": [10.0 + keys["epoch"]], "llc_sem": [0.5],
                                                                 "wbic": [1.0], "n_chains": [4]})})
        store.write_parts(f"h{i}", keys, {"hessian": pd.DataFrame({"trace": [2.0 * keys["epoch"]]})})
        store.finish(f"llc{i}", {})
        store.finish(f"h{i}", {})
    epochs = analyze.load(out)["epochs"]
    trunk = epochs[epochs["run"] == TRUNK].set_index("epoch")
    assert trunk["llc_mean"].tolist() == [10.0, 11.0, 12.0] and trunk["llc_sem"].tolist() == [0.5] * 3
    assert trunk["hessian_trace"].tolist() == [0.0, 2.0, 4.0]
    assert "n_chains" not in epochs and "hessian_trace_exact" not in epochs
    # branches have training logs but no estimates here
    assert epochs[epochs["run"] == SGD]["llc_mean"].isna().all()


def test_incremental_runs_compute_only_what_is_missing(tiny_ckpts, capsys):
    out = tiny_ckpts / "analysis"
    assert run_cli(tiny_ckpts, "--estimators", "weights", "--epochs", "0") == 0
    first = {p.name: p.stat().st_mtime_ns for p in (out / "weights").iterdir()}
    assert len(first) == 1
    assert run_cli(tiny_ckpts, "--estimators", "weights,evaluate") == 0
    err = capsys.readouterr().err
    assert "9 task(s) to compute, 1 already complete" in err
    after = {p.name: p.stat().st_mtime_ns for p in (out / "weights").iterdir()}
    assert len(after) == 5 and all(after[name] == mtime for name, mtime in first.items())
    assert len(os.listdir(out / "_tasks")) == 10
    assert run_cli(tiny_ckpts, "--estimators", "weights,evaluate") == 0
    assert "0 task(s) to compute, 10 already complete" in capsys.readouterr().err
    # a different option value is a different task, next to the first
    assert run_cli(tiny_ckpts, "--estimators", "weights", "--weights-min-tail", "3", "--epochs", "0") == 0
    weights = analyze.load(out)["weights"]
    assert weights["config_hash"].nunique() == 2


def test_a_failed_task_is_recorded_and_a_later_success_clears_it(tiny_ckpts, capsys, monkeypatch):
    out = tiny_ckpts / "analysis"
    monkeypatch.setenv("FAIL_EPOCH", "2")
    assert run_cli(tiny_ckpts, "--estimators", "analyze_plugins:FailOnEpoch") == 1
    err = capsys.readouterr().err
    assert f"analyze: 1 task(s) failed; see {out / 'errors'}" in err
    errors = analyze.load(out)["errors"]
    assert errors[["run", "epoch", "estimator", "error", "message"]].values.tolist() == [
        [TRUNK, 2, "failing", "RuntimeError", "boom at epoch 2"]]
    assert "raise RuntimeError" in errors["traceback"][0]
    assert len(os.listdir(out / "_tasks")) == 4
    monkeypatch.delenv("FAIL_EPOCH")  # the option's epoch 1 has been analysed already: now all pass
    assert run_cli(tiny_ckpts, "--estimators", "analyze_plugins:FailOnEpoch") == 0
    assert "1 task(s) to compute, 4 already complete" in capsys.readouterr().err
    assert not (out / "errors").exists() or not list((out / "errors").glob("part-*"))
    assert "errors" not in analyze.load(out)


def test_an_error_of_a_since_rewritten_checkpoint_is_dropped(tiny_ckpts, capsys):
    out = tiny_ckpts / "analysis"
    ckpt = tiny_ckpts / TRUNK / "epoch-0001.safetensors"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])
    assert run_cli(tiny_ckpts, "--estimators", "weights") == 1
    errors = analyze.load(out)["errors"]
    assert errors["message"][0].startswith(str(ckpt.resolve()))
    ckpt.write_bytes(good)  # fixed (new content, new task key): the old error no longer applies
    assert run_cli(tiny_ckpts, "--estimators", "weights") == 0
    assert "errors" not in analyze.load(out)


# ------------------------------------------------------------------ CLI usage
@pytest.mark.parametrize("args, message", [
    (["{ckpts}", "--estimators", "nope"], "--estimators: unknown estimator 'nope'"),
    (["{ckpts}", "--estimators", "nomodule_xyz:Thing"], "--estimators: estimator 'nomodule_xyz:Thing': cannot import"),
    (["{ckpts}", "--evaluate-batch-size", "many"], "--evaluate-batch-size: 'many' is not a valid int"),
    (["{ckpts}", "--evaluate-batch-size", "0"], "--evaluate-batch-size: must be at least 1"),
    (["{ckpts}", "--estimators", "weights", "--evaluate-batch-size", "8"],
     "--evaluate-batch-size: estimator 'evaluate' is not selected"),
    (["{ckpts}/missing"], "CKPT_DIR {ckpts}/missing: no such directory"),
    (["{ckpts}/ffnn-1x8-trunk/run.json"], "CKPT_DIR {ckpts}/ffnn-1x8-trunk/run.json: is a file, not a folder of runs"),
    (["{ckpts}", "--epochs", "3-1"], "--epochs: range '3-1' ends before it starts"),
    (["{ckpts}", "--epochs", "40-50"], "--epochs '40-50': selects no checkpoint"),
    (["{ckpts}", "--runs", "zzz*"], "--runs 'zzz*': matches none of the runs"),
    (["{ckpts}", "--frobnicate"], "unrecognized argument --frobnicate"),
    (["{ckpts}", "--workers", "-2"], "--workers: -2 is not a number of workers"),
    (["{ckpts}", "--device", "cuda:0"], "--device cuda:0: CUDA is not available"),
    (["{ckpts}", "--config", "{ckpts}/none.toml"], "--config {ckpts}/none.toml: cannot read"),
    ([], "the following arguments are required: CKPT_DIR"),
])
def test_bad_usage_exits_2_with_one_line_naming_the_option(tiny_ckpts, capsys, args, message):
    if "cuda" in message:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    code = main([a.format(ckpts=tiny_ckpts) for a in args])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("analyze: error: " + message.format(ckpts=tiny_ckpts)), lines
    assert not (tiny_ckpts / "analysis").exists()


def test_help_lists_every_estimator_option_and_the_epochs_syntax(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for piece in ("--estimators", "--scheduler", "--workers", "--force", "--device", "--data-root", "--config",
                  "estimator evaluate", "--evaluate-batch-size", "estimator weights", "--weights-min-tail",
                  "10-20:2", "last", "ckpt_dynamics.estimators"):
        assert piece in text
    assert main(["--estimators", "analyze_plugins:Sleepy", "--help"]) == 0
    assert "--sleepy-seconds" in capsys.readouterr().out  # custom estimators' options too


def test_config_file_sets_estimators_and_options_and_flags_override_it(tiny_ckpts, tmp_path):
    toml = tmp_path / "analysis.toml"
    toml.write_text('estimators = ["evaluate", "analyze_plugins:Sleepy"]\nworkers = 3\n'
                    '[evaluate]\nbatch_size = 100\n[sleepy]\nseconds = 0.25\n')
    s = parse_args([str(tiny_ckpts), "--config", str(toml), "--sleepy-seconds", "0.5"])
    opts = {est.name: est.opts for _, est in s.estimators}
    assert opts == {"evaluate": {"batch_size": 100}, "sleepy": {"seconds": 0.5}}
    assert s.workers == 3 and s.out == tiny_ckpts / "analysis"
    js = tmp_path / "analysis.json"
    js.write_text(json.dumps({"estimators": "weights", "weights": {"min-tail": 7}, "epochs": "last"}))
    s = parse_args([str(tiny_ckpts), "--config", str(js), "--workers", "1"])
    assert [(ref, est.opts) for ref, est in s.estimators] == [("analyze.estimators.weights:Weights", {"min_tail": 7})]
    assert s.epochs.last and s.workers == 1
    js.write_text(json.dumps({"weights": {"min_tail": "lots"}}))
    assert main([str(tiny_ckpts), "--config", str(js)]) == 2
    js.write_text(json.dumps({"wieghts": {}}))
    with pytest.raises(Exception, match="unknown key"):
        parse_args([str(tiny_ckpts), "--config", str(js)])


@pytest.mark.parametrize("config, message", [
    ({"force": "no"}, "'force' must be true or false (as --force takes), not 'no'"),
    ({"report": 1}, "'report' must be true or false"),
    ({"estimators": 7}, "'estimators' must be text or a list of text (as --estimators takes), not 7"),
    ({"workers": "4"}, "'workers' must be an integer (as --workers takes), not '4'"),
    ({"xcorr_max_lag": 2.5}, "'xcorr_max_lag' must be an integer"),
    ({"epochs": {"from": 1}}, "'epochs' must be text, an epoch or a list of them"),
    ({"runs": [1, 2]}, "'runs' must be text or a list of text"),
    ({"out": 5}, "'out' must be a path (text)"),
    ({"evaluate": {"batch_size": "8"}}, "evaluate.batch_size: must be an integer (as --evaluate-batch-size takes)"),
    ({"weights": {"min_tail": 2.5}}, "weights.min_tail: --weights-min-tail: 2.5 is not a valid int"),
    ({"evaluate": {"chains": 2}}, "evaluate.chains: estimator 'evaluate' has no option --evaluate-chains"),
])
def test_config_values_are_type_checked_naming_the_file_and_key(tiny_ckpts, tmp_path, capsys, config, message):
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps(config))
    assert main([str(tiny_ckpts), "--config", str(path), "--workers", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"analyze: error: --config {path}: {message}"), lines
    assert not (tiny_ckpts / "analysis").exists()


def test_typed_config_values_and_api_options_are_accepted_and_wrong_ones_refused(tiny_ckpts, tmp_path):
    toml = tmp_path / "analysis.toml"
    toml.write_text('force = false\nreport = false\nepochs = [0, "2-"]\nruns = ["*trunk"]\nworkers = 0\n')
    s = parse_args([str(tiny_ckpts), "--config", str(toml)])
    assert (s.force, s.report, s.workers, s.runs, s.epochs.text) == (False, False, 0, "*trunk", "0,2-")
    with pytest.raises(ValueError, match=r"^'force' must be true or false \(as --force takes\), not 'no'$"):
        analyze.run(tiny_ckpts, force="no")
    assert not (tiny_ckpts / "analysis").exists()


def test_import_analyze_is_light():
    import subprocess
    import sys

    code = "import sys, analyze, analyze.estimators; print('torch' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_runs_folder_itself_can_be_the_ckpt_dir(tiny_ckpts):
    shutil.rmtree(tiny_ckpts / SGD)
    assert run_cli(tiny_ckpts / TRUNK, "--estimators", "weights", "--out", tiny_ckpts / "one") == 0
    assert set(analyze.load(tiny_ckpts / "one")["weights"]["epoch"]) == {0, 1, 2}


def test_results_of_a_rewritten_checkpoint_are_replaced(tiny_ckpts, capsys):
    out = tiny_ckpts / "analysis"
    assert run_cli(tiny_ckpts, "--estimators", "weights,evaluate", "--runs", TRUNK) == 0
    old = analyze.load(out)["weights"]
    # train-ckpts --overwrite writes the same file names with new weights
    src = read_checkpoint(tiny_ckpts / TRUNK / "epoch-0002.safetensors")
    tensors = {k: v * 2 for k, v in src.tensors.items()}
    m = src.meta
    save_checkpoint(src.path, tensors, run=TRUNK, epoch=2, step=m["step"], optimizer=m["optimizer"],
                    model_spec=m["model_spec"], dataset_spec=m["dataset_spec"])
    assert run_cli(tiny_ckpts, "--estimators", "weights,evaluate", "--runs", TRUNK) == 0
    err = capsys.readouterr().err
    assert "2 task(s) to compute, 4 already complete" in err and "dropped the output of 2 earlier task(s)" in err
    tables = analyze.load(out)
    new = tables["weights"]
    assert len(new) == len(old) and len(os.listdir(out / "_tasks")) == 6
    assert len(tables["evaluate"]) == 9 and not tables["evaluate"].duplicated(["epoch", "split"]).any()
    e2 = new[new["epoch"] == 2].set_index("layer_name")["spectral_norm"]
    o2 = old[old["epoch"] == 2].set_index("layer_name")["spectral_norm"]
    assert (e2 / o2).round(9).eq(2.0).all()


def test_entry_point_estimators_are_registered(tmp_path, monkeypatch, capsys, tiny_ckpts):
    # an installed distribution's metadata, as pip would write it, declaring a plug-in estimator
    dist = tmp_path / "site" / "sleepy_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sleepy-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ckpt_dynamics.estimators]\nsleepy = analyze_plugins:Sleepy\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    from analyze.estimators import registered

    assert registered()["sleepy"] == "analyze_plugins:Sleepy"
    assert main(["--help"]) == 0
    assert "--sleepy-seconds" in capsys.readouterr().out
    assert run_cli(tiny_ckpts, "--estimators", "sleepy", "--sleepy-seconds", "0", "--epochs", "0") == 0
    assert len(analyze.load(tiny_ckpts / "analysis")["sleepy"]) == 1


def test_data_root_overrides_the_folder_stored_in_checkpoints(tmp_path):
    # a checkpoint of an MNIST model whose data lived elsewhere: the error names the --data-root folder
    run = tmp_path / "ckpts" / "mnist-sgd"
    spec = {"type": "ffnn", "input_shape": [1, 28, 28], "outputs": 10, "hidden_nodes": 4, "hidden_layers": 1}
    data = {"name": "mnist", "root": "/elsewhere/data", "split_seed": 1, "val_fraction": 0.1}
    from trainer.models import build_model

    save_checkpoint(run / "epoch-0000.safetensors", build_model(spec).state_dict(), run="mnist-sgd", epoch=0, step=0,
                    optimizer="sgd", model_spec=spec, dataset_spec=data)
    (run / "run.json").write_text(json.dumps({
        "run": "mnist-sgd", "family": "ffnn-1x4", "role": "standard", "experiment_type": "standard",
        "optimizer": {"name": "sgd", "lr": 0.1}, "model_spec": spec, "dataset_spec": data, "parent": None,
        "status": "complete"}))
    here = tmp_path / "here"
    assert run_cli(tmp_path / "ckpts", "--data-root", here) == 1
    tables = analyze.load(tmp_path / "ckpts" / "analysis")
    message = tables["errors"].set_index("estimator").loc["evaluate", "message"]
    assert str(here / "MNIST" / "raw") in message and "/elsewhere" not in message
    assert len(tables["weights"]) == 2  # data-free estimators do not need the data
