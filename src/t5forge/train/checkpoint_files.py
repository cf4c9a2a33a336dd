"""What makes a checkpoint directory trustworthy: its manifest, the checks against it, disk space.

`manifest.json` is the last file written into a checkpoint (after every other file, before the
fsync and the rename): the size and SHA-256 of every file. A checkpoint is intact when every file
it names is there with that size and checksum; sizes alone are checked when listing checkpoints,
checksums before resuming from one (SHA-256 reads about 1 GB/s, so this costs about a second at
T5-base). Checkpoints written before manifests existed have none: they count as intact when every
required file is there, and any error while reading them is reported as a damaged checkpoint.

Writing a checkpoint into a full disk (or past a quota or file-size limit) raises deep inside
torch or safetensors ("unexpected pos 576 vs 534"); `disk_full_error` recognises those and turns
them into one line saying which directory needs how much space.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from t5forge.errors import T5ForgeError

MANIFEST = "manifest.json"
_CHUNK = 1 << 22
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# What torch's stream writer and safetensors say when the disk refuses a write.
_DISK_MESSAGES = re.compile(
    r"os error (28|27|122)\b|unexpected pos|iostream error|file write failed",
    re.IGNORECASE,
)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[str]:
    names = []
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), directory)
            if rel != MANIFEST:
                names.append(rel)
    return sorted(names)


def write_manifest(directory: Path) -> None:
    """Record every file's size and checksum; call after everything else is written."""
    files = {}
    for rel in _files(directory):
        path = directory / rel
        files[rel] = {"size": path.stat().st_size, "sha256": sha256(path)}
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n")


def problem(directory: Path, required: tuple[str, ...], checksums: bool) -> str | None:
    """What is wrong with a checkpoint directory (one phrase naming the file), or None when intact."""
    missing = [name for name in required if not (directory / name).is_file()]
    if missing:
        return f"it lacks {', '.join(missing)}"
    manifest_file = directory / MANIFEST
    if not manifest_file.is_file():
        return None  # written before manifests existed
    try:
        files = json.loads(manifest_file.read_text())["files"]
        entries = [(rel, int(e["size"]), str(e["sha256"])) for rel, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__})"
    for rel, size, digest in entries:
        path = directory / rel
        if not path.is_file():
            return f"{rel} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{rel} has {actual} bytes, {size} were written (truncated or overwritten)"
    if checksums:
        for rel, _, digest in entries:
            if sha256(directory / rel) != digest:
                return f"{rel} does not match its checksum (its bytes changed on disk since it was written)"
    return None


def bytes_needed(model, optimizer) -> int:
    """About what a checkpoint of `model` and `optimizer` takes on disk (tensors + small files)."""
    import torch

    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total + (4 << 20)  # tokenizer, RNG, data position, config, pickle framing


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
