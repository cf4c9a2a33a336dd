"""The CLI entry points exist and answer --help."""

import subprocess
import sys


def test_module_help():
    out = subprocess.run([sys.executable, "-m", "t5forge", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "t5forge" in out.stdout
