"""Atomic, resumable checkpoints of a training run, and resume resolution (`false | auto | path`).

Layout (one directory per saved step, everything needed to continue the run exactly; the names
are run_layout.py's, each part's storage is checkpoint_parts.py's):

    RUN_DIR/checkpoints/step-00001000/
        model.safetensors, model_config.json, tokenizer files   part "model" (a model directory)
        optimizer.pt       part "optimizer": {"optimizer_class": name, "state_dict": optimizer.state_dict()}
        train_state.json   part "train_state": TrainState (step, tokens seen, time spent, best eval, ...)
        rng.pt             part "rng": {"world_size": W, "ranks": [rng.capture() of rank 0, 1, ...]}
        data.pt            part "data": {"world_size": W, "ranks": [loader.state_dict() of rank 0, 1, ...]}
        config.yaml        part "config": the resolved run config
        NAME.pt            any other part the run registers (an EMA, a router bias, ...)

`Checkpointer.save(parts, step)` takes the run's named parts (a mapping name -> object with
state_dict / load_state_dict); `load_parts(path, parts)` restores them in place.

A checkpoint is written under `step-NNNNNNNN.tmp/`, every file is fsync'd, and only then is the
directory renamed: a directory without the `.tmp` suffix is complete, and a `.tmp` left by a crash
is never resumed from (it is deleted the next time a Checkpointer starts or saves). Older complete
checkpoints beyond `keep_last` are deleted only after the new one is complete. The last file written
is `manifest.json` (sizes and checksums, run_layout.py): resume=auto skips a checkpoint whose
files do not match it, with a warning, and takes the newest intact one. Saving a step that already
exists moves the old copy to `step-NNNNNNNN.old` (still a complete checkpoint of that step, used
when the new one never appeared) so no crash point leaves fewer complete checkpoints. Only the
process holding the run directory's lock (run_lock.py) removes or renames anything.

Distributed runs: every rank calls `save`; the per-rank RNG and data-loader states are gathered to
rank 0, which alone writes, then all ranks meet at a barrier. The model is saved from rank 0's
replica (DDP keeps replicas identical); a sharded (FSDP) model's and optimizer's full state dicts
are first gathered to rank 0 (the parts' `stage()`, checkpoint_parts.py), so the files are the same
as a single process's, and every rank loads its shards from them: one copy whatever the world size.
data.pt and rng.pt record the world size that wrote them (and the loader's state its
data.num_workers and batch size): a run resumed on another number of processes hands every rank's
states to the loader, which re-deals the data position (data/redeal.py), and reseeds the RNG
streams (checkpoint_parts.RNGStreams).
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from t5forge.errors import T5ForgeError
from t5forge.run_layout import (  # noqa: F401  (the layout's names, as this module's callers know them)
    CHECKPOINTS, MANIFEST, PARTIAL_DIR, REQUIRED_FILES, STEP_DIR, SWAPPED_DIR, checkpoint_step, damage, latest,
    list_checkpoints, missing_files, step_dir_name, write_manifest,
)
from t5forge.train import run_lock
from t5forge.train.checkpoint_files import check_free_space, disk_full_error
from t5forge.train.checkpoint_parts import (  # noqa: F401  (re-exported: the loading API of checkpoints)
    ModelPart, OptimizerPart, PerRank, Stateful, TrainStatePart, Value, load_model_weights, load_parts, part_files,
    run_parts, stores_itself, tensor_bytes, unwrap_model,
)
from t5forge.train.state import TrainState

log = logging.getLogger(__name__)


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

    def save(self, parts: Mapping[str, Stateful], step: int) -> Path:
        """Save the named `parts` (checkpoint_parts.py) as the checkpoint of `step`; call on every rank.
        Returns its directory."""
        # Collective: every rank's per-rank states, in the same order on every rank.
        gathered = {name: self.gather(part.state_dict()) for name, part in parts.items()
                    if not stores_itself(part) and getattr(part, "per_rank", False)}
        # Collective too: a sharded model's and optimizer's full state, gathered to rank 0.
        staged = [part for part in parts.values() if hasattr(part, "stage")]
        final = self.root / step_dir_name(step)
        try:
            for part in staged:
                part.stage()
            if self.rank == 0:
                self._write(final, parts, gathered, step)
        finally:
            for part in staged:
                part.unstage()
        self.barrier()
        return final

    def _write(self, final: Path, parts: Mapping[str, Any], gathered: dict, step: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        run_lock.acquire(self.run_dir)
        self.remove_partial()
        tmp = final.with_name(final.name + ".tmp")
        # Rank 0's state of the parts stored as NAME.pt (the self-storing ones take theirs while writing).
        own = {name: part.state_dict() for name, part in parts.items()
               if not stores_itself(part) and name not in gathered}
        needed = (sum(part.nbytes() for part in parts.values() if hasattr(part, "nbytes"))
                  + tensor_bytes(own) + tensor_bytes(gathered) + (4 << 20))  # + tokenizer, config, pickle framing
        check_free_space(self.root, needed)
        tmp.mkdir()
        try:
            for name, part in parts.items():
                if stores_itself(part):
                    part.save_files(tmp)
                elif name in gathered:
                    torch.save({"world_size": self.world_size, "ranks": gathered[name]}, tmp / f"{name}.pt")
                else:
                    torch.save(own[name], tmp / f"{name}.pt")
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
        self._purge(step)

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


def load(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    map_location=None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[TrainState, dict, Any]:
    """Restore model weights (strictly) and optimizer state from a checkpoint directory: the values
    of a standard run checkpoint, for tools and tests (a run restores its parts in place, load_parts).

    Returns `(train_state, rng_state, data_state)` for this rank; the caller restores the RNGs
    (`rng.restore`) and the loader (`loader.load_state_dict`) once they are built. `map_location`
    defaults to the model's device. `optimizer=None` loads the weights and counters only.
    """
    state, rng_state, data_state = TrainState(), Value(), Value()
    parts = {"model": ModelPart(model)}
    if optimizer is not None:
        parts["optimizer"] = OptimizerPart(optimizer, model)
    parts.update(train_state=TrainStatePart(state), rng=PerRank(rng_state, weights_only=True),
                 data=PerRank(data_state))
    path = Path(path)
    missing = missing_files(path)  # the whole checkpoint, even where only some parts are read
    if missing:
        raise T5ForgeError(f"{path} is not a complete t5forge checkpoint: it lacks {', '.join(missing)}")
    load_parts(path, parts, map_location=map_location, rank=rank, world_size=world_size)
    return state, rng_state.value, data_state.value
