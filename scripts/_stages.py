"""What the reproduction scripts share: running a project command, and timing stages across resumed runs."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def bin_path(name: str, prog: str) -> str:
    """A console script of this project, next to the running interpreter (the venv's)."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise SystemExit(f"{prog}: {path} not found: run with the project's venv python (pip install -e .)")
    return str(path)


def doc_path(doc: str | None, prog: str) -> Path | None:
    """The --doc page's path with its folder created now, before the run: a folder that cannot be made ends the
    script with one line at the start instead of a traceback after hours of work."""
    if doc is None:
        return None
    path = Path(doc)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"{prog}: --doc: cannot create {path.parent}: {e.strerror or e}") from None
    return path


def run(cmd: list[str], prog: str, env: dict[str, str] | None = None) -> None:
    """Run a command (with `env` added to the environment); a failure ends the script with one line (its own
    message is above it)."""
    finish(start(cmd, prog, env=env), prog)


@dataclass
class Command:
    """A command `start`ed in the background: its process, when it began and (once it has exited) ended."""
    process: subprocess.Popen
    log: Path | None
    began: float
    ended: float | None = None

    def running(self) -> bool:
        return self.process.poll() is None

    def seconds(self) -> float:
        """How long it ran, to its exit (which may come well before `finish` collects it)."""
        self.process.wait()
        while self.ended is None:  # its watcher thread sets it right after the exit
            time.sleep(0.01)
        return self.ended - self.began


def start(cmd: list[str], prog: str, log: Path | None = None, env: dict[str, str] | None = None) -> Command:
    """Start a command and return at once; its output goes to `log` if given (it runs alongside other commands,
    whose output it would interleave), else to this terminal. `finish` waits for it."""
    print("+", shlex.join(cmd) + (f"  (in the background, output in {log})" if log else ""), flush=True)
    environment = {**os.environ, **env} if env else None
    began = time.perf_counter()
    if log is None:
        process = subprocess.Popen(cmd, env=environment)
    else:
        with open(log, "w") as out:
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=environment)
    command = Command(process, log, began)

    def note_exit():
        process.wait()
        command.ended = time.perf_counter()

    threading.Thread(target=note_exit, daemon=True).start()
    return command


def finish(command: Command, prog: str) -> None:
    """Wait for a `start`ed command (and print its log); a failure ends the script with one line."""
    status = command.process.wait()
    if command.log is not None:
        print(command.log.read_text(errors="replace"), end="", flush=True)
    if status != 0:
        where = "above" + (f" (also in {command.log})" if command.log else "")
        raise SystemExit(f"{prog}: {Path(command.process.args[0]).name} failed (exit {status}); see its message "
                         f"{where} (a rerun resumes what finished)")


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
