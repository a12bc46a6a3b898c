"""Reliability under interruption: SIGKILLed train-ckpts and analyze resume to the uninterrupted result;
a killed dask worker's tasks are retried; concurrent analyze runs do not collide. Real processes, real
dask. (Files and names: test_reliability_files.py.)"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

import analyze
from analyze.catalog import build_catalog
from analyze.cli import main as analyze_main
from analyze.store import Store
from common.atomic import TMP_PREFIX, folder_lock
from helpers import ENV, analyze_proc, markers, parts, stop, temp_files
from trainer.checkpoints import list_checkpoints, load_model, read_resume_state
from trainer.cli import main as train_main

TRUNK = "ffnn-1x8-trunk"
PY = sys.executable


# ====================================================================== interruption: train-ckpts
TRAIN = dict(experiment_type="swap", optimizer="both", hidden_nodes=[16], hidden_layers=[1], cut_off_epochs=3,
             num_epochs=10, batch_size=16, sgd_lr=0.05, ngd_lr=0.05, seed=11)


def train_argv(out: Path, settings: dict) -> list[str]:
    argv = [PY, "-m", "trainer.cli", "--dataset", "digits", "--model-type", "ffnn", "--out", str(out), "--quiet"]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return argv


def check_run_folders(out: Path) -> dict[str, int]:
    """What a reader may rely on at any moment: every checkpoint loads, every log and run.json reads;
    temporary files are never listed as checkpoints. Returns checkpoints per run."""
    counts = {}
    for run_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        listed = list_checkpoints(run_dir)
        for _, _, path in listed:
            assert not path.name.startswith(TMP_PREFIX)
            load_model(path)
        if (run_dir / "resume.safetensors").exists():
            epoch, _, _ = read_resume_state(run_dir / "resume.safetensors")
            assert (run_dir / f"epoch-{epoch:04d}.safetensors").exists()
        for log in ("epochs.parquet", "steps.parquet"):
            if (run_dir / log).exists():
                pd.read_parquet(run_dir / log)
        if (run_dir / "run.json").exists():
            json.loads((run_dir / "run.json").read_text())
        for p in run_dir.iterdir():
            assert p.name.startswith(TMP_PREFIX) or p.name in ("run.json", "epochs.parquet", "steps.parquet",
                                                                "resume.safetensors") or p.name.endswith(".safetensors")
        counts[run_dir.name] = len(listed)
    return counts


def test_train_ckpts_killed_at_random_moments_resumes_to_the_uninterrupted_bytes(tmp_path, make_ckpts):
    env = {**ENV, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    rng = random.Random(20240611)
    delivered, progress = 0, []
    for attempt in range(3):  # three kills, each a random moment after the process wrote a new checkpoint
        argv = train_argv(out, TRAIN) + (["--resume"] if attempt else [])
        seen = set(out.glob("*/epoch-*.safetensors")) if out.exists() else set()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            # once this process has written a new checkpoint (it is training), kill it a random moment later
            while proc.poll() is None and not set(out.glob("*/epoch-*.safetensors")) - seen:
                assert time.monotonic() < deadline, "no checkpoint written in time"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                delivered += 1
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read()[-2000:]
        progress.append(check_run_folders(out))
        if attempt == 0:  # a write killed half-way leaves a temporary file: readers must skip it
            trunk = out / "ffnn-1x16-trunk"
            (trunk / ".tmp-epoch-0099.safetensors~somehost~4242~x1").write_bytes(b"\x10\x00partial")
            assert all(not p.name.startswith(".tmp") for _, _, p in list_checkpoints(trunk))
            assert all(not c.path.name.startswith(".tmp") for c in build_catalog(out).checkpoints)
    assert delivered >= 2, progress  # (the last could find the run finished on a very fast machine)
    assert len({json.dumps(p, sort_keys=True) for p in progress}) == 3, progress  # each kill at another point

    done = subprocess.run(train_argv(out, TRAIN) + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert temp_files(out) == []  # the resume removed what killed writes left

    reference = make_ckpts(tmp_path / "reference", **TRAIN)  # uninterrupted, same seed
    runs = sorted(p.name for p in reference.iterdir() if p.is_dir())
    assert runs == sorted(p.name for p in out.iterdir() if p.is_dir())
    for run in runs:
        want = sorted(p.name for p in (reference / run).iterdir())
        assert want == sorted(p.name for p in (out / run).iterdir()), run
        for name in want:
            if name.endswith(".safetensors"):  # checkpoints and the optimizer state, byte for byte
                assert (reference / run / name).read_bytes() == (out / run / name).read_bytes(), (run, name)
        for log in ("epochs.parquet", "steps.parquet"):
            a = pd.read_parquet(reference / run / log).drop(columns=["seconds"], errors="ignore")
            b = pd.read_parquet(out / run / log).drop(columns=["seconds"], errors="ignore")
            pd.testing.assert_frame_equal(a, b, check_exact=True)
        assert json.loads((out / run / "run.json").read_text())["status"] == "complete"


def test_a_second_train_ckpts_on_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "ck"
    out.mkdir()
    with folder_lock(out, wait=False):
        code = train_main(["--experiment-type", "standard", "--optimizer", "sgd", "--num-epochs", "1",
                           "--hidden-nodes", "4", "--hidden-layers", "1", "--out", str(out), "--quiet"])
    assert code == 2
    assert "another train-ckpts" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_a_folder_without_run_json_is_not_wiped(tmp_path, capsys):
    out = tmp_path / "ck"
    keep = out / "ffnn-1x4-sgd" / "notes.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("mine")
    argv = ["--experiment-type", "standard", "--optimizer", "sgd", "--num-epochs", "1", "--hidden-nodes", "4",
            "--hidden-layers", "1", "--out", str(out), "--quiet"]
    assert train_main(argv + ["--resume"]) == 2
    assert "hold files but no run.json" in capsys.readouterr().err and keep.read_text() == "mine"


def test_leftover_temp_files_are_told_apart_from_live_writes(tmp_path):
    """A killed writer's temporary file (this host, pid gone) goes at once; a live writer's or another
    host's stays until it is an hour old; complete files are never touched."""
    import socket

    from common.atomic import remove_temp_files

    host = socket.gethostname()
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    folder = tmp_path / "evaluate"
    folder.mkdir()
    names = {"dead": f".tmp-part-a.parquet~{host}~{dead}~x", "live": f".tmp-part-b.parquet~{host}~{os.getppid()}~x",
             "remote": ".tmp-part-c.parquet~elsewhere~12345~x", "old-remote": ".tmp-part-d.parquet~elsewhere~1~x",
             "legacy": ".tmp-part-e.parquet.abc123", "part": "part-f.parquet"}
    for name in names.values():
        (folder / name).write_bytes(b"x")
    old = time.time() - 7200
    os.utime(folder / names["old-remote"], (old, old))
    assert Store(tmp_path).remove_stale_temp_files() == 2
    assert sorted(p.name for p in folder.iterdir()) == sorted(names[k] for k in ("live", "remote", "legacy", "part"))
    assert remove_temp_files([folder], everything=True) == 3  # what a lock holder does with its own folders
    assert [p.name for p in folder.iterdir()] == [names["part"]]


# ====================================================================== interruption: analyze
def test_analyze_killed_at_several_points_finishes_with_one_row_set_per_task(tiny_ckpts, tmp_path):
    out = tiny_ckpts / "analysis"
    args = [tiny_ckpts, "--estimators", "weights,analyze_plugins:Sleepy", "--sleepy-seconds", "0.25", "--workers", "0"]
    rng = random.Random(7)
    thresholds = sorted(rng.sample(range(1, 9), 3))
    kills = 0
    for threshold in thresholds:
        proc = analyze_proc(*args)
        try:
            deadline = time.monotonic() + 120
            while len(markers(out)) < threshold and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.25))  # mid-task or mid-write
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait(30)
        finally:
            stop(proc)
        done = markers(out)
        for key in done:  # a complete task has all its parts; every part reads
            record = json.loads((out / "_tasks" / f"{key}.json").read_text())
            for table in record["tables"]:
                assert (out / table / f"part-{key}.parquet").exists()
        for table in ("weights", "sleepy"):
            for part in parts(out, table):
                pd.read_parquet(part)
    assert kills == 3
    before = len(markers(out))
    proc = analyze_proc(*args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert f"{10 - before} task(s) to compute, {before} already complete" in stderr
    assert len(markers(out)) == 10 and len(parts(out, "weights")) == 5 and len(parts(out, "sleepy")) == 5
    assert temp_files(out) == []  # leftovers of the killed writers are gone
    tables = analyze.load(out)
    assert "errors" not in tables
    assert len(tables["sleepy"]) == 5 and not tables["sleepy"].duplicated(["run", "epoch", "step"]).any()
    assert not tables["weights"].duplicated(["run", "epoch", "step", "layer"]).any()
    # the same rows as an uninterrupted run
    clean = tmp_path / "clean"
    shutil.copytree(tiny_ckpts, clean, ignore=shutil.ignore_patterns("analysis"))
    assert analyze_main([str(clean), "--estimators", "weights", "--workers", "0"]) == 0
    key = ["run", "epoch", "step", "layer"]
    pd.testing.assert_frame_equal(tables["weights"].sort_values(key, ignore_index=True),
                                  analyze.load(clean / "analysis")["weights"].sort_values(key, ignore_index=True))


# ====================================================================== faults in the cluster
def test_a_killed_worker_s_tasks_are_retried_and_the_result_equals_a_fault_free_run(dask_cluster, tiny_ckpts_master,
                                                                                    tmp_path):
    address, pids, workers, started = (dask_cluster.address, dask_cluster.pids, dask_cluster.workers,
                                       dask_cluster.started)
    args = ["--scheduler", address, "--estimators", "weights,analyze_plugins:SlowNorms", "--slownorms-seconds", "0.6"]

    clean = Path(shutil.copytree(tiny_ckpts_master, tmp_path / "clean"))
    proc = analyze_proc(clean, *args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    for p in started.iterdir():
        p.unlink()

    faulty = Path(shutil.copytree(tiny_ckpts_master, tmp_path / "faulty"))
    victim = workers[0]
    victim_address = next(a for a, pid in pids.items() if pid == victim.pid)
    proc = analyze_proc(faulty, *args)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(f"{victim.pid}-") for p in started.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "worker a never started a task"
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)  # mid-task: it sleeps 0.6 s after the start file
        victim.wait(10)
        killed_task = next(p.name for p in started.iterdir() if p.name.startswith(f"{victim.pid}-"))
        _, err = proc.communicate(timeout=300)
    finally:
        stop(proc)
    assert proc.returncode == 0, err[-2000:]
    out, ref = faulty / "analysis", clean / "analysis"
    tables, reference = analyze.load(out), analyze.load(ref)
    assert "errors" not in tables  # a retried task is not an error
    for table, key in (("slownorms", ["run", "epoch", "step", "tensor"]), ("weights", ["run", "epoch", "step", "layer"])):
        assert len(parts(out, table)) == 5
        pd.testing.assert_frame_equal(tables[table].sort_values(key, ignore_index=True),
                                      reference[table].sort_values(key, ignore_index=True), check_exact=True)
    # the task that was running on the killed worker was finished by the other one
    run, epoch, step = killed_task.split("-", 1)[1].rsplit("-", 2)
    finished = [json.loads(p.read_text()) for p in (out / "_tasks").glob("*.json")]
    redone = [m for m in finished if m["estimator"] == "slownorms" and m["run"] == run and m["epoch"] == int(epoch)
              and m["step"] == int(step)]
    assert len(redone) == 1 and redone[0]["worker"] != victim_address


def test_an_error_row_only_when_dask_gives_up_on_a_task(tiny_ckpts, tmp_path):
    flags = tmp_path / "flags"
    flags.mkdir()
    env = {**ENV, "ANALYZE_TEST_FLAGS": str(flags),
           "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1",  # two deaths and dask gives up (default 3)
           "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0"}  # only the crashing task is on its worker
    proc = analyze_proc(tiny_ckpts, "--runs", TRUNK, "--estimators", "analyze_plugins:Crash", "--workers", "2",
                        env=env)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        stop(proc)
    assert proc.returncode == 1, err[-2000:]
    tables = analyze.load(tiny_ckpts / "analysis")
    errors = tables["errors"]
    # epoch 1 killed its worker every time: dask gave up -> one error row; epoch 2 killed it once -> retried
    assert errors[["run", "epoch", "estimator", "error"]].values.tolist() == [[TRUNK, 1, "crash", "KilledWorker"]]
    assert "dask gave up" in errors["message"][0] and "allowed-failures = 1" in errors["message"][0]
    assert sorted(tables["crash"]["epoch"]) == [0, 2]
    assert (flags / f"{TRUNK}-2-38").exists()  # the epoch-2 task did die once before it succeeded
    assert "1 task(s) failed" in err


# ====================================================================== concurrency
def test_two_analyze_runs_started_together_do_not_collide(tiny_ckpts, tmp_path):
    out = tiny_ckpts / "analysis"
    args = [PY, "-m", "analyze.cli", str(tiny_ckpts), "--estimators", "weights,analyze_plugins:Sleepy",
            "--sleepy-seconds", "0.2", "--workers", "0"]
    logs = [tmp_path / "first.err", tmp_path / "second.err"]
    procs = []
    try:
        # Hold the lock while both start, so that they certainly overlap; then let them race for it.
        with folder_lock(Store(out).lock_path, wait=False):
            for log in logs:
                procs.append(subprocess.Popen(args, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                                              stderr=open(log, "w")))
            deadline = time.monotonic() + 120
            while not all("waiting for another analyze" in log.read_text() for log in logs):
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                    [log.read_text()[-500:] for log in logs]
                time.sleep(0.05)
        codes = [p.wait(300) for p in procs]
    finally:
        for p in procs:
            stop(p)
    errs = [log.read_text() for log in logs]
    assert codes == [0, 0], [e[-1500:] for e in errs]
    assert sum("10 task(s) to compute, 0 already complete" in e for e in errs) == 1
    assert sum("0 task(s) to compute, 10 already complete" in e for e in errs) == 1
    assert len(markers(out)) == 10 and len(parts(out, "weights")) == 5 and len(parts(out, "sleepy")) == 5
    sleepy = analyze.load(out)["sleepy"]
    assert len(sleepy) == 5 and sleepy["pid"].nunique() == 1  # one process did all the work
    assert temp_files(out) == []
