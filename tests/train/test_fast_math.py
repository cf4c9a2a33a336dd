"""enable_fast_math on CPU: subnormal floats are flushed to zero, on the worker threads too. Run in
fresh processes: the setting is process-wide and must come before the thread pool starts."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from t5forge.train.setup import enable_fast_math
    if sys.argv[1] == "fast":
        if not torch.set_flush_denormal(False):
            sys.exit(print("unsupported"))
        enable_fast_math(torch.device("cpu"))
    tiny = torch.full((1 << 20,), 1e-39)  # subnormal in fp32; big enough to run on several threads
    torch.set_num_threads(2)
    print(int((tiny * 1.0).count_nonzero()), int((tiny[:4] * 1.0).count_nonzero()))
""")


def run(mode: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_cpu_fast_math_flushes_subnormals_on_all_threads():
    assert run("default") == [str(1 << 20), "4"]  # torch keeps them unless told
    fast = run("fast")
    assert fast in (["0", "0"], ["unsupported"])
