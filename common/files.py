"""Reading untrusted files without hanging or reading without bound.

Only regular files are read: a FIFO would block the reader forever and /dev/zero never ends. Files are
opened non-blocking (opening a FIFO for reading would otherwise wait for a writer), then checked with
fstat on the open descriptor, so a file swapped for a FIFO after a check cannot slip through. The size
is bounded before anything is read. Both refusals are OSErrors naming the file, so every caller's
existing `except OSError` turns them into its one-line message.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

SMALL_FILE = 16 << 20  # run.json, config files: far larger than any real one


def open_regular(path: str | Path, limit: int | None = None) -> BinaryIO:
    """`path` opened for binary reading; OSError unless it is a regular file of at most `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file: devices, FIFOs and sockets are never read", str(path))
        if limit is not None and st.st_size > limit:
            raise OSError(errno.EFBIG, f"{st.st_size} bytes, more than the {limit}-byte bound for this file",
                          str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (OSError otherwise). Reads at most limit + 1
    bytes, so a file that grows after the check is still bounded."""
    with open_regular(path, limit) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"grew past the {limit}-byte bound for this file while being read", str(path))
    return data


def read_text(path: str | Path, limit: int = SMALL_FILE) -> str:
    """A small regular text file (UTF-8); OSError as read_regular, UnicodeDecodeError for other bytes."""
    return read_regular(path, limit).decode("utf-8")
