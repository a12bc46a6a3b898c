"""Plan tasks (checkpoint x estimator config) and run the missing ones on dask, with a progress bar.

Default: a `distributed.LocalCluster` of single-threaded worker processes on this machine; with a
scheduler address, the same tasks run on an existing dask.distributed cluster (checkpoints and the
output folder must then be on storage every worker reads). workers=0 runs the tasks in this process,
without dask (for debugging an estimator).

Faults: a task's own failure comes back as a failed status (the worker wrote its error row). A worker
process that dies mid-task is dask's business: the scheduler reschedules the task on another worker,
and the retry rewrites the task's parts from scratch; only when dask gives up (the task's workers died
more than `distributed.scheduler.allowed-failures` times: KilledWorker) does the client write the
error row. A scheduler that dies (or whose connection is lost) fails no task: the run stops with
SchedulerLost, and Ctrl-C with Interrupted, both counting the finished tasks (which are kept).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable

from analyze.catalog import Catalog
from analyze.scheduler import probe
from analyze.store import Store, config_hash, task_key
from analyze.task import Task, record_error
from analyze.worker import run_task
from common.budget import DEFAULT_BYTES


@dataclass
class Plan:
    todo: list[Task]  # to compute now
    done: list[Task]  # complete from an earlier run (skipped)


def plan_tasks(catalog: Catalog, estimators: Iterable[tuple[str, Any]], store: Store, *, force: bool = False,
               device: str = "cpu", data_root: str | None = None, max_memory: int = DEFAULT_BYTES) -> Plan:
    """One task per (checkpoint, estimator config); `estimators` holds (module:Class, instance) pairs."""
    complete = set() if force else store.completed()
    plan = Plan([], [])
    estimators = list(estimators)
    for ckpt in catalog.checkpoints:
        for ref, est in estimators:
            config = est.config()
            task = Task(key=task_key(ckpt.hash, est.name, config), estimator=est.name, ref=ref, options=dict(est.opts),
                        config_hash=config_hash(config), checkpoint=ckpt, out=str(store.root.resolve()),
                        device=device, data_root=data_root, max_memory=max_memory)
            (plan.done if task.key in complete else plan.todo).append(task)
    return plan


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during the run; `finished` of `total` tasks are done and kept."""

    def __init__(self, finished: int, total: int):
        super().__init__(f"{finished} of {total} task(s) finished")
        self.finished, self.total = finished, total


class SchedulerLost(RuntimeError):
    """The scheduler died, or the connection to it was lost: the tasks it held are not failures."""

    def __init__(self, finished: int, total: int, scheduler: str | None):
        where = f"--scheduler {scheduler}" if scheduler else "the local cluster"
        super().__init__(f"{where}: the scheduler died or the connection to it was lost mid-run (no task failed); "
                         f"{finished} of {total} task(s) finished and are kept: rerun to resume")
        self.finished, self.total = finished, total


def quiet_dask_logs(level: int = logging.ERROR) -> None:
    """Keep dask's INFO chatter (and shutdown warnings) out of the user's terminal. Child loggers too:
    dask's logging config gives some (distributed.client, ...) levels of their own."""
    prefixes = ("distributed", "tornado", "asyncio")
    children = [n for n in logging.root.manager.loggerDict if n.startswith(tuple(p + "." for p in prefixes))]
    for name in (*prefixes, *children):
        if name in prefixes or logging.getLogger(name).level != logging.NOTSET:
            logging.getLogger(name).setLevel(level)


def execute(tasks: list[Task], *, scheduler: str | None = None, workers: int = 1, progress: bool = True,
            debug: bool = False) -> list[dict]:
    """Run the tasks; returns one status dict per task (`ok`, and `error`/`message` on failure).

    Raises Interrupted on Ctrl-C and SchedulerLost when the scheduler goes away (debug: dask logs shown)."""
    if not tasks:
        return []
    if scheduler is None and workers == 0:
        with progress_bar(len(tasks), progress) as bar:
            done: list[dict] = []
            try:
                for t in tasks:
                    done.append(_tick(bar, run_task(t)))
            except KeyboardInterrupt:
                raise Interrupted(len(done), len(tasks)) from None
            return done
    # the bar closes (showing the work's time) before the cluster's shutdown
    with dask_client(scheduler, min(workers, len(tasks)), debug) as client, progress_bar(len(tasks), progress) as bar:
        return _run_on_dask(client, tasks, bar, scheduler)


def progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="analyze", unit="task", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


ENVIRON_KEY = "distributed.nanny.pre-spawn-environ"


def worker_environ() -> dict:
    """The environment dask's nanny gives each worker process, without MALLOC_TRIM_THRESHOLD_.

    dask sets it (to 64 KiB) so that workers hand freed memory back to the system. Setting it at all turns
    off glibc's adaptive mmap threshold, so every tensor above 128 KiB that a step allocates is a fresh
    mmap, page-faulted in and unmapped again: on the study's 269,322-parameter MLP an SGLD step took 1.6x
    as long (scripts/bench_worker.py measures it). Our tasks allocate the same tensors every step, so glibc's
    defaults keep them; the thread caps (OMP_NUM_THREADS=1 and the like) stay."""
    import dask

    environ = dict(dask.config.get(ENVIRON_KEY, default={}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return environ


@contextmanager
def dask_client(scheduler: str | None, workers: int, debug: bool = False):
    """A client of the cluster at `scheduler`, or of a local cluster of single-threaded worker processes."""
    import dask
    from distributed import Client, LocalCluster

    if not debug:
        quiet_dask_logs()
    if scheduler:
        probe(scheduler)  # a server that is not dask would hang Client() for ever
        client = Client(scheduler, timeout="20s")
        if not client.scheduler_info().get("workers"):
            print(f"analyze: waiting for workers to join {scheduler}", file=sys.stderr)
        try:
            with _quiet_if_cut_short(debug):
                yield client
        finally:
            client.close()
        return
    # With the dashboard off the scheduler still serves /health on 8787, or on a free port when another
    # cluster holds it; the fallback is harmless, so its warning is noise.
    warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)
    # The worker processes start with SIGINT ignored (a disposition spawned processes inherit), so Ctrl-C
    # in the terminal interrupts this process only: it stops the work, and the workers do not print a
    # traceback each. Workers a nanny restarts after a death are spawned after it was restored here: the
    # IgnoreInterrupts plugin sets it in every worker, those included.
    # The workers' own logs are silenced too (unless debugging): a task's failure is its error row, a
    # worker's death a KilledWorker row, and what they log while a cluster is closed under them (heartbeat
    # and nanny tracebacks) is noise.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with dask.config.set({ENVIRON_KEY: worker_environ()}):
            cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.DEBUG if debug else logging.CRITICAL)
    finally:
        signal.signal(signal.SIGINT, previous)
    with cluster, Client(cluster) as client, _quiet_if_cut_short(debug):
        from analyze.worker_plugins import IgnoreInterrupts

        client.register_plugin(IgnoreInterrupts())
        yield client



@contextmanager
def _quiet_if_cut_short(debug: bool):
    """The shutdown of a cluster whose work was cut short (Ctrl-C, a lost scheduler) logs errors and
    tracebacks nobody can act on: silence dask's logs before it, unless debugging."""
    try:
        yield
    except BaseException:
        if not debug:
            quiet_dask_logs(logging.CRITICAL + 1)
        raise


def _run_on_dask(client, tasks: list[Task], bar, scheduler: str | None = None) -> list[dict]:
    from distributed import as_completed

    futures = client.map(run_task, tasks, pure=False)  # pure=False: never dedupe or reuse results
    pending = dict(zip(futures, tasks))
    statuses: list[dict] = []
    try:
        for future in as_completed(futures):
            task = pending.pop(future)
            try:
                status = future.result()
            except Exception as e:  # dask gave up on the task (its workers died), or could not ship it
                if scheduler_lost(client, e):  # not the task's failure: no error row
                    raise SchedulerLost(len(statuses), len(tasks), scheduler) from None
                message = client_side_message(e)
                if not record_error(Store(task.out), task, e, message=message):
                    message += " (the error row could not be written either)"
                status = {"key": task.key, "run": task.checkpoint.run, "epoch": task.checkpoint.epoch,
                          "step": task.checkpoint.step, "estimator": task.estimator, "ok": False,
                          "error": type(e).__name__, "message": message}
            statuses.append(_tick(bar, status))
            future.release()
    except KeyboardInterrupt:  # Ctrl-C: stop the cluster's work; finished tasks are kept
        _cancel(client, list(pending))
        raise Interrupted(len(statuses), len(tasks)) from None
    except BaseException:
        _cancel(client, list(pending))
        raise
    return statuses


def scheduler_lost(client, e: BaseException, notice_within: float = 10.0) -> bool:
    """Whether a future failed because the client lost its scheduler (dask cancels every future then).

    A broken connection (CommClosedError while gathering a result) can reach a future before the client has
    noticed that the scheduler is gone: on a loaded machine a killed scheduler's last task got an error row that
    way. A task never raises it itself, so then the client gets `notice_within` seconds to notice; if the
    scheduler is still there after that, the task's row says what broke."""
    from distributed.comm import CommClosedError

    if getattr(e, "reason", None) == "scheduler-connection-lost" or client.status != "running":
        return True
    if isinstance(e, CommClosedError):
        deadline = time.monotonic() + notice_within
        while time.monotonic() < deadline:
            if client.status != "running":
                return True
            time.sleep(0.1)
    return False


def _cancel(client, futures: list) -> None:
    try:
        client.cancel(futures)
    except Exception:  # the scheduler is gone: nothing left to cancel
        pass


def client_side_message(e: BaseException) -> str:
    """The error row's message for a task that failed outside run_task."""
    from distributed import KilledWorker

    if isinstance(e, KilledWorker):
        try:
            allowed = int(e.allowed_failures)
            times = f"{allowed + 1} time(s), "
        except Exception:
            allowed, times = "?", ""
        try:
            detail = str(e)
        except Exception:
            detail = repr(e.args[:1])
        return (f"the worker process died while running this task {times}and dask gave up "
                f"(distributed.scheduler.allowed-failures = {allowed}); the estimator may need more memory "
                f"than a worker has, or crash the interpreter ({detail})")
    return str(e) or repr(e)


def _tick(bar, status: dict) -> dict:
    bar.update(1)
    if not status["ok"]:
        bar.failed = getattr(bar, "failed", 0) + 1
        bar.set_postfix(failed=bar.failed)
    return status
