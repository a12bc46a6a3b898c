"""`analyze` end to end on real dask: a local cluster, and a `dask scheduler` + `dask worker` pair on
loopback; resuming after SIGKILL, --force, custom estimators, failing tasks and a truncated checkpoint.

Every run is a subprocess (`python -m analyze.cli`), with tests/ on PYTHONPATH so that workers import
the test estimators in tests/analyze_plugins.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import analyze
from helpers import ENV, stop

ESTIMATORS = "evaluate,weights,analyze_plugins:Norms"
TRUNK = "ffnn-1x8-trunk"


def analyze_cli(*args, check_code: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "analyze.cli", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    if check_code is not None:
        assert proc.returncode == check_code, proc.stderr[-3000:]
    return proc


def sorted_table(out: Path, table: str) -> pd.DataFrame:
    frame = pd.read_parquet(out / table)
    return frame.sort_values(list(frame.columns[:9]), ignore_index=True)


def part_stats(out: Path, tables=("evaluate", "weights", "norms", "sleepy")) -> dict[str, tuple[int, int]]:
    return {f"{t}/{p.name}": (p.stat().st_ino, p.stat().st_mtime_ns)
            for t in tables if (out / t).is_dir() for p in (out / t).glob("part-*.parquet")}


@pytest.fixture(scope="module")
def copies(tiny_ckpts_master, tmp_path_factory):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_ckpts_master, tmp_path_factory.mktemp(name) / "ckpts"))
    return copy


@pytest.fixture(scope="module")
def local_result(copies) -> Path:
    """The default local cluster's output (2 worker processes), computed once for this module."""
    ckpts = copies("local")
    proc = analyze_cli(ckpts, "--estimators", ESTIMATORS, "--workers", 2)
    assert "15 task(s) to compute, 0 already complete" in proc.stderr
    assert "distributed." not in proc.stderr  # dask's logs are kept quiet
    return ckpts / "analysis"


def test_existing_cluster_gives_the_local_clusters_rows(dask_cluster, local_result, copies):
    address = dask_cluster.address
    ckpts = copies("remote")
    proc = analyze_cli(ckpts, "--scheduler", address, "--estimators", ESTIMATORS)
    out = ckpts / "analysis"
    assert "tables in" in proc.stdout and "ffnn-1x8-trunk" in proc.stdout
    for table in ("evaluate", "weights", "norms"):
        remote, local = sorted_table(out, table), sorted_table(local_result, table)
        assert len(remote) > 0
        pd.testing.assert_frame_equal(remote, local, check_exact=True)
    markers = [json.loads(p.read_text()) for p in (out / "_tasks").glob("*.json")]
    assert len(markers) == 15 and {m["worker"] for m in markers} <= set(dask_cluster.pids)  # the cluster's workers did the work


def test_force_recomputes_every_task_with_the_same_rows(dask_cluster, local_result, tmp_path):
    # On the already running cluster: its workers are warm, and --force does not depend on where tasks run.
    ckpts = tmp_path / "ckpts"
    shutil.copytree(local_result.parent, ckpts, copy_function=shutil.copy2)
    out = ckpts / "analysis"
    before_rows = {t: sorted_table(out, t) for t in ("evaluate", "weights", "norms")}
    before = part_stats(out)  # (a rerun without --force rewrites nothing: tests/test_analyze_core.py)
    proc = analyze_cli(ckpts, "--estimators", ESTIMATORS, "--scheduler", dask_cluster.address, "--force")
    assert "15 task(s) to compute" in proc.stderr
    after = part_stats(out)
    assert after.keys() == before.keys() and all(after[k][1] != before[k][1] for k in before)
    for table, rows in before_rows.items():
        pd.testing.assert_frame_equal(sorted_table(out, table), rows)


def test_a_killed_run_resumes_without_recomputing_or_duplicating(dask_cluster, copies):
    ckpts = copies("resume")
    out = ckpts / "analysis"
    args = [sys.executable, "-m", "analyze.cli", str(ckpts), "--estimators", "weights,analyze_plugins:Sleepy",
            "--sleepy-seconds", "0.7", "--workers", "1"]
    proc = subprocess.Popen(args, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "_tasks").glob("*.json")) if (out / "_tasks").is_dir() else []) < 3:
            assert proc.poll() is None, "analyze finished before it could be killed"
            assert time.monotonic() < deadline, "no task finished in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the client only: its worker processes must not outlive it
        proc.wait(10)
        deadline = time.monotonic() + 30
        while True:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "worker processes outlived the killed analyze"
            time.sleep(0.1)
    finally:
        stop(proc)
    finished = {p.stem for p in (out / "_tasks").glob("*.json")}
    assert 3 <= len(finished) < 10
    kept = {k: v for k, v in part_stats(out).items() if k.split("part-")[1][:-len(".parquet")] in finished}
    assert len(kept) == len(finished)  # every finished task has its part

    # restarted later, here on the running cluster (the state that matters is in the output folder)
    proc = analyze_cli(ckpts, "--estimators", "weights,analyze_plugins:Sleepy", "--sleepy-seconds", "0.7",
                       "--scheduler", dask_cluster.address)
    assert f"{10 - len(finished)} task(s) to compute, {len(finished)} already complete" in proc.stderr
    markers = list((out / "_tasks").glob("*.json"))
    assert len(markers) == 10
    stats = part_stats(out)
    assert len(stats) == 10  # exactly one part per task
    assert all(stats[k] == v for k, v in kept.items())  # finished parts untouched (same inode and mtime)
    sleepy, weights = pd.read_parquet(out / "sleepy"), pd.read_parquet(out / "weights")
    assert len(sleepy) == 5 and not sleepy.duplicated(["run", "epoch", "step"]).any()
    assert len(weights) == 10 and not weights.duplicated(["run", "epoch", "step", "layer"]).any()


def test_failures_are_rows_in_errors_and_the_rest_is_analysed(dask_cluster, copies):
    ckpts = copies("failures")
    out = ckpts / "analysis"
    broken = ckpts / TRUNK / "epoch-0002.safetensors"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) - 100])  # truncated
    proc = analyze_cli(ckpts, "--estimators", "weights,analyze_plugins:FailOnEpoch", "--scheduler", dask_cluster.address,
                       check_code=1)
    assert f"analyze: 3 task(s) failed; see {out / 'errors'}" in proc.stderr
    assert "1/3" in proc.stdout  # the trunk: one of its three checkpoints analysed by every estimator
    errors = analyze.load(out)["errors"].sort_values(["epoch", "estimator"], ignore_index=True)
    assert errors[["run", "epoch", "estimator", "error"]].values.tolist() == [
        [TRUNK, 1, "failing", "RuntimeError"], [TRUNK, 2, "failing", "CheckpointError"],
        [TRUNK, 2, "weights", "CheckpointError"]]
    assert errors["message"][0] == "boom at epoch 1"
    assert all(m.startswith(f"{broken.resolve()}: ") and "truncated or corrupt" in m for m in errors["message"][1:])
    weights, failing = analyze.load(out)["weights"], analyze.load(out)["failing"]
    assert sorted(set(zip(weights["run"], weights["epoch"]))) == [
        ("ffnn-1x8-swap-ngd", 3), ("ffnn-1x8-swap-sgd", 3), (TRUNK, 0), (TRUNK, 1)]
    assert sorted(zip(failing["run"], failing["epoch"])) == [
        ("ffnn-1x8-swap-ngd", 3), ("ffnn-1x8-swap-sgd", 3), (TRUNK, 0)]


def test_local_workers_keep_glibcs_adaptive_malloc_and_one_thread(monkeypatch):
    """dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers' environment, which turns off glibc's adaptive
    mmap threshold and made every SGLD step 1.6x slower there (scripts/bench_worker.py); the local cluster's
    workers start without it (unless this process's own environment sets it: a user's choice is kept), and with
    the thread caps that keep one torch thread per worker."""
    from analyze.runner import dask_client

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with dask_client(None, 1) as client:
        (environ,) = client.run(lambda: {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_",
                                                                         "OMP_NUM_THREADS")}).values()
    assert environ == {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"}
