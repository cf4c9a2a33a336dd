"""Graceful stops: SIGTERM, SIGINT and SIGUSR1 ask a training run to stop after its current step.

Schedulers (SLURM, Kubernetes) send SIGTERM, or SIGUSR1 as a warning, some time before they kill
a job; Ctrl-C sends SIGINT. `StopRequests` records the first such signal instead of dying, so the
loop can finish the optimizer step in flight, write a checkpoint and exit. A second SIGINT raises
KeyboardInterrupt at once (the user insists). Handlers are installed only while the context is
open, and only in the main thread (Python allows signal handlers nowhere else); the previous ones
come back on exit. At the package's top level: the training loop handles the signals, the data
loader's workers ignore them (`ignore_stop_signals`), and data/ must not import train/.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class StopRequests:
    """Context manager; `.signal_name` is the first stop signal received (None while there is none)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: workers ignore the stop signals, which reach the whole process
    group (Ctrl-C, `scancel`), so the main process can finish its step and save; it ends the workers
    afterwards, and they exit on their own when it dies."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
