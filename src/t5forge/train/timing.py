"""Wall-clock training budgets: parse `optim.time_budget` ("4h", "1h30m", ...) and a pausable Stopwatch.

A time budget counts training time only. Compile warm-up, evaluation and checkpoint writing are
excluded by pausing the Stopwatch around them, so runs with different eval settings get the same
amount of training (cramming / modded-nanogpt style).
"""

from __future__ import annotations

import contextlib
import re
import time

from t5forge.errors import T5ForgeError

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])")


def parse_time_budget(text: str | None, key: str = "optim.time_budget") -> float | None:
    """Seconds in a budget like "4h", "90m", "1h30m", "45s", "1.5h"; None for "" or None (no budget)."""
    if text is None:
        return None
    s = str(text).strip().lower()
    if s in ("", "none", "null"):
        return None
    compact = s.replace(" ", "")
    parts = _PART.findall(compact)
    units = [unit for _, unit in parts]
    # The parts must spell the whole string, each unit once, largest first ("1h30m", not "30m1h").
    if (
        not parts
        or "".join(number + unit for number, unit in parts) != compact
        or len(set(units)) != len(units)
        or units != sorted(units, key=lambda u: -_UNITS[u])
    ):
        raise T5ForgeError(
            f"{key}={text!r} is not a duration; write it like 4h, 90m, 1h30m or 45s (d, h, m, s units), "
            f"or leave it empty for no budget"
        )
    seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if seconds <= 0:
        raise T5ForgeError(f"{key}={text!r} must be a positive duration, or empty for no budget")
    return seconds


def format_seconds(seconds: float) -> str:
    """1h02m03s style, for logs."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


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
