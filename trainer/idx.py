"""Read the IDX files MNIST and Fashion-MNIST ship in (gzipped or not), with a one-line error for a bad file.

Format (LeCun's): two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, one big-endian
int32 per dimension, then the data. Both torchvision's raw folder and Debian's packages hold these files.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np


class IDXError(ValueError):
    """A file that is not a complete IDX file of the expected shape; the message names the file."""


def read_idx(path: Path, expected_shape: tuple[int | None, ...]) -> np.ndarray:
    """The uint8 array in `path` (.gz read directly); `expected_shape` may hold None for any size."""
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise IDXError(f"{path}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise IDXError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{path}: truncated header")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    if len(shape) != len(expected_shape) or any(e is not None and s != e for s, e in zip(shape, expected_shape)):
        want = "x".join("N" if e is None else str(e) for e in expected_shape)
        raise IDXError(f"{path}: shape {'x'.join(map(str, shape))}, expected {want}")
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise IDXError(f"{path}: truncated or padded ({len(data) - header} data bytes, expected {size})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
