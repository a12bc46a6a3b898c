"""Hostile files (issue 16): memory bounded by a cap, not by the numbers in a file; no read of a FIFO or a
device; one line instead of a traceback for bad files and options. Real files and real processes.
(Dead services and Ctrl-C: test_reliability_services.py.)"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import analyze
from analyze.cli import UsageError
from analyze.cli import main as analyze_main
from helpers import ENV
from trainer.checkpoints import checkpoint_name, read_checkpoint, save_checkpoint
from trainer.cli import main as train_main
from trainer.models import build_model

TRUNK = "ffnn-1x8-trunk"
PY = sys.executable

# ====================================================================== memory bombs
LAYER_BOMB = {"type": "layers", "input_shape": [1, 12000, 12000], "outputs": 10,
              "layers": ["maxpool2d:12000", "flatten", "dense:10"]}  # a 576 MB shape probe, 20 parameters
TEACHER_BOMB = {"name": "teacher", "split_seed": 1, "val_fraction": 0.15, "test_fraction": 0.2, "task": "classification",
                "samples": 2000, "input_dim": 10, "outputs": 3,
                "teacher_model": {"type": "ffnn", "input_shape": [10], "outputs": 3, "hidden_nodes": 3_000_000,
                                  "hidden_layers": 1}}  # ~50 GB of activations over 2000 samples
STUDENT = {"type": "ffnn", "input_shape": [10], "outputs": 3, "hidden_nodes": 4, "hidden_layers": 1}


def write_bomb(run_dir: Path, model_spec: dict, dataset_spec: dict) -> Path:
    """Epoch 0 of `run_dir`'s run replaced by a small checkpoint whose spec asks for far more memory."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(model_spec).state_dict().items()}
    path = run_dir / checkpoint_name(0)
    meta = read_checkpoint(path).meta
    for p in run_dir.glob("epoch-*.safetensors"):
        p.unlink()
    return save_checkpoint(path, {k: torch.zeros(s) for k, s in shapes.items()}, run=meta["run"], epoch=0, step=0,
                           optimizer=meta["optimizer"], model_spec=model_spec, dataset_spec=dataset_spec)


# Runs analyze (the worker's code, in this process: --workers 0) after importing everything it imports, so
# the growth of the peak RSS is what the checkpoint makes the loader build.
# Runs analyze on a copy of the study without the bomb first (argv[2]): every lazy import, allocator arena and
# thread pool a normal run brings is then in place. The run on the bomb's folder (argv[1]) is then measured with
# helpers.PeakMemory (the high-water mark reset first): its growth is what the bomb made the loader build.
MEASURE = textwrap.dedent("""
    import json, sys
    import analyze.cli
    from helpers import PeakMemory

    args = ["--workers", "0", "--no-report", "--estimators", "evaluate"]
    assert analyze.cli.main([sys.argv[2], *args]) == 0  # the warm-up: the same run without the bomb
    with PeakMemory() as peak:
        code = analyze.cli.main([sys.argv[1], *args])
    print(json.dumps({"code": code, "grown_mb": peak.grown / 2**20}))
""")


@pytest.mark.parametrize("kind", ["layer-list-probe", "teacher-dataset"])
def test_a_memory_bomb_checkpoint_is_refused_before_it_allocates(tiny_ckpts, tmp_path, kind):
    """A ~1 KB checkpoint whose layer list probes a 12000x12000 input, or whose dataset spec is a teacher
    3,000,000 units wide: one error row naming the file and the cap, and the run's peak RSS below 200 MB over that
    of the same run without the bomb (building them took 0.7 GB and 3.2 GB before the cap)."""
    warm = tmp_path / "warm"
    shutil.copytree(tiny_ckpts, warm)
    run_dir = tiny_ckpts / TRUNK
    bomb = write_bomb(run_dir, *((LAYER_BOMB, read_checkpoint(run_dir / checkpoint_name(0)).meta["dataset_spec"])
                                 if kind == "layer-list-probe" else (STUDENT, TEACHER_BOMB)))
    assert bomb.stat().st_size < 2048
    done = subprocess.run([PY, "-c", MEASURE, str(tiny_ckpts), str(warm)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 1, done.stderr
    assert result["grown_mb"] < 200, result
    line = next(s for s in done.stderr.splitlines() if "memory cap" in s)
    assert str(bomb.resolve()) in line and "--max-memory-gb" in line
    assert "Traceback" not in done.stderr


def test_the_cap_is_a_flag(tiny_ckpts, capsys):
    """--max-memory-gb sets the cap: a cap below what the tiny model needs refuses it, naming the file; a
    checkpoint file larger than the cap is not read at all."""
    path = tiny_ckpts / TRUNK / checkpoint_name(0)
    for cap_bytes, says in ((path.stat().st_size + 64, "memory cap"), (path.stat().st_size - 1, "-byte bound")):
        assert analyze_main([str(tiny_ckpts), "--workers", "0", "--no-report", "--estimators", "weights", "--force",
                             "--epochs", "0", "--runs", TRUNK, "--max-memory-gb", str(cap_bytes / 2**30)]) == 1
        err = capsys.readouterr().err
        assert f"{path}: " in err and says in err
    assert analyze_main([str(tiny_ckpts), "--max-memory-gb", "-1"]) == 2
    assert "--max-memory-gb" in capsys.readouterr().err
    with pytest.raises(UsageError, match="'max_memory_gb' must be a number"):
        analyze.run(tiny_ckpts, ["weights"], max_memory_gb="4")


@pytest.mark.parametrize("argv, option", [
    (["--hidden-nodes", "1000000000", "--hidden-layers", "1"], "'hidden_nodes'"),
    (["--dataset", "teacher", "--teacher-hidden-nodes", "3000000"], "'teacher_hidden_nodes'"),
    # 10000 x 10000 weights fit a 2 GB cap for SGD (1.2 GB with gradients and momentum), not NGD's Fisher factors
    (["--hidden-nodes", "10000", "--hidden-layers", "2", "--experiment-type", "standard", "--optimizer", "ngd",
      "--max-memory-gb", "2"], "run ffnn-2x10000-ngd"),
])
def test_train_ckpts_refuses_a_model_or_teacher_over_the_cap_naming_the_option(tmp_path, capsys, argv, option):
    assert train_main(argv + ["--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err and "memory cap" in err
    assert not (tmp_path / "out").exists()


def test_the_memory_cap_counts_a_training_batchs_activations(tmp_path, capsys):
    """A training step keeps every layer's output for the backward pass, for the whole batch: an 8 x 512 MLP
    (7.5 MB of weights, 22.5 MB with SGD's gradients and momentum) at batch 1,000 needs 33 MB more, over a 48 MB
    cap, while at batch 64 it fits and trains. (The cap counted one layer's activations for 64 samples before.)"""
    argv = ["--hidden-nodes", "512", "--hidden-layers", "8", "--experiment-type", "standard", "--optimizer", "sgd",
            "--max-memory-gb", "0.045", "--num-epochs", "1", "--quiet"]
    assert train_main(argv + ["--batch-size", "1000", "--out", str(tmp_path / "big")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'batch_size'" in err and "a batch of 1000" in err and "memory cap" in err
    assert not (tmp_path / "big").exists()
    assert train_main(argv + ["--batch-size", "64", "--out", str(tmp_path / "small")]) == 0


def test_the_memory_cap_counts_the_optimizer():
    """SGD's gradients and momentum and NGD's factors count against the cap: the NGD run above is refused where
    the same model trained by SGD fits."""
    from trainer.models import build_bytes, parameter_shapes
    from trainer.optim.factory import memory_bytes

    spec = {"type": "ffnn", "input_shape": [64], "outputs": 10, "hidden_nodes": 10000, "hidden_layers": 2}
    shapes = parameter_shapes(spec)
    params = sum(math.prod(s) for s in shapes) * 4
    sgd = build_bytes(spec) + memory_bytes({"name": "sgd", "momentum": 0.9}, shapes)
    ngd = build_bytes(spec) + memory_bytes({"name": "ngd", "momentum": 0.9}, shapes)
    assert sgd == pytest.approx(3 * params, rel=0.01) and sgd < 2 * 2**30 < ngd


# ====================================================================== only regular files, bounded
def test_fifos_and_devices_are_never_read(tiny_ckpts, capsys):
    """A checkpoint that is a FIFO or a link to /dev/zero, and a run.json linked to /dev/zero: one warning
    line each, naming the file; the rest is analysed (no hang, no MemoryError)."""
    trunk = tiny_ckpts / TRUNK
    os.mkfifo(trunk / checkpoint_name(98))
    (trunk / checkpoint_name(99)).symlink_to("/dev/zero")
    ngd_json = tiny_ckpts / "ffnn-1x8-swap-ngd" / "run.json"
    ngd_json.unlink()
    ngd_json.symlink_to("/dev/zero")
    config = tiny_ckpts / "zero.json"
    config.symlink_to("/dev/zero")
    assert analyze_main([str(tiny_ckpts), "--config", str(config)]) == 2
    assert f"--config {config}: cannot read (not a regular file" in capsys.readouterr().err
    assert analyze_main([str(tiny_ckpts), "--workers", "0", "--no-report", "--estimators", "weights"]) == 0
    warnings = [s for s in capsys.readouterr().err.splitlines() if "not a regular file" in s]
    assert sorted(w.split(": ")[2] for w in warnings) == sorted(
        str(p) for p in (ngd_json, trunk.resolve() / checkpoint_name(98), trunk.resolve() / checkpoint_name(99)))


# ====================================================================== one line instead of a traceback
@pytest.mark.parametrize("args, message", [
    (["--scheduler", "not a url"], "--scheduler 'not a url': not a dask scheduler address"),
    (["--scheduler", "http://127.0.0.1:8787"], "--scheduler 'http://127.0.0.1:8787': a web address"),
])
def test_a_scheduler_that_is_no_dask_address_is_one_line(tiny_ckpts, capsys, args, message):
    assert analyze_main([str(tiny_ckpts), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"analyze: error: {message}" + err.split(message, 1)[1]]


def test_a_config_of_the_wrong_shape_is_one_line_naming_file_and_key(tiny_ckpts, tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text('{"estimators": 7}')
    assert analyze_main([str(tiny_ckpts), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--config {config}: 'estimators'" in err


def test_an_unexpected_error_is_one_line_and_its_traceback_only_under_debug(tiny_ckpts, capsys):
    args = [str(tiny_ckpts), "--workers", "0", "--no-report", "--estimators", "analyze_plugins:BrokenConfig"]
    assert analyze_main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == ("analyze: error: internal error: RuntimeError: a bug in config() "
                                    "(rerun with --debug for the traceback)")
    assert "Traceback" not in err
    assert analyze_main(args + ["--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in config" in err


def test_small_things_say_what_they_mean(tiny_ckpts, tmp_path, capsys):
    """--out naming a file (no --resume hint), a file given as CKPT_DIR, checkpoints without run.json."""
    afile = tmp_path / "x.txt"
    afile.write_text("")
    assert train_main(["--out", str(afile), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"train-ckpts: error: invalid value for 'out': {afile} is a file, not a folder"
    assert analyze_main([str(afile)]) == 2
    assert "is a file, not a folder of runs" in capsys.readouterr().err
    (tiny_ckpts / TRUNK / "run.json").unlink()
    assert analyze_main([str(tiny_ckpts), "--workers", "0", "--no-report", "--estimators", "weights"]) == 0
    assert f"{tiny_ckpts / TRUNK}: checkpoints but no run.json; folder skipped" in capsys.readouterr().err


def test_the_arviz_refactor_warning_is_filtered_and_only_it(tmp_path):
    """ArviZ warns about its refactor once a day, in every dask worker; the filter names that warning only."""
    script = textwrap.dedent("""
        import warnings
        warnings.simplefilter("always")
        from analyze.llc.statistics import _arviz
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _arviz()
        print(len(seen))
    """)
    env = {**ENV, "XDG_CACHE_HOME": str(tmp_path)}  # no stamp of today's warning: ArviZ warns
    done = subprocess.run([PY, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "0" and "refactor" not in done.stderr, done.stderr
    done = subprocess.run([PY, "-c", "import arviz"], env=env | {"XDG_CACHE_HOME": str(tmp_path / "b")},
                          capture_output=True, text=True, timeout=120)
    assert "ArviZ is undergoing a major refactor" in done.stderr  # what the filter hides
