"""Disk space for checkpoints: the check before a save, and a clear error when the disk refuses one.

(What makes a checkpoint trustworthy, its manifest and the checks against it, is run_layout.py's.)

Writing a checkpoint into a full disk (or past a quota or file-size limit) raises deep inside
torch or safetensors ("unexpected pos 576 vs 534"); `disk_full_error` recognises those and turns
them into one line saying which directory needs how much space.
"""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

from t5forge.errors import T5ForgeError

_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# What torch's stream writer and safetensors say when the disk refuses a write.
_DISK_MESSAGES = re.compile(
    r"os error (28|27|122)\b|unexpected pos|iostream error|file write failed",
    re.IGNORECASE,
)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def check_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise T5ForgeError(
            f"not enough disk space to write a checkpoint in {directory}: about {_mb(needed)} needed, "
            f"{_mb(free)} free; free some space (or lower checkpoint.keep_last) or put out_dir on a larger disk"
        )


def disk_full_error(err: BaseException, directory: Path, needed: int) -> T5ForgeError | None:
    """A clear error when `err` is the disk refusing a write, else None."""
    chain, e = [], err
    while e is not None and len(chain) < 5:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if not any(getattr(e, "errno", None) in _DISK_ERRNOS or _DISK_MESSAGES.search(str(e)) for e in chain):
        return None
    try:
        free = _mb(shutil.disk_usage(directory).free)
    except OSError:
        free = "unknown"
    return T5ForgeError(
        f"the disk refused a checkpoint write in {directory} (full, over quota or past a file-size limit: "
        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); about {_mb(needed)} needed, "
        f"{free} free; the partial checkpoint was removed and the previous one is intact; free some space or "
        "put out_dir on a larger disk, then resume=auto"
    )
