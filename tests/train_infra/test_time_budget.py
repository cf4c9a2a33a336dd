"""Time budget parsing and the pausable Stopwatch."""

import time

import pytest

from t5forge.durations import format_seconds, parse_time_budget
from t5forge.errors import T5ForgeError
from t5forge.train.timing import Stopwatch


@pytest.mark.parametrize(
    "text, seconds",
    [("4h", 14400), ("90m", 5400), ("1h30m", 5400), ("45s", 45), ("1.5h", 5400), ("1h 30m 15s", 5415),
     ("2d", 172800), ("  20M ", 1200), ("", None), (None, None), ("none", None)],
)
def test_parse_time_budget(text, seconds):
    assert parse_time_budget(text) == seconds


@pytest.mark.parametrize("text", ["4", "4x", "h", "30m1h", "1h1h", "1h-30m", "four hours", "0s", "0h0m"])
def test_parse_time_budget_errors_name_the_key(text):
    with pytest.raises(T5ForgeError, match=r"optim\.time_budget"):
        parse_time_budget(text)


def test_format_seconds():
    assert [format_seconds(s) for s in (5, 65, 3723)] == ["5s", "1m05s", "1h02m03s"]


def test_stopwatch_excludes_paused_spans():
    sw = Stopwatch(initial=100.0)
    assert sw.elapsed == 100.0 and not sw.running
    sw.start()
    time.sleep(0.05)
    with sw.paused():
        assert not sw.running
        frozen = sw.elapsed
        time.sleep(0.3)
        assert sw.elapsed == frozen  # nothing counts while paused
    assert sw.running
    time.sleep(0.05)
    spent = sw.pause() - 100.0
    # ~0.1 s counted; the 0.3 s pause must not be (generous bound for a loaded machine)
    assert 0.1 <= spent < 0.3
    time.sleep(0.05)
    assert sw.elapsed - 100.0 == spent


def test_paused_context_keeps_a_stopped_watch_stopped():
    sw = Stopwatch()
    with sw.paused():
        pass
    assert not sw.running and sw.elapsed == 0.0
