"""Dask worker plugins for analyze's local cluster (a module of its own: it imports distributed)."""

from __future__ import annotations

import signal
import threading

from distributed import WorkerPlugin


class IgnoreInterrupts(WorkerPlugin):
    """The worker process ignores SIGINT: Ctrl-C is for analyze itself, which stops the work (the workers
    would each print a traceback). Registered plugins also run on workers that join later, such as those a
    nanny restarts after a death, which no longer inherit analyze's disposition."""

    name = "analyze-ignore-sigint"

    def setup(self, worker) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers: main thread only
            signal.signal(signal.SIGINT, signal.SIG_IGN)
