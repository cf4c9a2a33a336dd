"""Durations as people write them: `optim.time_budget` ("4h", "1h30m", ...) parsed, seconds formatted.

A foundation module (it imports nothing of t5forge but the error type), so config.py can validate
`optim.time_budget` without reaching up into t5forge.train.
"""

from __future__ import annotations

import re

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
