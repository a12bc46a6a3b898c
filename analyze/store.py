"""The output folder: one Parquet part per (task, table), a completion marker per task, error parts.

    OUT/<table>/part-<key>.parquet   rows of one task, written atomically
    OUT/_tasks/<key>.json            completion marker, written LAST: a task is complete iff it exists
    OUT/errors/part-<key>.parquet    one row for a task that failed (removed when it later succeeds)

`pandas.read_parquet("OUT/<table>")` reads a table (pyarrow skips the `.tmp-*` files a killed write
can leave). Task keys hash the checkpoint's content, the estimator's name and its config, so a
changed checkpoint or option is a new task and an unchanged one is never recomputed.

Table names and keys become file names: both are checked here (plain names, no separators), so no
name from an estimator or a marker can lead a write out of OUT.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from common.atomic import atomic_write, atomic_write_json, atomic_write_parquet, remove_temp_files
from common.files import open_regular

KEY_COLUMNS = ("run", "optimizer", "epoch", "step", "ckpt_hash", "config_hash")
KEY_DTYPES = {"run": str, "optimizer": str, "epoch": "int64", "step": "int64", "ckpt_hash": str, "config_hash": str}
ERROR_DTYPES = {"estimator": str, "error": str, "message": str, "path": str, "traceback": str}
TASKS_DIR, ERRORS_TABLE = "_tasks", "errors"
TABLE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # estimators' table names, checked on load too
SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
LOCK_FILE = ".analyze.lock"


class UnsafeName(ValueError):
    pass


def _check_table(table: str) -> str:
    if not isinstance(table, str) or not TABLE_NAME.fullmatch(table):
        raise UnsafeName(f"table name {table!r} is not a plain name matching {TABLE_NAME.pattern}")
    return table


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not SAFE_KEY.fullmatch(key):
        raise UnsafeName(f"task key {key!r} is not a plain name matching {SAFE_KEY.pattern}")
    return key


def file_hash(path: str | Path) -> str:
    """blake2b (128-bit) of a file's bytes: the checkpoint's identity in task keys."""
    digest = hashlib.blake2b(digest_size=16)
    with open_regular(path) as f:  # a FIFO or /dev/zero would never end
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_json(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.blake2b(config_json(config).encode(), digest_size=8).hexdigest()


def task_key(ckpt_hash: str, estimator: str, config: dict[str, Any]) -> str:
    text = "\n".join((ckpt_hash, estimator, config_json(config)))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _null_typed(t) -> bool:
    import pyarrow as pa

    return pa.types.is_null(t) or ((pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_null(t.value_type))


def part_table(frame: pd.DataFrame, like: Path | None = None):
    """The Arrow table of a part, with columns that are all missing typed as in the table's other parts.

    pandas gives an all-NaN/None column (say, every chain of a diverged LLC is NaN) the Arrow type
    `null` (or list<null>); a part with such a column next to parts with `double` makes the table
    folder unreadable as one dataset. Such columns take the type of the same column in the existing
    part `like`; without one, list<null> becomes list<double> and null stays null.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    null_columns = [i for i, f in enumerate(table.schema) if _null_typed(f.type)]
    if not null_columns:
        return table
    reference = None
    if like is not None:
        try:
            reference = pq.read_schema(like)
        except Exception:  # a foreign or unreadable file: fall back to the defaults
            reference = None
    for i in null_columns:
        field = table.schema.field(i)
        target = None
        if reference is not None and field.name in reference.names:
            candidate = reference.field(field.name).type
            target = None if _null_typed(candidate) else candidate
        if target is None and pa.types.is_list(field.type):
            target = pa.list_(pa.float64())
        if target is not None:
            try:
                table = table.set_column(i, field.with_type(target), table.column(i).cast(target))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass
    return table


def with_keys(frame: pd.DataFrame, keys: dict[str, Any]) -> pd.DataFrame:
    """Prefix an estimator's rows with the key columns, typed the same in every part."""
    frame = frame.reset_index(drop=True)
    key_frame = pd.DataFrame({c: pd.Series([keys[c]] * len(frame), dtype=KEY_DTYPES[c]) for c in KEY_COLUMNS})
    return pd.concat([key_frame, frame], axis=1)


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def part_path(self, table: str, key: str) -> Path:
        return self.root / _check_table(table) / f"part-{_check_key(key)}.parquet"

    def marker_path(self, key: str) -> Path:
        return self.root / TASKS_DIR / f"{_check_key(key)}.json"

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_FILE

    # ------------------------------------------------------------ completion
    def completed(self) -> set[str]:
        """Keys of the complete tasks (one directory listing, not one stat per task)."""
        try:
            names = os.listdir(self.root / TASKS_DIR)
        except FileNotFoundError:
            return set()
        return {n[:-5] for n in names if n.endswith(".json") and not n.startswith(".") and SAFE_KEY.fullmatch(n[:-5])}

    def reopen(self, key: str) -> None:
        """Mark a task incomplete before recomputing it (--force), so a kill mid-way cannot look complete."""
        self.marker_path(key).unlink(missing_ok=True)

    def write_parts(self, key: str, keys: dict[str, Any], frames: dict[str, pd.DataFrame]) -> dict[str, int]:
        """Write each non-empty table's rows; remove this task's parts of tables it no longer fills."""
        written = {}
        for table, frame in frames.items():
            if len(frame):  # an empty frame carries no types worth a part, and could be all-null
                path = self.part_path(table, key)
                arrow = part_table(with_keys(frame, keys), like=self._some_part(table, key))
                atomic_write(path, lambda tmp, arrow=arrow: _write_arrow(arrow, tmp))
                written[table] = len(frame)
        for table in self.tables():  # one stat per table, not a listing of every part
            if table not in written and table != ERRORS_TABLE:
                self.part_path(table, key).unlink(missing_ok=True)
        return written

    def _some_part(self, table: str, key: str) -> Path | None:
        """Another task's part of `table` (the first one listed), whose column types a new part follows."""
        try:
            with os.scandir(self.root / table) as entries:
                for entry in entries:
                    if entry.name.startswith("part-") and entry.name.endswith(".parquet") \
                            and entry.name != f"part-{key}.parquet":
                        return Path(entry.path)
        except (FileNotFoundError, NotADirectoryError):
            pass
        return None

    def finish(self, key: str, record: dict[str, Any]) -> None:
        """Write the completion marker (last), then drop an error left by an earlier failed attempt."""
        atomic_write_json(self.marker_path(key), record)
        self.part_path(ERRORS_TABLE, key).unlink(missing_ok=True)

    def write_error(self, key: str, keys: dict[str, Any], **fields: str) -> None:
        row = pd.DataFrame([{name: str(fields.get(name, "")) for name in ERROR_DTYPES}]).astype(ERROR_DTYPES)
        atomic_write_parquet(self.part_path(ERRORS_TABLE, key), with_keys(row, keys))

    def write_run_tables(self, runs: pd.DataFrame, training: pd.DataFrame | None) -> None:
        """runs/runs.parquet and training/epochs.parquet, so the output folder stands on its own."""
        atomic_write_parquet(self.root / "runs" / "runs.parquet", runs)
        if training is not None:
            atomic_write_parquet(self.root / "training" / "epochs.parquet", training)

    # ------------------------------------------------------------ housekeeping
    def remove_superseded(self, current: dict[tuple[str, str, str], str]) -> int:
        """Remove results and errors of tasks whose checkpoint file has since been rewritten.

        `current` maps (checkpoint path, estimator, config_hash) to the task key of the file's present
        content; a task recorded for the same file and estimator config under another key describes
        weights that no longer exist (say, after train-ckpts --overwrite). Returns the tasks removed.
        """
        live = set(current.values())
        removed = 0
        for key in sorted(self.completed() - live):  # markers are read only when some are not current
            try:
                m = json.loads(self.marker_path(key).read_text())
                newer = current.get((str(m["checkpoint"]), str(m["estimator"]), str(m["config_hash"])))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if newer is not None and newer != key:
                self.marker_path(key).unlink(missing_ok=True)  # first: incomplete before its parts go
                for table in self.tables():
                    self.part_path(table, key).unlink(missing_ok=True)
                removed += 1
        for part in sorted((self.root / ERRORS_TABLE).glob("part-*.parquet")):
            if part.stem[len("part-"):] in live:
                continue
            try:
                row = pd.read_parquet(part, columns=["path", "estimator", "config_hash"]).iloc[0]
            except Exception:  # unreadable or foreign file: leave it alone
                continue
            if (str(row["path"]), str(row["estimator"]), str(row["config_hash"])) in current:
                part.unlink(missing_ok=True)
                removed += 1
        return removed

    def remove_stale_temp_files(self, older_than: float = 3600.0) -> int:
        """Delete temporary files that killed writers left: at once if their writer was a process on this
        host that no longer exists, else once older than `older_than` seconds (a worker on another host
        may still be writing one)."""
        folders = [p for p in self.root.iterdir() if p.is_dir()] if self.root.is_dir() else []
        return remove_temp_files(folders, older_than=older_than)

    def tables(self) -> list[str]:
        """Table folders present (everything but `_tasks` and hidden folders)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(("_", ".")) and TABLE_NAME.fullmatch(p.name))


def _write_arrow(table, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path)
