"""`--scheduler`: an existing dask scheduler's address, checked before any work depends on it.

Two failures would otherwise surface badly. Text that is no dask address (or a web address, such as the
dashboard's http://host:8787) raises from deep inside distributed, a traceback. A server that accepts the
connection but speaks another protocol (a web server) hangs for ever: dask's handshake after connecting
has no timeout, and Client(timeout=...) does not bound it. So the address is parsed first, and the
scheduler is asked who it is (its `identity`) with a deadline of our own.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

DEFAULT_PORT = 8786
PROBE_SECONDS = 15


class SchedulerError(ValueError):
    """The --scheduler address is not usable; the message is one line naming it."""


def check_address(address: str) -> None:
    """SchedulerError unless `address` reads as a dask scheduler address (tcp://host:port, tls://, ws://...)."""
    from distributed.comm import registry
    from distributed.comm.addressing import parse_address, parse_host_port

    schemes = sorted(set(registry.backends) - {"inproc"})  # inproc: this process only, never a server
    try:
        scheme, loc = parse_address(address, strict=False)
        host, _ = parse_host_port(loc, default_port=DEFAULT_PORT)
    except (ValueError, TypeError):
        scheme, host = None, ""
    where = f"--scheduler {address!r}"
    if scheme in ("http", "https"):
        raise SchedulerError(f"{where}: a web address (a dashboard's?); a scheduler's looks like "
                             f"tcp://host:{DEFAULT_PORT}")
    if scheme not in schemes or not host or any(c.isspace() for c in host):
        raise SchedulerError(f"{where}: not a dask scheduler address (like tcp://host:{DEFAULT_PORT}; "
                             f"schemes: {', '.join(schemes)})")


def probe(address: str, seconds: float = PROBE_SECONDS) -> None:
    """SchedulerError unless a dask scheduler at `address` answers within `seconds`."""
    try:
        # in a thread of its own: asyncio.run cannot run inside a running event loop (Jupyter's, for analyze.run)
        with ThreadPoolExecutor(1) as pool:
            info = pool.submit(asyncio.run, asyncio.wait_for(_identity(address, seconds), seconds)).result()
    except (asyncio.TimeoutError, TimeoutError):
        raise SchedulerError(f"--scheduler {address}: no dask scheduler answered within {seconds:g} s "
                             "(nothing listening there, or a server that is not dask)") from None
    except OSError as e:  # refused, unreachable, closed mid-handshake
        raise SchedulerError(f"--scheduler {address}: cannot connect ({_first_line(e)})") from None
    except Exception as e:  # garbage in the handshake: not dask on the other side
        raise SchedulerError(f"--scheduler {address}: does not answer as a dask scheduler "
                             f"({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(info, dict) or info.get("type") != "Scheduler":
        kind = info.get("type") if isinstance(info, dict) else type(info).__name__
        raise SchedulerError(f"--scheduler {address}: answers as {kind!r}, not as a dask scheduler")


async def _identity(address: str, seconds: float):
    from distributed.core import rpc

    async with rpc(address, timeout=seconds) as scheduler:
        return await scheduler.identity()


def _first_line(e: BaseException) -> str:
    from common.checks import one_line

    return one_line(e)
