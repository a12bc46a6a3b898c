"""One task on a worker: rebuild model and data from the checkpoint, run the estimator, write its parts.

Everything here is a plain module-level function of small picklable arguments (paths, the estimator
as a "module:Class" string and its options), so dask ships tasks, not objects, and the client only
receives a small status dict.
"""

from __future__ import annotations

import functools
import json
import socket
import time
import traceback
from datetime import datetime, timezone
from typing import Any

from analyze.catalog import CheckpointInfo
from analyze.task import Task, error_message, record_error
from common.checks import is_foreign_panic


@functools.lru_cache(maxsize=2)
def cached_splits(spec_json: str, data_root: str | None, device: str, max_bytes: int):
    """The dataset a spec describes, loaded once per worker process (and per device)."""
    import torch

    from trainer.data import Split, load_dataset

    splits = load_dataset(json.loads(spec_json), root=data_root, max_bytes=max_bytes)
    if torch.device(device).type != "cpu":
        for name in ("train", "val", "test"):
            s = getattr(splits, name)
            setattr(splits, name, Split(s.x.to(device), s.y.to(device)))
    return splits


class TaskError(RuntimeError):
    pass


def compute(task: Task) -> dict:
    """Run the task's estimator on its checkpoint; returns {table: DataFrame} (validated)."""
    import pandas as pd
    import torch

    from analyze.estimators import load_class
    from analyze.estimators.base import Context
    from analyze.store import KEY_COLUMNS, config_hash, file_hash
    from common.budget import OverBudget
    from trainer.checkpoints import CheckpointError, load_model
    from trainer.losses import nll_loss

    cls = load_class(task.ref)
    estimator = cls(**task.options)
    if config_hash(estimator.config()) != task.config_hash:
        raise TaskError(f"estimator {task.estimator!r} has a different config on this worker than on the client "
                        "(different code versions?)")
    path = task.checkpoint.path
    if file_hash(path) != task.checkpoint.hash:
        raise TaskError(f"{path}: changed since analyze started; run analyze again")
    model, ckpt = load_model(path, task.device, task.max_memory)
    ctx = Context(model=model, checkpoint=CheckpointInfo(**{**vars(task.checkpoint), "meta": ckpt.meta}),
                  device=torch.device(task.device))
    if cls.needs_data:
        try:
            ctx.splits = cached_splits(json.dumps(ckpt.meta["dataset_spec"], sort_keys=True), task.data_root,
                                       task.device, task.max_memory)
        except OverBudget as e:  # the checkpoint's dataset spec asks for it: name the file
            raise CheckpointError(path, f"dataset spec: {e}") from None
        ctx.loss_fn = nll_loss(ctx.splits.task, ctx.splits.noise_sigma)
        ctx.per_sample_loss = nll_loss(ctx.splits.task, ctx.splits.noise_sigma, reduction="none")
    result = estimator.run(ctx)
    if not isinstance(result, dict):
        raise TaskError(f"estimator {task.estimator!r} returned {type(result).__name__}, not a dict of DataFrames")
    for table, frame in result.items():
        if table not in cls.tables:
            raise TaskError(f"estimator {task.estimator!r} returned table {table!r} not declared in its `tables`")
        if not isinstance(frame, pd.DataFrame):
            raise TaskError(f"estimator {task.estimator!r}: table {table!r} is a {type(frame).__name__}, not a DataFrame")
        reserved = sorted(set(frame.columns) & set(KEY_COLUMNS))
        if reserved:
            raise TaskError(f"estimator {task.estimator!r}: table {table!r} has key column(s) {', '.join(reserved)}; "
                            "the runner adds those")
    return result


def run_task(task: Task) -> dict[str, Any]:
    """Compute one task and write its parts, then its marker; never raises for the estimator's errors.

    Any failure, an estimator's exception, a corrupt checkpoint or a full disk while writing a part,
    becomes an error row (if that can still be written) and a failed status, and the task's parts are
    removed, so a failed task leaves no rows behind and stays incomplete.
    """
    import torch

    from analyze.store import Store

    torch.set_num_threads(1)  # one torch thread per worker process; parallelism comes from dask
    store = Store(task.out)
    start = time.perf_counter()
    status = {"key": task.key, "run": task.checkpoint.run, "epoch": task.checkpoint.epoch,
              "step": task.checkpoint.step, "estimator": task.estimator, "ok": False}
    c = task.checkpoint
    try:
        store.reopen(task.key)
        rows = store.write_parts(task.key, task.keys(), compute(task))
        seconds = time.perf_counter() - start
        store.finish(task.key, {
            "key": task.key, "run": c.run, "optimizer": c.optimizer, "epoch": c.epoch, "step": c.step,
            "checkpoint": str(c.path), "ckpt_hash": c.hash, "estimator": task.estimator, "ref": task.ref,
            "options": task.options, "config_hash": task.config_hash, "tables": rows, "seconds": seconds,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": socket.gethostname(),
            "worker": dask_worker_address()})
    except BaseException as e:
        if not isinstance(e, Exception) and not is_foreign_panic(e):
            raise  # KeyboardInterrupt, SystemExit: not the task's failure
        message = error_message(e)
        try:
            store.reopen(task.key)
            store.write_parts(task.key, task.keys(), {})  # drop parts a half-finished attempt may have written
        except Exception:
            pass
        if not record_error(store, task, e, traceback.format_exc()):
            message += " (the error row could not be written either)"
        return {**status, "error": type(e).__name__, "message": message}
    return {**status, "ok": True, "rows": rows, "seconds": seconds}


def dask_worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):  # not running inside a dask worker (--workers 0)
        return None
