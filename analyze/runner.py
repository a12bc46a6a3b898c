"""Plan tasks (checkpoint x estimator config) and run the missing ones on dask, with a progress bar.

Default: a `distributed.LocalCluster` of single-threaded worker processes on this machine; with a
scheduler address, the same tasks run on an existing dask.distributed cluster (checkpoints and the
output folder must then be on storage every worker reads). workers=0 runs the tasks in this process,
without dask (for debugging an estimator).

Faults: a task's own failure comes back as a failed status (the worker wrote its error row). A worker
process that dies mid-task is dask's business: the scheduler reschedules the task on another worker,
and the retry rewrites the task's parts from scratch; only when dask gives up (the task's workers died
more than `distributed.scheduler.allowed-failures` times: KilledWorker) does the client write the
error row.
"""

from __future__ import annotations

import logging
import warnings
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable

from analyze.catalog import Catalog
from analyze.store import Store, config_hash, task_key
from analyze.task import Task, record_error
from analyze.worker import run_task


@dataclass
class Plan:
    todo: list[Task]  # to compute now
    done: list[Task]  # complete from an earlier run (skipped)


def plan_tasks(catalog: Catalog, estimators: Iterable[tuple[str, Any]], store: Store, *, force: bool = False,
               device: str = "cpu", data_root: str | None = None) -> Plan:
    """One task per (checkpoint, estimator config); `estimators` holds (module:Class, instance) pairs."""
    complete = set() if force else store.completed()
    plan = Plan([], [])
    estimators = list(estimators)
    for ckpt in catalog.checkpoints:
        for ref, est in estimators:
            config = est.config()
            task = Task(key=task_key(ckpt.hash, est.name, config), estimator=est.name, ref=ref, options=dict(est.opts),
                        config_hash=config_hash(config), checkpoint=ckpt, out=str(store.root.resolve()),
                        device=device, data_root=data_root)
            (plan.done if task.key in complete else plan.todo).append(task)
    return plan


def quiet_dask_logs() -> None:
    """Keep dask's INFO chatter (and shutdown warnings) out of the user's terminal."""
    for name in ("distributed", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(logging.ERROR)


def execute(tasks: list[Task], *, scheduler: str | None = None, workers: int = 1, progress: bool = True) -> list[dict]:
    """Run the tasks; returns one status dict per task (`ok`, and `error`/`message` on failure)."""
    if not tasks:
        return []
    if scheduler is None and workers == 0:
        with progress_bar(len(tasks), progress) as bar:
            return [_tick(bar, run_task(t)) for t in tasks]
    # the bar closes (showing the work's time) before the cluster's shutdown
    with dask_client(scheduler, min(workers, len(tasks))) as client, progress_bar(len(tasks), progress) as bar:
        return _run_on_dask(client, tasks, bar)


def progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="analyze", unit="task", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


@contextmanager
def dask_client(scheduler: str | None, workers: int):
    """A client of the cluster at `scheduler`, or of a local cluster of single-threaded worker processes."""
    from distributed import Client, LocalCluster

    quiet_dask_logs()
    if scheduler:
        client = Client(scheduler, timeout="20s")
        if not client.scheduler_info().get("workers"):
            print(f"analyze: waiting for workers to join {scheduler}", file=sys.stderr)
        try:
            yield client
        finally:
            client.close()
        return
    # With the dashboard off the scheduler still serves /health on 8787, or on a free port when another
    # cluster holds it; the fallback is harmless, so its warning is noise.
    warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)
    with LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client


def _run_on_dask(client, tasks: list[Task], bar) -> list[dict]:
    from distributed import as_completed

    futures = client.map(run_task, tasks, pure=False)  # pure=False: never dedupe or reuse results
    pending = dict(zip(futures, tasks))
    statuses = []
    try:
        for future in as_completed(futures):
            task = pending.pop(future)
            try:
                status = future.result()
            except Exception as e:  # dask gave up on the task (its workers died), or could not ship it
                message = client_side_message(e)
                if not record_error(Store(task.out), task, e, message=message):
                    message += " (the error row could not be written either)"
                status = {"key": task.key, "run": task.checkpoint.run, "epoch": task.checkpoint.epoch,
                          "step": task.checkpoint.step, "estimator": task.estimator, "ok": False,
                          "error": type(e).__name__, "message": message}
            statuses.append(_tick(bar, status))
            future.release()
    except BaseException:  # Ctrl-C: stop the cluster's work; finished tasks are kept
        client.cancel(list(pending))
        raise
    return statuses


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
