"""The run directory: every name a training run writes, and what makes a checkpoint complete.

    RUN_DIR/
        config.yaml            the resolved run config (rewritten at every start)
        metrics.jsonl          one JSON record per log / eval / event (train/metrics_log.py)
        .lock                  held by the one process that writes here (train/run_lock.py)
        wandb-run.json         the W&B run id a resumed run continues (train/wandb_sink.py)
        wandb/                 W&B's own files (written by wandb itself; offline runs live here)
        tensorboard/           with logging.tensorboard=true
        plots/                 `t5forge plot RUN_DIR`
        eval/step-NNNNNNNN/    a fine-tuning run's generation evaluations
        checkpoints/
            step-NNNNNNNN/     complete: renamed from .tmp once every file was written
            step-NNNNNNNN.tmp/ a save in progress, or one a crash interrupted: never read
            step-NNNNNNNN.old/ the previous copy of a step while that step is saved again

A checkpoint holds one or more files per named part (train/checkpoint_parts.py) and, written
last, `manifest.json`: the size and SHA-256 of every other file. A checkpoint is *complete* when
its directory is a step (`step-N`, or `step-N.old` where `step-N` is absent), the files its
reader needs are there, and, when it has a manifest, every file the manifest names matches it
(sizes always; contents when `checksums`). Resuming (train/checkpoint.py) needs the files of a
t5forge run (REQUIRED_FILES); loading a model from a run directory (model/load.py) needs the
model's (MODEL_FILES) and takes the newest checkpoint that is complete by the same rule, so
`load_model RUN`, `evaluate RUN` and `resume=auto` agree on which checkpoint a run ends with.
Checkpoints written before manifests existed have none and count as complete when their files
are there.

Every module that reads or writes a run directory asks this one for the names, so the layout is
defined once. It imports nothing of t5forge but errors, so model/, eval/ and train/ may use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

from t5forge.errors import T5ForgeError

# -- the run directory
RUN_CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LOCK = ".lock"
WANDB_RUN = "wandb-run.json"
TENSORBOARD = "tensorboard"
PLOTS = "plots"
EVAL = "eval"
CHECKPOINTS = "checkpoints"

# -- a model directory (what `save_model_dir` writes; a checkpoint is one plus the run state)
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
MODEL_FILES = (MODEL_WEIGHTS, MODEL_CONFIG)

# -- a checkpoint's files besides the model's (one per part of a t5forge run's checkpoint)
OPTIMIZER = "optimizer.pt"
TRAIN_STATE = "train_state.json"
RNG = "rng.pt"
DATA = "data.pt"
MANIFEST = "manifest.json"
# What every checkpoint a t5forge run writes holds; the config is the run's config.yaml.
REQUIRED_FILES = (*MODEL_FILES, OPTIMIZER, TRAIN_STATE, RNG, DATA, RUN_CONFIG)

STEP_DIR = re.compile(r"^step-(\d{8,})$")
SWAPPED_DIR = re.compile(r"^step-(\d{8,})\.old$")  # complete, so resumable
PARTIAL_DIR = re.compile(r"^step-\d{8,}.*\.tmp$")
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"

_CHUNK = 1 << 22


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / step_dir_name(step)


def eval_dir(run_dir: str | Path, step: int) -> Path:
    """Where a fine-tuning run writes the generation evaluation of `step`."""
    return Path(run_dir) / EVAL / step_dir_name(step)


def is_checkpoint_name(name: str) -> bool:
    return bool(STEP_DIR.match(name) or SWAPPED_DIR.match(name))


def checkpoint_step(path: str | Path) -> int:
    match = STEP_DIR.match(Path(path).name) or SWAPPED_DIR.match(Path(path).name)
    if not match:
        raise T5ForgeError(f"{path} is not a checkpoint directory (expected a name like step-00001000)")
    return int(match.group(1))


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run directory a checkpoint directory belongs to, or None when it is not inside one."""
    checkpoint = Path(checkpoint)
    if is_checkpoint_name(checkpoint.name) and checkpoint.parent.name == CHECKPOINTS:
        return checkpoint.parent.parent
    return None


def run_config_of(model_dir: str | Path) -> Path | None:
    """The config.yaml of the run that wrote a checkpoint: its own, else its run directory's."""
    model_dir = Path(model_dir)
    if (model_dir / RUN_CONFIG).is_file():
        return model_dir / RUN_CONFIG
    run_dir = run_dir_of(model_dir)
    if run_dir is not None and (run_dir / RUN_CONFIG).is_file():
        return run_dir / RUN_CONFIG
    return None


def looks_like_run_or_model(path: str | Path) -> bool:
    """A directory holding a run's, a checkpoint's or a model's marker files."""
    p = Path(path)
    return p.is_dir() and any((p / name).exists() for name in (RUN_CONFIG, MODEL_CONFIG, "config.json", CHECKPOINTS))


# ---------------------------------------------------------------------------------------------
# The manifest


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


# ---------------------------------------------------------------------------------------------
# Complete checkpoints


def missing_files(path: str | Path, needs: tuple[str, ...] = REQUIRED_FILES) -> list[str]:
    path = Path(path)
    return [name for name in needs if not (path / name).is_file()]


def damage(path: str | Path, checksums: bool = False, needs: tuple[str, ...] = REQUIRED_FILES) -> str | None:
    """What is wrong with a checkpoint's files (presence of `needs`, the manifest's sizes; with
    `checksums`, its contents), or None when it is complete."""
    return problem(Path(path), needs, checksums)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's checkpoint directories by name (`step-N`; `step-N.old` only when `step-N` is absent),
    oldest step first; `.tmp` ones never. Whether their files are intact is `damage`'s question."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for child in root.iterdir():
        match = STEP_DIR.match(child.name) or SWAPPED_DIR.match(child.name)
        if match and child.is_dir():
            step = int(match.group(1))
            if step not in found or STEP_DIR.match(child.name):
                found[step] = child
    return [found[step] for step in sorted(found)]


def latest(run_dir: str | Path, checksums: bool = False, needs: tuple[str, ...] = REQUIRED_FILES) -> Path | None:
    """The newest complete checkpoint of a run, or None; damaged newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        wrong = damage(path, checksums, needs)
        if wrong is None:
            return path
        # Renamed, so written completely once; damaged afterwards (by hand, by the disk). Left in
        # place for a look; the next save of that step, or a save before it, replaces it.
        msg = f"skipping damaged checkpoint {path}: {wrong}; falling back to the previous one"
        warnings.warn(msg)  # on the console as `warning: ...` (t5forge.console), once
    return None


def newest_model_checkpoint(run_or_checkpoints_dir: str | Path) -> Path | None:
    """The newest complete checkpoint to load a model from (a run directory or its checkpoints/):
    the rule resume=auto applies (manifest verified, checksums included), needing the model's files."""
    base = Path(run_or_checkpoints_dir)
    run_dir = base.parent if base.name == CHECKPOINTS and not (base / CHECKPOINTS).is_dir() else base
    return latest(run_dir, checksums=True, needs=MODEL_FILES)
