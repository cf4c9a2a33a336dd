"""What a config key's value must be: the rules `t5forge.config` attaches to each key.

A `Rule` is a short text for `--list-keys` (`one of: sdpa | eager | flex`, `>= 1`, `in [0, 1)`)
and a `problem(value)` that returns what is wrong (`must be >= 1`) or None. The config turns a
problem into `config key KEY=VALUE: PROBLEM`, so a rule never has to name its key.

    one_of("sdpa", "eager", "flex"), at_least(1), above(0), within("[0, 1)"), not_blank(), file_list()
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Rule:
    text: str  # the constraint as --list-keys shows it
    problem: Callable[[Any], Optional[str]]  # value -> what is wrong ("must be >= 1"), None when fine


def _note(note: str) -> str:
    return f" ({note})" if note else ""


def one_of(*choices: str, note: str = "") -> Rule:
    return Rule(f"one of: {' | '.join(choices)}",
                lambda v: None if v in choices else f"must be one of {', '.join(choices)}{_note(note)}")


def at_least(low, note: str = "") -> Rule:
    return Rule(f">= {low}", lambda v: None if v >= low else f"must be >= {low}{_note(note)}")


def above(low, note: str = "") -> Rule:
    return Rule(f"> {low}", lambda v: None if v > low else f"must be > {low}{_note(note)}")


_INTERVAL = re.compile(r"([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])")


def within(interval: str, note: str = "") -> Rule:
    """`within("[0, 1)")`: a bracket includes its end, a parenthesis excludes it."""
    opening, low, high, closing = _INTERVAL.fullmatch(interval).groups()
    low, high = float(low), float(high)

    def inside(v) -> bool:
        return (low <= v if opening == "[" else low < v) and (v <= high if closing == "]" else v < high)

    return Rule(f"in {interval}", lambda v: None if inside(v) else f"must be in {interval}{_note(note)}")


def not_blank(what: str) -> Rule:
    """A string that names something: `what` completes "must ..." (e.g. "name a tokenizer")."""
    return Rule("not empty", lambda v: None if v.strip() else f"must {what}")


def file_list() -> Rule:
    return Rule("file paths", lambda v: None if all(isinstance(f, str) and f for f in v)
                else "must be a list of file paths, like [a.jsonl,b.jsonl]")


def matches(pattern: str, text: str, what: Callable[[Any], str]) -> Rule:
    """The whole value matches `pattern`; `what(value)` says what to write instead."""
    return Rule(text, lambda v: None if re.fullmatch(pattern, v) else what(v))


def check(text: str, problem: Callable[[Any], Optional[str]]) -> Rule:
    """Any other single-value rule, e.g. a parser that raises its own T5ForgeError."""
    return Rule(text, problem)
