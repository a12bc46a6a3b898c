"""Find runs (folders with run.json) and their checkpoints; validate metadata; hash checkpoint content.

A run.json that cannot be used costs that run only: it becomes one warning line naming the file, and so
does a checkpoint whose metadata disagrees with its file name or folder (it is skipped). A
checkpoint whose bytes are corrupt is still catalogued (hashed as it is): its tasks then fail on the
worker with an error row naming the file, like any other failure, and the rest is analysed.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from analyze.store import file_hash
from common.checks import is_int
from common.files import read_text
from trainer.checkpoints import (CheckpointError, check_name, list_checkpoints, name_mismatch,
                                 read_header_metadata)

RUN_KEYS = ("run", "family", "role", "experiment_type", "optimizer", "model_spec", "dataset_spec", "parent", "status")


@dataclass
class CheckpointInfo:
    """One checkpoint as the catalog finds it (the task and the estimator's Context carry it)."""
    run: str
    optimizer: str
    epoch: int
    step: int
    path: Path
    hash: str  # content hash of the checkpoint file
    meta: dict  # parsed metadata: model_spec, dataset_spec, losses, ...



class EpochSpecError(ValueError):
    pass


@dataclass(frozen=True)
class EpochSpec:
    """Which epochs to analyse: `0,5,10-20`, `10-20:2` (every 2nd), `30-` (30 to the end), `last`, `all`.

    A mid-epoch (step) checkpoint belongs to the epoch it was taken in.
    """

    ranges: tuple[tuple[int, int | None, int], ...] = ()  # (first, last or None for open, stride)
    last: bool = False
    text: str = "all"

    @classmethod
    def parse(cls, text: str | None) -> EpochSpec:
        if text is None or text.strip() in ("", "all"):
            return cls(ranges=((0, None, 1),))
        ranges, last = [], False
        for item in (t.strip() for t in text.split(",")):
            if item == "last":
                last = True
                continue
            m = re.fullmatch(r"(\d+)(?:(-)(\d*))?(?::(\d+))?", item)
            if not m or (m.group(4) is not None and (not m.group(2) or int(m.group(4)) == 0)):
                raise EpochSpecError(f"--epochs: {item!r} is not an epoch, a range like 10-20 or 10-20:2, or 'last'")
            first = int(m.group(1))
            stop = first if not m.group(2) else (int(m.group(3)) if m.group(3) else None)
            if stop is not None and stop < first:
                raise EpochSpecError(f"--epochs: range {item!r} ends before it starts")
            ranges.append((first, stop, int(m.group(4) or 1)))
        return cls(ranges=tuple(ranges), last=last, text=text)

    def select(self, epochs: Iterable[int]) -> set[int]:
        available = sorted(set(epochs))
        chosen = {available[-1]} if self.last and available else set()
        for first, stop, stride in self.ranges:
            chosen |= {e for e in available if e >= first and (stop is None or e <= stop) and (e - first) % stride == 0}
        return chosen


@dataclass
class Run:
    name: str
    path: Path
    record: dict[str, Any]
    checkpoints: list[CheckpointInfo] = field(default_factory=list)

    SUMMARY_DTYPES = {"run": str, "family": str, "role": str, "optimizer": str, "experiment_type": str,
                      "parent_run": str, "parent_epoch": "Int64", "status": str, "first_epoch": "Int64",
                      "last_epoch": "Int64", "lr": "float64", "seed": "Int64", "model_spec": str, "dataset_spec": str,
                      "path": str}

    @property
    def optimizer(self) -> str:
        return self.record["optimizer"]["name"]

    @property
    def parent(self) -> tuple[str, int] | None:
        """(parent run, cut-off epoch) of a swap branch, whose first checkpoint continues the parent's."""
        p = self.record.get("parent")
        return (p["run"], int(p["epoch"])) if p else None

    def summary(self) -> dict[str, Any]:
        """The row of runs.parquet."""
        r, parent = self.record, self.parent
        epochs = r.get("epochs") or {}
        return {"run": self.name, "family": str(r["family"]), "role": str(r["role"]), "optimizer": self.optimizer,
                "experiment_type": str(r["experiment_type"]), "parent_run": parent[0] if parent else None,
                "parent_epoch": parent[1] if parent else None, "status": str(r["status"]),
                "first_epoch": epochs.get("first"), "last_epoch": epochs.get("last"),
                "lr": r["optimizer"].get("lr"), "seed": r.get("seed"),
                "model_spec": json.dumps(r["model_spec"], sort_keys=True),
                "dataset_spec": json.dumps(r["dataset_spec"], sort_keys=True), "path": str(self.path)}


@dataclass
class Catalog:
    root: Path
    runs: list[Run]  # every valid run found (also those --runs leaves out: runs.parquet lists them all)
    selected: list[Run]  # the runs --runs selects, with their selected checkpoints
    warnings: list[str]

    @property
    def checkpoints(self) -> list[CheckpointInfo]:
        return [c for run in self.selected for c in run.checkpoints]


class RunError(ValueError):
    pass


def read_run(run_dir: Path) -> Run:
    """Parse and validate run.json; RunError with a one-line reason naming the file.

    run.json is untrusted input: every value the catalog and runs.parquet use is type-checked, and the
    run's name must be its folder's name and a plain folder name (no separators, no `..`).
    """
    path = run_dir / "run.json"
    try:
        record = json.loads(read_text(path))  # a regular file of bounded size only
    except OSError as e:
        raise RunError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too deep
        raise RunError(f"{path}: not valid JSON ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    if not isinstance(record, dict):
        raise RunError(f"{path}: not a JSON object")
    missing = [k for k in RUN_KEYS if k not in record]
    if missing:
        raise RunError(f"{path}: lacks key(s) {', '.join(missing)} (not written by train-ckpts?)")
    name = record["run"]
    try:
        check_name(name)
    except ValueError as e:
        raise RunError(f"{path}: 'run': {e}") from None
    if name != run_dir.name:
        raise RunError(f"{path}: names run {name!r} but lives in folder {run_dir.name!r}")
    bad = [k for k in ("family", "role", "experiment_type", "status") if not isinstance(record[k], str)]
    if bad:
        raise RunError(f"{path}: {', '.join(repr(k) for k in bad)} must be text")
    opt = record["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("name"), str):
        raise RunError(f"{path}: 'optimizer' must be an object with a 'name'")
    lr = opt.get("lr")
    if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool)):
        raise RunError(f"{path}: 'optimizer.lr' must be a number")
    for key in ("model_spec", "dataset_spec"):
        if not isinstance(record[key], dict):
            raise RunError(f"{path}: {key!r} must be an object")
    parent = record["parent"]
    if parent is not None:
        if not (isinstance(parent, dict) and isinstance(parent.get("run"), str) and is_int(parent.get("epoch"))
                and parent["epoch"] >= 0):
            raise RunError(f"{path}: 'parent' must be null or an object with 'run' and 'epoch'")
        try:
            check_name(parent["run"], "parent run name")
        except ValueError as e:
            raise RunError(f"{path}: 'parent': {e}") from None
    epochs = record.get("epochs")
    if epochs is not None and not (isinstance(epochs, dict) and all(
            epochs.get(k) is None or is_int(epochs.get(k)) for k in ("first", "last"))):
        raise RunError(f"{path}: 'epochs' must be an object with integer 'first' and 'last'")
    if record.get("seed") is not None and not is_int(record["seed"]):
        raise RunError(f"{path}: 'seed' must be an integer")
    return Run(name, run_dir.resolve(), record)


def find_runs(root: Path) -> tuple[list[Run], list[str]]:
    """Valid runs under `root` (its sub-folders with run.json, or `root` itself), and warning lines."""
    # exists(), not is_file(): a run.json that is a FIFO or a link to a device is reported (read_run), not ignored
    subfolders = [] if (root / "run.json").exists() else sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    folders = [root] if (root / "run.json").exists() else [p for p in subfolders if (p / "run.json").exists()]
    runs, warnings = [], []
    for folder in subfolders:  # checkpoints without the run record that says what they are: say so, skip them
        if not (folder / "run.json").exists() and next(folder.glob("epoch-*.safetensors"), None) is not None:
            warnings.append(f"{folder}: checkpoints but no run.json; folder skipped")
    for folder in folders:
        try:
            runs.append(read_run(folder))
        except RunError as e:
            warnings.append(f"{e}; run skipped")
    names = {r.name for r in runs}
    for run in runs:
        if run.parent and run.parent[0] not in names:
            warnings.append(f"{run.path / 'run.json'}: parent run {run.parent[0]!r} not found in {root}")
    return runs, warnings


class NameMismatch(ValueError):
    """A checkpoint whose metadata names another run, epoch, step or kind than its path: it is skipped with a
    warning, since its rows would duplicate (or be filed as) another checkpoint's."""


def checkpoint_info(run: Run, epoch: int, step: int | None, path: Path) -> CheckpointInfo:
    """Hash a checkpoint and read its metadata header; a corrupt file keeps empty metadata.

    OSError if the file cannot be read at all (then there is no content to key a task by); NameMismatch if
    its metadata disagrees with its file name or folder.
    """
    meta: dict[str, Any] = {}
    try:
        meta = read_header_metadata(path)
    except CheckpointError:
        pass  # the task's load_model reports exactly what is wrong, naming the file
    else:
        mismatch = name_mismatch(path, meta, run.name)
        if mismatch:
            raise NameMismatch(f"{path}: file name and metadata disagree: {mismatch}")
    # the name is the identity (it agrees with the metadata when that is readable)
    return CheckpointInfo(run=run.name, optimizer=run.optimizer, epoch=epoch,
                          step=int(meta.get("step", -1 if step is None else step)), path=path.resolve(),
                          hash=file_hash(path), meta=meta)


def build_catalog(root: str | Path, runs: str | None = None, epochs: EpochSpec | None = None) -> Catalog:
    """Find runs, select them by comma-separated globs and their checkpoints by epoch, hash the selection."""
    root = Path(root)
    found, warnings = find_runs(root)
    patterns = [p.strip() for p in (runs or "*").split(",") if p.strip()]
    selected = [r for r in found if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]
    epochs = epochs or EpochSpec.parse(None)
    for run in selected:
        listed = list_checkpoints(run.path)
        keep = epochs.select(e for e, _, _ in listed)
        run.checkpoints = []
        for e, s, p in listed:
            if e not in keep:
                continue
            try:
                run.checkpoints.append(checkpoint_info(run, e, s, p))
            except OSError as err:  # vanished or unreadable since the listing: nothing to hash
                warnings.append(f"{p}: cannot read ({err.strerror or err}); checkpoint skipped")
            except NameMismatch as err:
                warnings.append(f"{err}; checkpoint skipped")
    return Catalog(root, found, selected, warnings)


def training_log(runs: Iterable[Run], warnings: list[str] | None = None):
    """Every run's epochs.parquet, concatenated with a leading `run` column (None if there is none).

    An unreadable log costs that run's log only: a line in `warnings` (when given) naming the file.
    """
    import pandas as pd

    frames = []
    for run in runs:
        path = run.path / "epochs.parquet"
        if path.is_file():
            try:
                frame = pd.read_parquet(path)
            except Exception as e:  # pyarrow's ArrowInvalid, OSError, ...
                if warnings is not None:
                    warnings.append(f"{path}: cannot read ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:200] if str(e) else ''}); training log skipped")
                continue
            frame.insert(0, "run", pd.Series([run.name] * len(frame), dtype=str))
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else None


def runs_frame(runs: Iterable[Run]):
    """One row per run (runs/runs.parquet): roles, optimizers, and where each branch starts."""
    import pandas as pd

    frame = pd.DataFrame([r.summary() for r in runs], columns=list(Run.SUMMARY_DTYPES))
    return frame.astype(Run.SUMMARY_DTYPES)
