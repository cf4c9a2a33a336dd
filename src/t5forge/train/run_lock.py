"""One writer per run directory: an exclusive OS lock on `RUN_DIR/.lock`, held for the whole run.

`fcntl.flock` locks belong to the open file, so the kernel drops them when the process exits in
any way (`kill -9` included): a lock is never stale. The holder writes its pid and host into the
file so that a second process can say who holds the directory. Under torchrun only rank 0 writes
to the run directory, so only rank 0 takes the lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from t5forge.errors import T5ForgeError
from t5forge.run_layout import LOCK

LOCK_FILE = LOCK
# Open lock files by run directory: kept open (and so locked) until the process exits or release().
_held: dict[Path, int] = {}


def acquire(run_dir: str | Path) -> Path:
    """Lock `run_dir` for this process (idempotent); a T5ForgeError when another process holds it."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return run_dir / LOCK_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "an unknown process"
        os.close(fd)
        raise T5ForgeError(
            f"{run_dir} is in use by another t5forge run ({holder}); wait for it to finish or stop it, "
            "or give this run another out_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[run_dir] = fd
    return path


def release(run_dir: str | Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the file drops the lock


def holds(run_dir: str | Path) -> bool:
    return Path(run_dir).resolve() in _held


def acquire_for_rank(run_dir: str | Path) -> None:
    """`acquire` on the process that writes the run directory: rank 0 (RANK from torchrun), or a lone process."""
    if int(os.environ.get("RANK", "0")) == 0:
        acquire(run_dir)
