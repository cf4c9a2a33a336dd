"""Wall-clock training budgets: a pausable Stopwatch (`optim.time_budget` is parsed in t5forge.durations).

A time budget counts training time only. Compile warm-up, evaluation and checkpoint writing are
excluded by pausing the Stopwatch around them, so runs with different eval settings get the same
amount of training (cramming / modded-nanogpt style).
"""

from __future__ import annotations

import contextlib
import time


class Stopwatch:
    """Counts seconds while running; `pause()`/`resume()` (or `with sw.paused():`) exclude spans.

    `elapsed` starts from `initial` seconds so a resumed run keeps counting from its checkpoint.
    On GPU the host clock only advances with the device when the loop synchronises (e.g. reading
    the loss for logging); pause after such a sync for exact accounting.
    """

    def __init__(self, initial: float = 0.0, clock=time.perf_counter):
        self._clock = clock
        self._banked = float(initial)
        self._started_at: float | None = None

    @property
    def running(self) -> bool:
        return self._started_at is not None

    @property
    def elapsed(self) -> float:
        if self._started_at is None:
            return self._banked
        return self._banked + (self._clock() - self._started_at)

    def start(self) -> "Stopwatch":
        if self._started_at is None:
            self._started_at = self._clock()
        return self

    resume = start

    def pause(self) -> float:
        if self._started_at is not None:
            self._banked += self._clock() - self._started_at
            self._started_at = None
        return self._banked

    @contextlib.contextmanager
    def paused(self):
        """Exclude the body from the count; restarts afterwards only if it was running before."""
        was_running = self.running
        self.pause()
        try:
            yield self
        finally:
            if was_running:
                self.start()
