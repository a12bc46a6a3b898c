"""Runs trained at once (`train-ckpts --jobs N`): one spawned process per run, their log lines sent back to the
caller's log."""

from __future__ import annotations

from pathlib import Path

import torch

from common import budget
from trainer.config import TrainConfig
from trainer.data import load_dataset


def train_in_processes(plans: list, cfg: TrainConfig, dataset_spec: dict, out: Path, device: torch.device,
                       log) -> dict[str, str]:
    """Train independent runs at once, one process each with an equal share of the cores. Every run's batches
    and dropout derive from (seed, epoch) alone, so the results do not depend on which process trains it. The
    children's log lines come back through a queue and go to the caller's `log`, as with one process."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    workers = min(cfg.jobs, len(plans))
    threads = max(1, torch.get_num_threads() // workers)
    # spawn, not fork: a forked child of a process that has run OpenMP (torch's intra-op threads) can hang
    context = multiprocessing.get_context("spawn")
    lines = context.Queue()  # handed over at process start (initargs): a queue cannot be pickled into a task
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_child_log_to, initargs=(lines,)) as pool:
        futures = {p.name: pool.submit(_train_one, p, cfg, dataset_spec, out / p.name, str(device), threads)
                   for p in plans}
        pending = set(futures.values())
        while pending:
            _, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _forward(lines, log)
        _forward(lines, log)
        return {name: f.result() for name, f in futures.items()}


def _forward(lines, log) -> None:
    """Pass every queued log line to `log` (the parent's), without waiting for more."""
    import queue

    while True:
        try:
            log(lines.get(timeout=0.05))
        except queue.Empty:
            return


_CHILD_LOG = None  # set in each training process: the queue its log lines go to


def _child_log_to(lines) -> None:
    global _CHILD_LOG
    _CHILD_LOG = lines


def _train_one(plan, cfg: TrainConfig, dataset_spec: dict, run_dir: Path, device: str, threads: int) -> str:
    torch.set_num_threads(threads)
    splits = load_dataset(dataset_spec, max_bytes=budget.cap_bytes(cfg.max_memory_gb))  # checked by the parent
    from trainer.experiment import RunTrainer  # here: experiment imports this module

    return RunTrainer(plan, cfg, splits, dataset_spec, run_dir, torch.device(device), _CHILD_LOG.put).train()
