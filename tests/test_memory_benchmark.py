"""benchmarks/memory.py runs end to end on the smallest shape: one arm in a fresh process, its peak
memory recorded in the JSON and the markdown table (the measurements themselves: benchmarks/memory.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_one_arm_of_the_memory_benchmark_records_its_peak(tmp_path):
    out = tmp_path / "memory"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory.py"), "--shapes", "tiny", "--steps", "1",
                           "--batch", "1", "--modes", "full", "--strategies", "single", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (arm,) = json.loads(out.with_suffix(".json").read_text())["arms"]
    assert arm["shape"] == "tiny" and arm["mode"] == "full" and arm["strategy"] == "single"
    assert arm["peak"] >= arm["before_step"] > arm["runtime"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| tiny | 4M | full | single |" in table and "git sha:" in table
