"""What the reproduction scripts share: running a project command, and timing stages across resumed runs."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def bin_path(name: str, prog: str) -> str:
    """A console script of this project, next to the running interpreter (the venv's)."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise SystemExit(f"{prog}: {path} not found: run with the project's venv python (pip install -e .)")
    return str(path)


def run(cmd: list[str], prog: str, env: dict[str, str] | None = None) -> None:
    """Run a command (with `env` added to the environment); a failure ends the script with one line (its own
    message is above it)."""
    finish(start(cmd, prog, env=env), prog)


def start(cmd: list[str], prog: str, log: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a command and return at once; its output goes to `log` if given (it runs alongside other commands,
    whose output it would interleave), else to this terminal. `finish` waits for it."""
    print("+", shlex.join(cmd) + (f"  (in the background, output in {log})" if log else ""), flush=True)
    environment = {**os.environ, **env} if env else None
    if log is None:
        return subprocess.Popen(cmd, env=environment)
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=environment)


def finish(process: subprocess.Popen, prog: str, log: Path | None = None) -> None:
    """Wait for a `start`ed command (and print its `log`); a failure ends the script with one line."""
    status = process.wait()
    if log is not None:
        print(log.read_text(errors="replace"), end="", flush=True)
    if status != 0:
        where = "above" + (f" (also in {log})" if log else "")
        raise SystemExit(f"{prog}: {Path(process.args[0]).name} failed (exit {status}); see its message {where} "
                         "(a rerun resumes what finished)")


WALL = "wall time"  # the key of the invocations' summed wall time in a timings log (stages may overlap)


@contextmanager
def stage(name: str, timings: dict, log: Path | None = None):
    """Time a stage into `timings` (and `log`, see `record`)."""
    print(f"\n=== {name}", flush=True)
    began = time.perf_counter()
    yield
    record(name, time.perf_counter() - began, timings, log)
    print(f"=== {name}: {timings[name] / 60:.1f} min", flush=True)


def record(name: str, seconds: float, timings: dict, log: Path | None = None) -> None:
    """Put a stage's seconds into `timings`; with `log`, add them to that JSON file's per-stage totals, which sum
    every completed stage of every invocation on this output folder (a resumed run adds the time it took, so
    the totals still say what the work cost)."""
    timings[name] = seconds
    if log is not None:
        totals = past_timings(log)
        totals[name] = totals.get(name, 0.0) + seconds
        tmp = log.with_name(log.name + ".tmp")
        tmp.write_text(json.dumps(totals, indent=1))
        tmp.replace(log)


def past_timings(log: Path) -> dict[str, float]:
    """The per-stage totals in `log` ({} if it is missing or unreadable)."""
    try:
        totals = json.loads(log.read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in totals.items() if isinstance(v, (int, float))} if isinstance(totals, dict) else {}
