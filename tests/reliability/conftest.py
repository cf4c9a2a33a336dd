"""Fault-injection fixtures: real `t5forge` processes on real files, with tiny models.

`run_t5forge` starts `python -m t5forge ...` as a subprocess (so signals, exit codes, locks and
`kill -9` are real; `start_t5forge` for a process to signal or kill), and `tiny_pretrain_args` a pt_tiny run on the real C4 sample and T5
vocabulary that trains in a few seconds; `read_metrics` reads a run's metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def t5forge_env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture
def run_t5forge():
    """run_t5forge(*args, check=None, timeout=300, env=None) -> CompletedProcess (text).

    check=0 asserts the exit code is 0 (and shows stderr when it is not)."""

    def run(*args, check: int | None = None, timeout: float = 300, env: dict | None = None, cwd=None):
        done = subprocess.run(
            [sys.executable, "-m", "t5forge", *map(str, args)], capture_output=True, text=True,
            env=env or t5forge_env(), timeout=timeout, cwd=cwd,
        )
        if check is not None:
            assert done.returncode == check, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done

    return run


@pytest.fixture
def start_t5forge():
    """start_t5forge(*args, env=None, stdout=PIPE) -> Popen (text) of `python -m t5forge ...`, for tests
    that signal or kill a running process."""

    def start(*args, env: dict | None = None, stdout=subprocess.PIPE, cwd=None) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "t5forge", *map(str, args)], env=env or t5forge_env(), stdout=stdout,
            stderr=subprocess.PIPE, text=True, cwd=cwd,
        )

    return start


@pytest.fixture
def read_metrics():
    """read_metrics(run_dir) -> the records of RUN_DIR/metrics.jsonl."""

    def read(run_dir: Path) -> list[dict]:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    return read
