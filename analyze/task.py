"""A task: one (checkpoint, estimator config), as a small picklable record the client plans and dask
ships to a worker; and its error row, written by the worker or, when dask gives up on the task
(KilledWorker), by the client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from analyze.catalog import CheckpointInfo
from common.budget import DEFAULT_BYTES


@dataclass
class Task:
    key: str
    estimator: str  # name (the errors table's `estimator`)
    ref: str  # "module:Class", imported on the worker
    options: dict[str, Any]
    config_hash: str
    checkpoint: CheckpointInfo
    out: str  # the output folder (shared storage when workers run elsewhere)
    device: str = "cpu"
    data_root: str | None = None
    max_memory: int = DEFAULT_BYTES  # bytes the checkpoint may make the loader build (common/budget.py)

    def keys(self) -> dict[str, Any]:
        c = self.checkpoint
        return {"run": c.run, "optimizer": c.optimizer, "epoch": c.epoch, "step": c.step, "ckpt_hash": c.hash,
                "config_hash": self.config_hash}


def error_message(e: BaseException) -> str:
    return str(e) or repr(e)


def record_error(store, task: Task, e: BaseException, trace: str = "", message: str | None = None) -> bool:
    """Write the task's error row; False if even that fails (say, the disk is full)."""
    try:
        store.write_error(task.key, task.keys(), estimator=task.estimator, error=type(e).__name__,
                          message=message or error_message(e), path=str(task.checkpoint.path),
                          traceback=trace[-4000:])
    except Exception:
        return False
    return True
