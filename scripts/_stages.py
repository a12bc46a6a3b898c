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
    print("+", shlex.join(cmd), flush=True)
    status = subprocess.call(cmd, env={**os.environ, **env} if env else None)
    if status != 0:
        raise SystemExit(f"{prog}: {Path(cmd[0]).name} failed (exit {status}); see its message above "
                         "(a rerun resumes what finished)")


@contextmanager
def stage(name: str, timings: dict, log: Path | None = None):
    """Time a stage into `timings`; with `log`, add its seconds to that JSON file's per-stage totals, which sum
    every completed stage of every invocation on this output folder (a resumed run adds the time it took, so
    the totals still say what the work cost)."""
    print(f"\n=== {name}", flush=True)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    print(f"=== {name}: {timings[name] / 60:.1f} min", flush=True)
    if log is not None:
        totals = past_timings(log)
        totals[name] = totals.get(name, 0.0) + timings[name]
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
