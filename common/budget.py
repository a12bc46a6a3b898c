"""The memory budget for what a file makes the loader build.

A checkpoint of a kilobyte can ask for a 10^9-wide layer, a 12000x12000 shape probe or a teacher net of
millions of units: memory grows with the numbers in a file, not with its size. So every such size is
computed first (on torch's meta device or by arithmetic) and compared with a cap, before anything is
allocated. The cap is a few GB by default (the largest real use, CIFAR-10 and a LeNet, stays well under
1 GB), and `--max-memory-gb` of both commands (config key `max_memory_gb`) sets it.
"""

from __future__ import annotations

import math

DEFAULT_GB = 4.0
FLAG = "--max-memory-gb"


class OverBudget(ValueError):
    """Building something would take more memory than the cap; the message says what and how much."""


def cap_bytes(gb: float) -> int:
    return int(gb * (1 << 30))


DEFAULT_BYTES = cap_bytes(DEFAULT_GB)


def gb(n: float) -> str:
    return f"{n / (1 << 30):.3g} GB"


def check(need: float, limit: int, what: str) -> None:
    """OverBudget unless `need` bytes (a float: products of file numbers can exceed any int64) fit `limit`."""
    if not math.isfinite(need) or need > limit:
        raise OverBudget(f"{what} needs {gb(need)}, more than the {gb(limit)} memory cap "
                         f"({FLAG} raises it)")
