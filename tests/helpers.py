"""Helpers the test modules share (fixtures live in conftest.py): the subprocess environment, and
starting and stopping processes such as a dask cluster on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

TESTS = Path(__file__).resolve().parent
# subprocesses (analyze, dask workers) import the test estimators in tests/analyze_plugins.py
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
DASK = Path(sys.executable).parent / "dask"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Terminate a process we started in its own session, and everything it spawned."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


@dataclass
class DaskCluster:
    address: str
    pids: dict[str, int]  # worker address -> its process id
    workers: list[subprocess.Popen]  # worker "a", then "b"
    started: Path  # analyze_plugins.SlowNorms drops a file here as each task starts
    scheduler: subprocess.Popen | None = None


@contextmanager
def running_dask_cluster(folder: Path) -> Iterator[DaskCluster]:
    """A `dask scheduler` and two single-threaded `dask worker --no-nanny` processes (named a and b) on
    loopback; no nanny, so a killed worker stays dead. Logs and the `started` folder go in `folder`."""
    from distributed import Client

    started = folder / "started"
    started.mkdir()
    env = {**ENV, "ANALYZE_TEST_STARTED": str(started)}
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = []
    try:
        procs.append(subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                      env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                      stderr=open(folder / "scheduler.log", "w")))
        for name in ("a", "b"):
            procs.append(subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                           "--name", name], env=env, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=open(folder / f"worker-{name}.log", "w")))
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=90)
            pids = client.run(os.getpid)
        yield DaskCluster(address, pids, procs[1:], started, procs[0])
    finally:
        for proc in reversed(procs):
            stop(proc)


def temp_files(folder: Path) -> list[Path]:
    from common.atomic import TMP_PREFIX

    return [p for p in Path(folder).rglob(f"{TMP_PREFIX}*")]


def rewrite_checkpoint(path: Path, tensors=None, **meta_overrides) -> Path:
    """Write a checkpoint with the same metadata as `path` but other tensors or metadata values."""
    from trainer.checkpoints import read_checkpoint, save_checkpoint

    src = read_checkpoint(path)
    m = {**src.meta, **meta_overrides}
    return save_checkpoint(path, src.tensors if tensors is None else tensors, run=m["run"], epoch=m["epoch"],
                           step=m["step"], optimizer=m["optimizer"], model_spec=m["model_spec"],
                           dataset_spec=m["dataset_spec"], kind=m.get("kind", "epoch"))


# `python -m analyze.cli`, with SIGINT's handler restored first, as a terminal's shell starts a command: a test
# runner started in the background (`cmd &` without job control) passes SIGINT on ignored, and Python then keeps
# ignoring it, so the Ctrl-C tests would see the run finish instead of being interrupted.
AS_FROM_A_TERMINAL = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                      "runpy.run_module('analyze.cli', run_name='__main__', alter_sys=True)")


def analyze_proc(*args, env=None, **kw) -> subprocess.Popen:
    """`python -m analyze.cli ARGS` in its own session (stop() ends it and its workers), output piped."""
    return subprocess.Popen([PY, "-c", AS_FROM_A_TERMINAL, *map(str, args)], env=env or ENV, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def markers(out: Path) -> set[str]:
    """The keys of the tasks complete in an analysis folder."""
    folder = out / "_tasks"
    return {p.stem for p in folder.glob("*.json")} if folder.is_dir() else set()


def parts(out: Path, table: str) -> list[Path]:
    """A table's part files in an analysis folder."""
    return sorted((out / table).glob("part-*.parquet")) if (out / table).is_dir() else []


class PeakMemory:
    """`with PeakMemory() as peak: ...; peak.grown` = bytes the peak RSS rose above the RSS at entry, in this
    process. The kernel's high-water mark is reset at entry (/proc/self/clear_refs): ru_maxrss cannot be reset,
    and after an earlier, larger peak (another test, or the forking parent's, kept across exec) it would hide
    any growth."""

    @staticmethod
    def _status_kb(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(key)).split()[1])

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        self.start = self._status_kb("VmRSS:")
        self.grown = 0
        return self

    def __exit__(self, *exc):
        self.grown = (self._status_kb("VmHWM:") - self.start) * 1024
        return False


def flat_loss(ctx, samples: int, seed: int = 0):
    """The mean loss on the estimator's samples as a float64 function of the flat parameter vector, and that vector
    at the checkpoint (an analyze Context's model and loss)."""
    import copy
    import math

    import torch

    from analyze.curvature.samples import training_subset

    x, y = training_subset(ctx, samples, seed)
    model = copy.deepcopy(ctx.model).double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    x = x.double()
    y = y.double() if y.is_floating_point() else y

    def loss(flat):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[i:i + math.prod(shape)].reshape(shape)
            i += math.prod(shape)
        return ctx.loss_fn(torch.func.functional_call(model, params, (x,)), y)

    return loss, theta


def reference_hessian(ctx, samples: int, seed: int = 0):
    """Dense float64 Hessian of the mean loss on the estimator's samples, by torch.func.hessian."""
    import torch

    loss, theta = flat_loss(ctx, samples, seed)
    return torch.func.hessian(loss)(theta)


def reference_gradient(ctx, samples: int, seed: int = 0):
    """float64 gradient of the same loss, by torch.func.grad."""
    import torch

    loss, theta = flat_loss(ctx, samples, seed)
    return torch.func.grad(loss)(theta)
