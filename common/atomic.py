"""Atomic file writes: a temporary file in the same folder, fsync, then rename; plus folder locks.

A reader (or a process killed mid-write) sees either the old file or the complete new one, never a
partial file; a failed write (full disk, file-size limit, exception) removes its temporary file and
raises. Temporary files are named `.tmp-<name>~<host>~<pid>~<random>`: readers skip dot-files, and
`remove_temp_files` can tell the leftovers of a killed process (same host, pid gone) from the files a
live writer is still filling.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

TMP_PREFIX = ".tmp-"
_TMP_RE = re.compile(r"^\.tmp-.*~(?P<host>[^~]*)~(?P<pid>\d+)~[^~]*$")


def _host() -> str:
    return socket.gethostname().replace("~", "-")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, fsync the result and rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}~{_host()}~{os.getpid()}~", dir=path.parent)
    except OSError as e:
        _reraise_naming(e, path)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; finished files get normal permissions
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:  # full disk, file-size limit, permissions: say which file
        tmp_path.unlink(missing_ok=True)
        _reraise_naming(e, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _reraise_naming(e: OSError, path: Path):
    """Raise the same error (same errno, so the same OSError subclass) with a message naming the file."""
    if e.errno is None:
        raise e
    raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a short write (full disk, file-size limit) raises OSError
            f.write(data)

    return atomic_write(path, write)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_parquet(path: str | Path, frame) -> Path:
    return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))  # pyarrow: OSError on a full disk


# ------------------------------------------------------------------ leftovers of killed writers
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def is_temp_file(name: str) -> bool:
    return name.startswith(TMP_PREFIX)


def temp_file_is_stale(path: Path, older_than: float | None) -> bool:
    """A temporary file whose writer is gone: written on this host by a process that no longer exists,
    or (any host) last modified more than `older_than` seconds ago (None: only the first rule)."""
    m = _TMP_RE.match(path.name)
    if m and m["host"] == _host() and int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"])):
        return True
    if older_than is None:
        return False
    try:
        return path.stat().st_mtime < time.time() - older_than
    except FileNotFoundError:
        return False


def remove_temp_files(folders: Iterator[Path] | list[Path], older_than: float | None = 3600.0,
                      everything: bool = False) -> int:
    """Delete the temporary files killed writers left in `folders` (not recursive). `everything`: all of
    them (only for a caller that holds the folder's lock, so no other writer can be filling one)."""
    removed = 0
    for folder in folders:
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if not is_temp_file(name):
                continue
            tmp = Path(folder) / name
            if everything or temp_file_is_stale(tmp, older_than):
                try:
                    tmp.unlink()
                    removed += 1
                except (FileNotFoundError, IsADirectoryError):
                    pass
    return removed


def empty_folder(folder: Path) -> None:
    """Create `folder` if needed and delete everything in it, keeping the folder itself."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


# ------------------------------------------------------------------ folder locks
class LockBusy(RuntimeError):
    """The lock is held by another process (non-blocking acquisition)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path, self.holder = path, holder


def _holder(f) -> str:
    try:
        f.seek(0)
        return f.read().strip()
    except OSError:
        return ""


@contextmanager
def folder_lock(path: str | Path, *, wait: bool, on_wait: Callable[[str], None] | None = None,
                on_unsupported: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` for the block: a lock file (created if missing), or, if `path`
    is a directory, the directory itself (nothing is added to it).

    wait=False raises LockBusy if another process holds it; wait=True calls `on_wait(holder)` once and
    blocks. The lock dies with its process (SIGKILL included), so a killed run never leaves a stale
    lock. A lock file records the holder ("pid N on host H") for the messages; it is never deleted
    (deleting a lock file races with the next locker).
    """
    path = Path(path)
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise LockBusy(path, "") from None
                if on_wait is not None:
                    on_wait("")
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f)
            if not wait:
                raise LockBusy(path, holder) from None
            if on_wait is not None:
                on_wait(holder)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            if on_unsupported is not None:  # a filesystem without locks: go on, but say so
                on_unsupported(f"cannot lock {path} ({e.strerror}); make sure no other process writes here")
            yield
            return
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
        except OSError:
            pass  # a full disk must not stop the lock from working
        yield
    finally:
        f.close()  # releases the lock
