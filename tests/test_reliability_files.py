"""Reliability of what is read and written: nothing is unpickled; corrupt checkpoints fail clearly;
names cannot escape the output folder; NaN checkpoints are reported, not averaged; a full disk leaves
no partial file. Real files, real processes. (Killed processes and dask: test_reliability_processes.py;
property-based tests of the loader: test_loader_fuzz.py.)"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
import tokenize
from pathlib import Path

import pandas as pd
import pytest
import torch

import analyze
from analyze.catalog import build_catalog
from analyze.cli import main as analyze_main
from analyze.store import Store, UnsafeName
from helpers import ENV, PeakMemory, markers, parts, rewrite_checkpoint, temp_files
from trainer.checkpoints import (CheckpointError, check_name, list_checkpoints, load_model, read_checkpoint,
                                 read_resume_state)
from trainer.cli import main as train_main

ROOT = Path(__file__).resolve().parent.parent
TRUNK, SGD, NGD = "ffnn-1x8-trunk", "ffnn-1x8-swap-sgd", "ffnn-1x8-swap-ngd"
PY = sys.executable


# ====================================================================== nothing is unpickled
FORBIDDEN_NAMES = {"pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}


def code_tokens(path: Path):
    """NAME/OP tokens of a Python file: comments and strings (docstrings included) are left out."""
    with open(path, "rb") as f:
        return [t for t in tokenize.tokenize(f.readline) if t.type in (tokenize.NAME, tokenize.OP)]


def test_no_unpickling_or_eval_anywhere_in_the_packages():
    files = sorted((ROOT / "trainer").rglob("*.py")) + sorted((ROOT / "analyze").rglob("*.py"))
    assert len(files) > 20
    hits = []
    for path in files:
        toks = code_tokens(path)
        for i, t in enumerate(toks):
            before = toks[i - 1].string if i else ""
            after = toks[i + 1].string if i + 1 < len(toks) else ""
            name = f"{path.relative_to(ROOT)}:{t.start[0]}"
            if t.type == tokenize.NAME and t.string in FORBIDDEN_NAMES:
                hits.append(f"{name}: {t.string}")
            if t.string in ("eval", "exec", "__import__") and after == "(" and before != ".":
                hits.append(f"{name}: {t.string}(")
            if t.string == "load" and before == "." and i >= 2 and toks[i - 2].string in ("torch", "np", "numpy"):
                hits.append(f"{name}: {toks[i - 2].string}.load")
            if t.string == "allow_pickle":
                hits.append(f"{name}: allow_pickle")
    assert hits == []
    # and the plain-text check docs/reliability.md promises
    for path in files:
        text = path.read_text()
        assert "torch.load(" not in text and "pickle.load" not in text, path


# ====================================================================== corrupt checkpoints
def _corruptions(good: Path):
    data = good.read_bytes()
    src = read_checkpoint(good)
    spec = src.meta["model_spec"]
    n = int.from_bytes(data[:8], "little")

    def meta_edit(**changes):
        m = {"format": "ckpt-dynamics/1", "run": src.meta["run"], "epoch": str(src.meta["epoch"]),
             "step": str(src.meta["step"]), "kind": "epoch", "optimizer": src.meta["optimizer"],
             "model_spec": json.dumps(spec), "dataset_spec": json.dumps(src.meta["dataset_spec"])}
        m.update(changes)
        m = {k: v for k, v in m.items() if v is not None}
        from safetensors.torch import save

        return save(src.tensors, metadata=m)

    def spec_edit(**changes):
        return meta_edit(model_spec=json.dumps({**spec, **changes}))

    from safetensors.torch import save

    return {
        "empty": (b"", "not a valid safetensors file"),
        "truncated-in-header": (data[: 8 + n // 2], "truncated or corrupt"),
        "truncated-in-tensors": (data[: len(data) - 7], "truncated or corrupt"),
        "header-length-huge": ((2**63).to_bytes(8, "little") + data[8:], "truncated or corrupt"),
        "garbage": (os.urandom(300), "truncated or corrupt"),
        "no-metadata": (save(src.tensors), "metadata lacks format"),
        "missing-model-spec": (meta_edit(model_spec=None), "metadata lacks model_spec"),
        "model-spec-not-json": (meta_edit(model_spec="{'type': 'ffnn'"), "metadata 'model_spec' is not valid JSON"),
        "model-spec-deep": (meta_edit(model_spec="[" * 100_000 + "]" * 100_000), "metadata 'model_spec' is not valid JSON"),
        "model-spec-list": (meta_edit(model_spec="[1, 2]"), "metadata 'model_spec' is not a JSON object"),
        "epoch-not-int": (meta_edit(epoch="2.5"), "metadata 'epoch' is not an integer"),
        "epoch-huge": (meta_edit(epoch="9" * 5000), "metadata 'epoch' is not an integer"),
        "format": (meta_edit(format="other/2"), "unsupported checkpoint format"),
        "run-escapes": (meta_edit(run="../../elsewhere"), "metadata 'run'"),
        "wrong-width": (spec_edit(hidden_nodes=9), "has shape (8, 64) torch.float32, the model spec needs (9, 64)"),
        "absurd-width": (spec_edit(hidden_nodes=10**9), "the model spec needs (1000000000, 64)"),
        "absurd-overflow": (spec_edit(hidden_nodes=10**12, hidden_layers=2), "invalid model spec"),
        "deeper": (spec_edit(hidden_layers=2), "tensors do not match the model spec"),
        "width-text": (spec_edit(hidden_nodes="8"), "invalid model spec: model spec 'hidden_nodes' must be an integer"),
        "width-float": (spec_edit(hidden_nodes=8.0), "invalid model spec: model spec 'hidden_nodes'"),
        "width-negative": (spec_edit(hidden_nodes=-8), "invalid model spec: model spec 'hidden_nodes'"),
        "width-bool": (spec_edit(hidden_nodes=True), "invalid model spec: model spec 'hidden_nodes'"),
        "type-unknown": (spec_edit(type="transformer"), "invalid model spec: unknown model type"),
        "input-shape-bad": (spec_edit(input_shape="64"), "invalid model spec: model spec 'input_shape'"),
        "cnn-too-small": (spec_edit(type="cnn", input_shape=[1, 1, 1], extra_layers=0), "invalid model spec"),
        "float64-tensors": (save({k: v.double() for k, v in src.tensors.items()},
                                 metadata={k: v for k, v in _meta_strings(src).items()}),
                            "torch.float64, the model spec needs"),
        "extra-tensor": (save({**src.tensors, "spy": torch.zeros(1)}, metadata=_meta_strings(src)),
                         "unexpected: ['spy']"),
    }


def _meta_strings(ckpt) -> dict[str, str]:
    m = ckpt.meta
    return {"format": m["format"], "run": m["run"], "epoch": str(m["epoch"]), "step": str(m["step"]), "kind": "epoch",
            "optimizer": m["optimizer"], "model_spec": json.dumps(m["model_spec"]),
            "dataset_spec": json.dumps(m["dataset_spec"])}


def test_every_corrupt_checkpoint_is_one_clear_line_naming_the_file(tiny_ckpts, tmp_path):
    good = tiny_ckpts / TRUNK / "epoch-0001.safetensors"
    with PeakMemory() as peak:
        _load_each_corruption(good, tmp_path)
    # a spec asking for a 10^9-wide layer (256 GB) was checked on the meta device: no memory was taken
    assert peak.grown < 300 * 2**20, peak.grown
    # the untouched checkpoint still loads
    model, ckpt = load_model(good)
    assert all(torch.equal(t, ckpt.tensors[k]) for k, t in model.state_dict().items())


def _load_each_corruption(good, tmp_path):
    for name, (data, expected) in _corruptions(good).items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        start = time.perf_counter()
        with pytest.raises(CheckpointError) as info:
            load_model(path)
        message = str(info.value)
        assert message.startswith(f"{path}: "), (name, message)
        assert expected in message, (name, message)
        assert "\n" not in message and len(message) < 1000, name
        assert time.perf_counter() - start < 5, name  # an absurd spec is never built for real


def test_build_model_rejects_values_of_the_wrong_type():
    from trainer.models import build_model

    base = {"type": "ffnn", "input_shape": [64], "outputs": 10, "hidden_nodes": 8, "hidden_layers": 1}
    build_model(base)
    for key, value in [("hidden_nodes", "8"), ("hidden_nodes", 8.0), ("hidden_nodes", -1), ("hidden_nodes", 0),
                       ("hidden_layers", -1), ("hidden_layers", 10**6), ("hidden_layers", None), ("outputs", "10"),
                       ("outputs", True), ("input_shape", [64.0]), ("input_shape", [-64]), ("input_shape", []),
                       ("type", None)]:
        with pytest.raises(ValueError):
            build_model({**base, key: value})
    with pytest.raises(ValueError):
        build_model({"type": "layers", "input_shape": [64], "outputs": 10, "layers": ["dense:1e400", "dense:10"]})
    with pytest.raises(ValueError):
        build_model({"type": "layers", "input_shape": [1, 8, 8], "outputs": 10,
                     "layers": ["conv2d:4:0:1:1", "flatten", "dense:10"]})
    with pytest.raises(ValueError):
        build_model(["not", "a", "spec"])


def test_a_corrupt_resume_state_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "resume.safetensors"
    from safetensors.torch import save

    for meta in ({"epoch": "1", "step": "2", "optimizer_state": '{"__dict__": 5}'},
                 {"epoch": "1", "step": "2", "optimizer_state": '{"__tensor__": "missing"}'},
                 {"epoch": "1", "step": "2", "optimizer_state": "[" * 50_000 + "]" * 50_000},
                 {"epoch": "x", "step": "2", "optimizer_state": "{}"}):
        path.write_bytes(save({"a": torch.zeros(1)}, metadata=meta))
        with pytest.raises(CheckpointError, match=f"^{path}: invalid resume state"):
            read_resume_state(path)


def test_corrupt_checkpoints_become_error_rows_and_the_rest_is_analysed(tiny_ckpts, capsys):
    broken = {
        TRUNK: ("epoch-0000.safetensors", lambda p: rewrite_checkpoint(
            p, model_spec={**read_checkpoint(p).meta["model_spec"], "hidden_nodes": 10**9})),
        SGD: ("epoch-0003.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
        NGD: ("epoch-0003.safetensors", lambda p: rewrite_checkpoint(
            p, tensors={k: v.double() for k, v in read_checkpoint(p).tensors.items()})),
    }
    paths = []
    for run, (name, corrupt) in broken.items():
        path = tiny_ckpts / run / name
        corrupt(path)
        paths.append(path.resolve())
    out = tiny_ckpts / "analysis"
    assert analyze_main([str(tiny_ckpts), "--estimators", "weights,evaluate", "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert "analyze: 6 task(s) failed" in err
    tables = analyze.load(out)
    errors = tables["errors"]
    assert len(errors) == 6 and set(errors["error"]) == {"CheckpointError"}
    for path in paths:
        messages = errors[errors["path"] == str(path)]["message"]
        assert len(messages) == 2 and all(m.startswith(f"{path}: ") and "\n" not in m for m in messages)
    assert sorted(set(tables["weights"]["epoch"])) == [1, 2]  # the trunk's two good checkpoints
    assert len(tables["evaluate"]) == 2 * 3


def test_a_checkpoint_whose_name_and_metadata_disagree_is_skipped_naming_both(tiny_ckpts):
    """Renamed or copied checkpoints would give a second set of rows for one (run, epoch, step): each is
    skipped with one warning naming the file and both values, in a real analyze run."""
    trunk, sgd = tiny_ckpts / TRUNK, tiny_ckpts / SGD
    src = read_checkpoint(trunk / "epoch-0001.safetensors")
    step1 = src.meta["step"]
    hostile = {  # path -> what the warning must name
        trunk / "epoch-0022.safetensors": "epoch 22 by its file name, 1 in its metadata",  # a byte copy
        trunk / f"epoch-0001-step-{step1:08d}.safetensors": "a mid-epoch (step) checkpoint by its file name",
        sgd / "epoch-0002.safetensors": f"run '{SGD}' by its folder, '{TRUNK}' in its metadata",
        trunk / "epoch-0005.safetensors": "epoch 5 by its file name, 2 in its metadata",  # other bytes
    }
    for path in list(hostile)[:3]:
        shutil.copyfile(trunk / ("epoch-0002.safetensors" if path.parent == sgd else "epoch-0001.safetensors"), path)
    two = read_checkpoint(trunk / "epoch-0002.safetensors")
    shutil.copyfile(two.path, trunk / "epoch-0005.safetensors")
    rewrite_checkpoint(trunk / "epoch-0005.safetensors", tensors={k: 2 * v for k, v in two.tensors.items()})
    proc = subprocess.run([PY, "-m", "analyze.cli", str(tiny_ckpts), "--estimators", "evaluate,weights",
                           "--workers", "0", "--no-report"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [l for l in proc.stderr.splitlines() if "disagree" in l]
    assert len(warnings) == 4, proc.stderr
    for path, detail in hostile.items():
        line = next(l for l in warnings if l.startswith(f"analyze: warning: {path}: "))
        assert detail in line and line.endswith("checkpoint skipped"), line
    tables = analyze.load(tiny_ckpts / "analysis")
    evaluate = tables["evaluate"]
    assert not evaluate.duplicated(["run", "epoch", "step", "split"]).any()
    assert len(evaluate) == 5 * 3 and "errors" not in tables  # the five genuine checkpoints, three splits each
    assert {(r, e) for r, e in zip(tables["weights"]["run"], tables["weights"]["epoch"])} == {
        (TRUNK, 0), (TRUNK, 1), (TRUNK, 2), (SGD, 3), (NGD, 3)}


# ====================================================================== names and paths
def test_run_names_that_would_leave_the_folder_are_refused(tiny_ckpts, tmp_path, capsys):
    for bad in ("../escape", "/tmp/abs", "a/b", "..", ".hidden", "", "x\x00y", 5, None):
        with pytest.raises(ValueError):
            check_name(bad)
    check_name("ffnn-2x32-swap-ngd")

    def edit(folder, **changes):
        path = tiny_ckpts / folder / "run.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        return path

    escaping = edit(SGD, run="../../escaped")
    parent = edit(NGD, parent={"run": "../../../etc", "epoch": 2})
    evil_dir = tiny_ckpts / "evil"
    shutil.copytree(tiny_ckpts / TRUNK, evil_dir)
    evil = evil_dir / "run.json"
    evil.write_text(json.dumps({**json.loads(evil.read_text()), "run": "evil/../../x"}))
    before = sorted(p.name for p in tmp_path.iterdir())

    catalog = build_catalog(tiny_ckpts)
    assert [r.name for r in catalog.runs] == [TRUNK]
    assert len(catalog.warnings) == 3 and all("\n" not in w and w.endswith("run skipped") for w in catalog.warnings)
    for path in (escaping, parent, evil):
        assert any(w.startswith(f"{path}: ") for w in catalog.warnings), path

    assert analyze_main([str(tiny_ckpts), "--estimators", "weights", "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert f"analyze: warning: {escaping}: 'run': run name '../../escaped' is not a plain folder name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written next to the folder
    assert set(analyze.load(tiny_ckpts / "analysis")["weights"]["run"]) == {TRUNK}


def test_store_and_estimators_refuse_names_that_are_paths(tiny_ckpts, tmp_path, capsys):
    store = Store(tmp_path / "out")
    for table, key in (("../x", "k"), ("/abs", "k"), ("a/b", "k"), ("t", "../k"), ("t", "a/b"), ("t", "")):
        with pytest.raises(UnsafeName):
            store.part_path(table, key)
    with pytest.raises(UnsafeName):
        store.marker_path("../../k")
    code = analyze_main([str(tiny_ckpts), "--estimators", "analyze_plugins:EscapingTable", "--workers", "0"])
    assert code == 2 and "table name(s) ['../../outside'] must match" in capsys.readouterr().err
    assert not (tiny_ckpts / "analysis").exists() and not (tiny_ckpts.parent / "outside").exists()
    # an output folder that is the checkpoint folder, or a run's, is refused
    for out in (tiny_ckpts, tiny_ckpts / TRUNK):
        assert analyze_main([str(tiny_ckpts), "--out", str(out), "--workers", "0"]) == 2
        assert "choose a folder of its own" in capsys.readouterr().err
    assert not any(p.is_dir() for p in (tiny_ckpts / TRUNK).iterdir()) and not (tiny_ckpts / "weights").exists()


# ====================================================================== numerical faults
def test_a_checkpoint_with_nan_weights_is_reported_not_averaged(tiny_ckpts):
    path = tiny_ckpts / TRUNK / "epoch-0001.safetensors"
    tensors = dict(read_checkpoint(path).tensors)
    tensors["fc1.weight"] = tensors["fc1.weight"].clone()
    tensors["fc1.weight"][0, 0] = math.nan
    rewrite_checkpoint(path, tensors=tensors)
    code = analyze_main([str(tiny_ckpts), "--runs", TRUNK, "--epochs", "0,1", "--estimators", "evaluate,llc",
                         "--llc-chains", "2", "--llc-draws", "20", "--llc-burnin", "5", "--workers", "0"])
    assert code == 0
    tables = analyze.load(tiny_ckpts / "analysis")
    ev = tables["evaluate"].set_index(["epoch", "split"])
    assert ev.loc[1, "loss"].isna().all() and ev.loc[0, "loss"].notna().all()  # NaN loss rows, not a crash
    llc = tables["llc"].set_index("epoch")
    bad, good = llc.loc[1], llc.loc[0]
    assert bad["diverged"] and bad["n_diverged"] == 2 and math.isnan(bad["init_loss"])  # flagged, with the cause
    assert math.isnan(bad["llc_mean"]) and math.isnan(bad["wbic"]) and math.isnan(bad["mean_sampled_loss"])
    assert not good["diverged"] and math.isfinite(good["llc_mean"])
    assert "errors" not in tables
    epochs = tables["epochs"].set_index(["run", "epoch"])
    assert math.isnan(epochs.loc[(TRUNK, 1), "llc_mean"]) and math.isnan(epochs.loc[(TRUNK, 1), "eval_val_loss"])
    assert len(pd.read_parquet(tiny_ckpts / "analysis" / "llc")) == 2  # plain pandas reads the table too


def test_the_trainer_s_evaluation_of_nan_outputs_is_nan_not_a_plausible_accuracy(tiny_ckpts):
    from trainer.data import load_dataset
    from trainer.losses import nll_loss
    from trainer.loop import evaluate

    model, ckpt = load_model(tiny_ckpts / TRUNK / "epoch-0002.safetensors")
    splits = load_dataset(ckpt.meta["dataset_spec"])
    per_sample = nll_loss("classification", reduction="none")
    loss, acc = evaluate(model, per_sample, splits.val)
    assert math.isfinite(loss) and 0 < acc <= 1
    with torch.no_grad():
        model.fc1.weight[0, 0] = math.nan
    loss, acc = evaluate(model, per_sample, splits.val)
    assert math.isnan(loss) and math.isnan(acc)  # argmax(NaN) = class 0 would have given about 0.1


def test_an_all_nan_column_does_not_make_a_table_unreadable(tmp_path):
    """A diverged LLC's llc_per_chain is all NaN: pandas types it list<null>; the parts must still read as one."""
    store = Store(tmp_path / "out")
    keys = {"run": "r", "optimizer": "sgd", "epoch": 1, "step": 1, "ckpt_hash": "h", "config_hash": "c"}
    store.write_parts("k1", keys, {"llc": pd.DataFrame({"per_chain": [[math.nan, math.nan]], "m": [math.nan]})})
    store.write_parts("k2", {**keys, "epoch": 2}, {"llc": pd.DataFrame({"per_chain": [[1.0, 2.0]], "m": [1.5]})})
    store.write_parts("k3", {**keys, "epoch": 3}, {"llc": pd.DataFrame({"per_chain": [[None]], "m": [None]})})
    for key in ("k1", "k2", "k3"):
        store.finish(key, {})
    for frame in (pd.read_parquet(tmp_path / "out" / "llc"), analyze.load(tmp_path / "out")["llc"]):
        frame = frame.sort_values("epoch", ignore_index=True)
        assert frame["m"].tolist()[1] == 1.5 and math.isnan(frame["m"][0]) and pd.isna(frame["m"][2])
        assert list(frame["per_chain"][1]) == [1.0, 2.0]
    # a part written by an older version, with a null-typed column, is read with Arrow's type promotion
    pd.DataFrame({**{k: [v] for k, v in keys.items()}, "epoch": [4], "per_chain": [[None]], "m": [None]}).to_parquet(
        tmp_path / "out" / "llc" / "part-a0.parquet", index=False)
    store.finish("a0", {})
    assert len(analyze.load(tmp_path / "out")["llc"]) == 4


# ====================================================================== full disk
FSIZE_SCRIPT = textwrap.dedent("""
    import json, os, resource, signal, sys
    from pathlib import Path
    import numpy as np, pandas as pd, torch
    from common.atomic import atomic_write_parquet
    from trainer.checkpoints import save_checkpoint
    from trainer.cli import main as train_main

    out, limit = Path(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of a signal, like a full disk's ENOSPC
    spec = {"type": "ffnn", "input_shape": [64], "outputs": 10, "hidden_nodes": 4, "hidden_layers": 1}
    data = {"name": "digits"}
    small_frame = pd.DataFrame({"x": [1.0, 2.0]})
    small = {"w": torch.ones(4)}
    atomic_write_parquet(out / "part-a.parquet", small_frame)
    save_checkpoint(out / "epoch-0000.safetensors", small, run="r", epoch=0, step=0, optimizer="sgd",
                    model_spec=spec, dataset_spec=data)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    big_frame = pd.DataFrame({"x": np.random.default_rng(0).standard_normal(100_000)})
    big = {"w": torch.randn(100_000)}
    results = {}
    for name, write in [
        ("parquet-new", lambda: atomic_write_parquet(out / "part-b.parquet", big_frame)),
        ("parquet-replace", lambda: atomic_write_parquet(out / "part-a.parquet", big_frame)),
        ("ckpt-new", lambda: save_checkpoint(out / "epoch-0001.safetensors", big, run="r", epoch=1, step=1,
                                             optimizer="sgd", model_spec=spec, dataset_spec=data)),
        ("ckpt-replace", lambda: save_checkpoint(out / "epoch-0000.safetensors", big, run="r", epoch=0, step=0,
                                                 optimizer="sgd", model_spec=spec, dataset_spec=data)),
    ]:
        try:
            write()
            results[name] = "written"
        except OSError as e:
            results[name] = f"OSError {e.errno}"
    # train-ckpts itself: a checkpoint larger than the limit
    results["train-ckpts"] = train_main(["--experiment-type", "standard", "--optimizer", "sgd", "--num-epochs", "2",
                                         "--hidden-nodes", "256", "--hidden-layers", "1", "--out", str(out / "ck"),
                                         "--quiet"])
    print(json.dumps(results))
""")


def test_a_full_disk_leaves_no_partial_file_and_earlier_files_intact(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([PY, "-c", FSIZE_SCRIPT, str(out), str(60_000)], env=ENV, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == {"parquet-new": "OSError 27", "parquet-replace": "OSError 27", "ckpt-new": "OSError 27",
                       "ckpt-replace": "OSError 27", "train-ckpts": 1}
    assert not (out / "part-b.parquet").exists() and not (out / "epoch-0001.safetensors").exists()
    assert pd.read_parquet(out / "part-a.parquet")["x"].tolist() == [1.0, 2.0]  # the earlier files are intact
    assert torch.equal(read_checkpoint(out / "epoch-0000.safetensors").tensors["w"], torch.ones(4))
    assert temp_files(out) == []
    lines = [l for l in proc.stderr.splitlines() if l.startswith("train-ckpts: error:")]
    assert len(lines) == 1 and "File too large" in lines[0] and "--resume" in lines[0]
    run = out / "ck" / "ffnn-1x256-sgd"
    assert not list(run.glob("*.safetensors"))  # the too-large epoch-0 checkpoint was not left half-written
    # with room again, --resume starts the run over and finishes it
    assert train_main(["--experiment-type", "standard", "--optimizer", "sgd", "--num-epochs", "2",
                       "--hidden-nodes", "256", "--hidden-layers", "1", "--out", str(out / "ck"), "--quiet",
                       "--resume"]) == 0
    assert [e for e, _, _ in list_checkpoints(run)] == [0, 1, 2]


ANALYZE_FSIZE = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    from analyze.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_a_full_disk_while_writing_a_part_is_a_task_error(tiny_ckpts):
    out = tiny_ckpts / "analysis"
    proc = subprocess.run([PY, "-c", ANALYZE_FSIZE, str(400_000), str(tiny_ckpts), "--estimators",
                           "weights,analyze_plugins:Big", "--workers", "0"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "analyze: 5 task(s) failed" in proc.stderr
    tables = analyze.load(out)
    errors = tables["errors"]
    assert len(errors) == 5 and set(errors["estimator"]) == {"big"} and set(errors["error"]) == {"OSError"}
    assert all("File too large" in m for m in errors["message"])
    assert parts(out, "big") == [] and len(parts(out, "weights")) == 5  # the rest was analysed
    assert len(markers(out)) == 5
    assert temp_files(out) == []
