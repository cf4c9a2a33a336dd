"""What a command tells the user: the console handlers of the `t5forge` logger, set up once per command.

Every module logs to `logging.getLogger(__name__)` (a child of `t5forge`); `show_messages()` (called
by `t5forge.cli.main` before any command runs) prints them:

- INFO (what the run does: run directory, device, weights, tokenizer, resume, plan, the final
  summary) goes to stdout, one plain line per message, on rank 0 only (RANK, as torchrun sets it);
- WARNING and above go to stderr as `warning: ...`, on every rank (a problem on rank 3 is still a problem);
  so do t5forge's own `warnings.warn` calls (tests catch those with pytest.warns), without the
  source file and line Python would print; other libraries' warnings keep Python's format.

The streams are looked up when a message is written, not when the handler is made, so a caller that
swaps sys.stdout (pytest's capsys, a notebook) still sees the messages. On a terminal the lines are
written through tqdm, so they appear above the progress bar instead of through it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

LOGGER = "t5forge"
_PACKAGE = Path(__file__).resolve().parent


class _ConsoleHandler(logging.Handler):
    """Writes records of `low <= level < high` to sys.<stream_name>, as looked up at each message."""

    def __init__(self, stream_name: str, low: int, high: int, prefix: str = ""):
        super().__init__(level=low)
        self.stream_name, self.high, self.prefix = stream_name, high, prefix
        self.addFilter(lambda record: record.levelno < self.high)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.prefix + self.format(record)
            stream = getattr(sys, self.stream_name)
            if stream.isatty() or sys.stderr.isatty():
                from tqdm import tqdm

                tqdm.write(text, file=stream)  # above a progress bar, if one is drawn
            else:
                stream.write(text + "\n")
                stream.flush()  # a pipe is block-buffered: keep the order with the stderr lines
        except Exception:  # noqa: BLE001 (logging must never end a run)
            self.handleError(record)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    try:
        ours = Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        ours = False
    if not ours:
        return _show_warning.python(message, category, filename, lineno, file, line)
    (file or sys.stderr).write(f"warning: {message}\n")


def show_messages(rank: int | None = None) -> logging.Logger:
    """Attach the console handlers to the `t5forge` logger (replacing earlier ones, so calling it
    again, as in-process tests do, never doubles a line); INFO on rank 0, WARNING elsewhere."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    logger = logging.getLogger(LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.addHandler(_ConsoleHandler("stdout", logging.DEBUG, logging.WARNING))
    logger.addHandler(_ConsoleHandler("stderr", logging.WARNING, logging.CRITICAL + 1, prefix="warning: "))
    if warnings.showwarning is not _show_warning:
        _show_warning.python = warnings.showwarning
        warnings.showwarning = _show_warning
    return logger
