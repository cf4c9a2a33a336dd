"""Atomic, resumable checkpoints of a training run, and resume resolution (`false | auto | path`).

Layout (one directory per saved step, everything needed to continue the run exactly):

    RUN_DIR/checkpoints/step-00001000/
        model.safetensors, model_config.json, tokenizer files   (t5forge.model.load.save_model_dir)
        optimizer.pt       {"optimizer_class": name, "state_dict": optimizer.state_dict()}
        train_state.json   TrainState (step, tokens seen, time spent, best eval, ...)
        rng.pt             {"world_size": W, "ranks": [rng.capture() of rank 0, 1, ...]}
        data.pt            {"world_size": W, "ranks": [loader.state_dict() of rank 0, 1, ...]}
        config.yaml        the resolved run config

A checkpoint is written under `step-NNNNNNNN.tmp/`, every file is fsync'd, and only then is the
directory renamed: a directory without the `.tmp` suffix is complete, and a `.tmp` left by a crash
is never resumed from (it is deleted the next time a Checkpointer starts or saves). Older complete
checkpoints beyond `keep_last` are deleted only after the new one is complete. The last file written
is `manifest.json` (sizes and checksums, checkpoint_files.py): resume=auto skips a checkpoint whose
files do not match it, with a warning, and takes the newest intact one. Saving a step that already
exists moves the old copy to `step-NNNNNNNN.old` (still a complete checkpoint of that step, used
when the new one never appeared) so no crash point leaves fewer complete checkpoints. Only the
process holding the run directory's lock (run_lock.py) removes or renames anything.

Distributed runs: every rank calls `save`; the per-rank RNG and data-loader states are gathered to
rank 0, which alone writes, then all ranks meet at a barrier. The model is saved from rank 0's
replica (DDP keeps replicas identical). FSDP would need the full state dicts gathered before the
write (`torch.distributed.checkpoint.state_dict.get_model_state_dict` /
`get_optimizer_state_dict` with `full_state_dict=True`) in `_write`, and broadcast on load.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from t5forge.errors import T5ForgeError
from t5forge.model.load import save_model_dir
from t5forge.model.load import unwrap as unwrap_model  # strips DDP / torch.compile wrappers
from t5forge.train import rng, run_lock
from t5forge.train.checkpoint_files import MANIFEST, bytes_needed, check_free_space, disk_full_error, problem, write_manifest
from t5forge.train.state import TrainState

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
# The previous copy of a step while that step is saved again; complete, so resumable.
SWAPPED_DIR = re.compile(r"^step-(\d{8,})\.old$")
PARTIAL_DIR = re.compile(r"^step-\d{8,}.*\.tmp$")
# model.safetensors and model_config.json come from the model directory contract (model.load).
REQUIRED_FILES = (
    "model.safetensors",
    "model_config.json",
    "optimizer.pt",
    "train_state.json",
    "rng.pt",
    "data.pt",
    "config.yaml",
)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def missing_files(path: str | Path) -> list[str]:
    path = Path(path)
    return [name for name in REQUIRED_FILES if not (path / name).is_file()]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest step first (`step-N.old` only when `step-N` is absent)."""
    root = Path(run_dir) / CHECKPOINTS
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


def checkpoint_step(path: str | Path) -> int:
    match = STEP_DIR.match(Path(path).name) or SWAPPED_DIR.match(Path(path).name)
    if not match:
        raise T5ForgeError(f"{path} is not a checkpoint directory (expected a name like step-00001000)")
    return int(match.group(1))


def damage(path: str | Path, checksums: bool = False) -> str | None:
    """What is wrong with a complete checkpoint's files (sizes; with `checksums`, contents), or None."""
    return problem(Path(path), REQUIRED_FILES, checksums)


def latest(run_dir: str | Path, checksums: bool = False) -> Path | None:
    """The newest intact checkpoint of a run, or None; damaged newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        wrong = damage(path, checksums)
        if wrong is None:
            return path
        # Renamed, so written completely once; damaged afterwards (by hand, by the disk). Left in
        # place for a look; the next save of that step, or a save before it, replaces it.
        msg = f"skipping damaged checkpoint {path}: {wrong}; falling back to the previous one"
        warnings.warn(msg)  # on the console as `warning: ...` (t5forge.console), once
    return None


def _warn_newer(found: Path) -> None:
    newer = [p.name for p in list_checkpoints(found.parent.parent) if checkpoint_step(p) > checkpoint_step(found)]
    if newer:
        msg = (f"resuming from {found.name}: the newer checkpoints {', '.join(newer)} belong to the history this "
               "run replaces and are deleted at its first save (copy them elsewhere now to keep them)")
        warnings.warn(msg)  # on the console as `warning: ...` (t5forge.console), once


def resolve_resume(resume: str | bool | None, run_dir: str | Path) -> Path | None:
    """Which checkpoint to resume from: None for a fresh start.

    `resume` is "false" (fresh start), "auto" (the newest complete checkpoint of `run_dir`, or a
    fresh start when there is none), or a path: a checkpoint directory, or a run directory (its
    newest complete checkpoint).
    """
    if resume is None or resume is False or (isinstance(resume, str) and resume.strip().lower() in ("false", "")):
        return None
    if resume is True or (isinstance(resume, str) and resume.strip().lower() == "auto"):
        return latest(run_dir, checksums=True)
    path = Path(str(resume)).expanduser()
    if not path.exists():
        raise T5ForgeError(f"resume={resume}: no such file or directory; use resume=auto, resume=false or a checkpoint path")
    if not path.is_dir():
        raise T5ForgeError(f"resume={resume}: is a file; give a checkpoint directory (RUN_DIR/checkpoints/step-NNNNNNNN)")
    if path.name.endswith(".tmp"):
        raise T5ForgeError(
            f"resume={resume}: this checkpoint was still being written when its run stopped (.tmp); "
            f"resume from a complete one, e.g. resume=auto"
        )
    if STEP_DIR.match(path.name) or SWAPPED_DIR.match(path.name):
        missing = missing_files(path)
        if missing:
            raise T5ForgeError(f"resume={resume}: incomplete checkpoint, it lacks {', '.join(missing)}")
        wrong = damage(path, checksums=True)
        if wrong:
            raise T5ForgeError(
                f"resume={resume}: this checkpoint is damaged ({wrong}); resume from another one, "
                "e.g. resume=auto (the newest intact checkpoint)"
            )
        _warn_newer(path)
        return path
    if (path / CHECKPOINTS).is_dir():
        found = latest(path, checksums=True)
        if found is None:
            raise T5ForgeError(f"resume={resume}: this run directory has no complete checkpoint under {CHECKPOINTS}/")
        return found
    raise T5ForgeError(
        f"resume={resume}: not a t5forge checkpoint (RUN_DIR/checkpoints/step-NNNNNNNN) nor a run directory; "
        f"to start from pretrained weights instead, set model.checkpoint_path"
    )


# ---------------------------------------------------------------------------------------------
# Saving


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` to disk before the rename publishes it."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


class Checkpointer:
    """Writes `RUN_DIR/checkpoints/step-NNNNNNNN/` atomically and keeps the last `keep_last`.

    `world` is anything with `rank` and `world_size` (t5forge.distributed.World); None means
    a single process. `keep_last=None` keeps every checkpoint.
    """

    def __init__(self, run_dir: str | Path, keep_last: int | None = None, world: Any = None):
        if keep_last is not None and keep_last < 1:
            raise T5ForgeError(f"checkpoint.keep_last must be at least 1 (or null to keep all), got {keep_last}")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.keep_last = keep_last
        self.rank = getattr(world, "rank", 0)
        self.world_size = getattr(world, "world_size", 1)
        if self.rank == 0:
            run_lock.acquire(self.run_dir)  # nothing is removed or renamed without it
            self.remove_partial()

    # Collectives; no-ops in a single process. Kept as methods so another launcher can override.
    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list:
        """One object from every rank, in rank order (on every rank)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def remove_partial(self) -> list[Path]:
        """Delete `.tmp` directories left by a save that did not finish; settle an unfinished swap."""
        removed = []
        if self.root.is_dir():
            for child in sorted(self.root.iterdir()):
                match = SWAPPED_DIR.match(child.name)
                if match and child.is_dir():
                    current = self.root / step_dir_name(int(match.group(1)))
                    if current.is_dir():  # the new copy was published: the old one is surplus
                        shutil.rmtree(child)
                    else:  # the new copy never appeared: the old one is that step again
                        log.warning("restoring checkpoint %s (a re-save of that step was interrupted)", current)
                        os.rename(child, current)
                if PARTIAL_DIR.match(child.name) and child.is_dir():
                    log.warning("removing incomplete checkpoint %s (a save was interrupted)", child)
                    shutil.rmtree(child)
                    removed.append(child)
        return removed

    def latest(self) -> Path | None:
        return latest(self.run_dir)

    def save(
        self,
        *,
        model: torch.nn.Module,
        tokenizer: Any,
        optimizer: torch.optim.Optimizer,
        train_state: TrainState,
        data_state: Any,
        config_text: str,
        rng_state: dict | None = None,
    ) -> Path:
        """Save a checkpoint at `train_state.step`; call on every rank. Returns its directory."""
        rng_states = self.gather(rng.capture() if rng_state is None else rng_state)
        data_states = self.gather(data_state)
        final = self.root / step_dir_name(train_state.step)
        if self.rank == 0:
            self._write(final, model, tokenizer, optimizer, train_state, rng_states, data_states, config_text)
        self.barrier()
        return final

    def _write(self, final, model, tokenizer, optimizer, train_state, rng_states, data_states, config_text) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        run_lock.acquire(self.run_dir)
        self.remove_partial()
        tmp = final.with_name(final.name + ".tmp")
        needed = bytes_needed(unwrap_model(model), optimizer)
        check_free_space(self.root, needed)
        tmp.mkdir()
        try:
            save_model_dir(unwrap_model(model), tokenizer, tmp)
            torch.save(
                {"optimizer_class": type(optimizer).__name__, "state_dict": optimizer.state_dict()},
                tmp / "optimizer.pt",
            )
            torch.save({"world_size": self.world_size, "ranks": rng_states}, tmp / "rng.pt")
            torch.save({"world_size": self.world_size, "ranks": data_states}, tmp / "data.pt")
            (tmp / "config.yaml").write_text(config_text)
            train_state.save(tmp / "train_state.json")
            write_manifest(tmp)  # last: a manifest vouches for every file before it
            _fsync_tree(tmp)
        except Exception as err:
            clear = disk_full_error(err, self.root, needed)
            if clear is None:
                raise  # not the disk: the .tmp stays for a look and is removed by the next start
            shutil.rmtree(tmp, ignore_errors=True)
            raise clear from None
        if final.exists():
            # The same step saved again (e.g. a final save right after resuming): the old copy
            # stays a resumable checkpoint (`.old`) until the new one is published.
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.root)
        self._purge(train_state.step)

    def _purge(self, current_step: int) -> None:
        complete = list_checkpoints(self.run_dir)
        # Steps after the one just written belong to a discarded history (the run was resumed
        # from an older checkpoint); left in place, resume=auto would jump back to them.
        newer = [p for p in complete if checkpoint_step(p) > current_step]
        kept = [p for p in complete if checkpoint_step(p) <= current_step]
        # keep_last counts intact checkpoints only, so a damaged one never costs the last good one.
        intact = [p for p in kept if damage(p) is None]
        old = intact[: -self.keep_last] if self.keep_last is not None else []
        if old:
            old += [p for p in kept if p not in intact and checkpoint_step(p) < checkpoint_step(old[-1])]
        for path in newer:
            log.warning("removing checkpoint %s: it is newer than step %d, which this run resumed before", path,
                        current_step)
            shutil.rmtree(path)
        for path in old:
            log.debug("removing checkpoint %s", path)  # routine rotation (checkpoint.keep_last): not a console line
            shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------
# Loading


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_model_weights(path: str | Path, model: torch.nn.Module, map_location=None) -> None:
    """Load `path/model.safetensors` into `model` strictly: every key present, every shape equal.

    Weights tied in the model (one tensor under two names) are stored once; either name counts.
    """
    from safetensors import safe_open

    file = Path(path) / "model.safetensors"
    if not file.is_file():
        raise T5ForgeError(f"{file} not found; is {path} a complete checkpoint?")
    target = unwrap_model(model)
    expected = target.state_dict()
    if map_location is None:
        first = next(target.parameters(), None)
        map_location = first.device if first is not None else "cpu"
    aliases: dict[tuple, list[str]] = {}
    for key, tensor in expected.items():
        ptr = tensor.untyped_storage().data_ptr()
        alias = (ptr, tensor.storage_offset(), tuple(tensor.shape)) if ptr else key  # empty tensors alias nothing
        aliases.setdefault(alias, []).append(key)

    with safe_open(str(file), framework="pt", device=str(torch.device(map_location))) as f:
        stored = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        unexpected = sorted(set(stored) - set(expected))
        missing = sorted(
            key for group in aliases.values() if not any(k in stored for k in group) for key in group
        )
        mismatched = sorted(
            f"{key} {list(stored[key])} vs model {list(expected[key].shape)}"
            for key in set(stored) & set(expected)
            if stored[key] != tuple(expected[key].shape)
        )
        problems = []
        if missing:
            problems.append(f"missing from the checkpoint: {_describe(missing)}")
        if unexpected:
            problems.append(f"not in the model: {_describe(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatch: {_describe(mismatched)}")
        if problems:
            raise T5ForgeError(
                f"{file} does not fit this model ({'; '.join(problems)}); "
                f"resume with the model config the checkpoint was written with (its config.yaml)"
            )
        tensors = {key: f.get_tensor(key) for key in stored}
    for group in aliases.values():
        present = next(k for k in group if k in tensors)
        for key in group:
            tensors.setdefault(key, tensors[present])
    target.load_state_dict(tensors, strict=True)


def _read(file: Path, read):
    """`read()` with any library error (truncated pickle, bad safetensors header, bad JSON) as one line."""
    try:
        return read()
    except T5ForgeError:
        raise
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise T5ForgeError(
            f"{file} is unreadable ({type(err).__name__}: {first[:200]}); the checkpoint is damaged: "
            "resume from another one (resume=auto skips damaged checkpoints that have a manifest.json)"
        ) from None


def _rank_entry(file: Path, payload: Any, rank: int, world_size: int) -> Any:
    if not isinstance(payload, dict) or "ranks" not in payload:
        raise T5ForgeError(f"{file} is not a t5forge checkpoint file")
    if payload["world_size"] != world_size:
        raise T5ForgeError(
            f"{file} was written by {payload['world_size']} processes and this run has {world_size}; "
            f"per-process state (data position, RNG) cannot be carried over: resume with {payload['world_size']} processes "
            f"(torchrun --nproc_per_node {payload['world_size']})"
        )
    return payload["ranks"][rank]


def load(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    map_location=None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[TrainState, dict, Any]:
    """Restore model weights (strictly) and optimizer state from a checkpoint directory.

    Returns `(train_state, rng_state, data_state)` for this rank; the caller restores the RNGs
    (`rng.restore`) and the loader (`loader.load_state_dict`) once they are built. `map_location`
    defaults to the model's device. `optimizer=None` loads the weights and counters only.
    """
    path = Path(path)
    missing = missing_files(path)
    if missing:
        raise T5ForgeError(f"{path} is not a complete t5forge checkpoint: it lacks {', '.join(missing)}")
    if map_location is None:
        first = next(unwrap_model(model).parameters(), None)
        map_location = first.device if first is not None else "cpu"
    _read(path / "model.safetensors", lambda: load_model_weights(path, model, map_location=map_location))
    if optimizer is not None:
        saved = _read(path / "optimizer.pt",
                      lambda: torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True))
        if saved["optimizer_class"] != type(optimizer).__name__:
            raise T5ForgeError(
                f"{path / 'optimizer.pt'} holds {saved['optimizer_class']} state but this run uses "
                f"{type(optimizer).__name__}; resume with the same optim.name"
            )
        try:
            optimizer.load_state_dict(saved["state_dict"])
        except ValueError as err:
            raise T5ForgeError(f"{path / 'optimizer.pt'} does not fit this optimizer: {err}") from None
    train_state = _read(path / "train_state.json", lambda: TrainState.load(path / "train_state.json"))
    # Our own pickles from our own run; the loader state may hold arbitrary Python objects.
    rng_file, data_file = path / "rng.pt", path / "data.pt"
    rng_state = _rank_entry(rng_file, _read(rng_file, lambda: torch.load(rng_file, weights_only=True)), rank, world_size)
    data_state = _rank_entry(data_file, _read(data_file, lambda: torch.load(data_file, weights_only=False)), rank,
                             world_size)
    return train_state, rng_state, data_state
