"""The named parts of a checkpoint: the stateful objects a run saves, and how each lies on disk.

A part is anything with `state_dict()` and `load_state_dict(state)` (torchtitan's Stateful): a
module, an optimizer, a data loader, an EMA of the weights. The run builder (train/run_builder.py)
registers a run's parts by name; the Checkpointer saves the mapping and `load_parts` restores it in
place, in the mapping's order, so adding run state is one more entry there and nothing here.

How a part is stored:
- a part NAME without storage of its own goes to `NAME.pt` (torch.save of its `state_dict()`,
  rank 0's copy; loaded on the CPU, the part copies its state where it lives). Wrapped in
  `PerRank`, every rank's state is gathered to rank 0 and stored as
  `{"world_size": W, "ranks": [state of rank 0, 1, ...]}`; each rank reads its own back. A part
  that can go on with another number of processes takes every rank's states instead
  (`load_rank_states(states)`): the pre-training and fine-tuning loaders re-deal the data position,
  RNGStreams reseeds; any other per-rank part refuses a run with another number of processes.
- a part with `checkpoint_files` and `save_files(directory)` / `load_files(directory, map_location)`
  stores itself: the model (a t5forge model directory: model.safetensors, model_config.json,
  tokenizer files), the optimizer (optimizer.pt), the train state (train_state.json) and the run
  config (config.yaml). Their formats are those of every checkpoint t5forge wrote before parts
  existed, so old checkpoints load unchanged.

Sharded runs (distributed.strategy=fsdp): the model and optimizer parts hold DTensor shards. Before
rank 0 writes, every rank calls `stage()`: the full (unsharded) state dicts are gathered to rank 0's
CPU (torch.distributed.checkpoint.state_dict, full_state_dict=True), and written in the same format
as a single process's, the optimizer's keyed by parameter index as `optimizer.state_dict()` keys it.
So a checkpoint of N sharded ranks is a plain checkpoint: `t5forge export`, `load_model` and a
single process read it, and loading it into a sharded model (every rank reads the full files and
keeps its shards) works for any number of ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import torch

from t5forge import run_layout as layout
from t5forge.errors import T5ForgeError
from t5forge.model.load import legacy_renames, save_model_dir
from t5forge.model.load import unwrap as unwrap_model  # strips DDP / torch.compile wrappers
from t5forge.train import rng
from t5forge.train.state import TrainState


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def stores_itself(part: Any) -> bool:
    return hasattr(part, "checkpoint_files") and hasattr(part, "save_files")


def part_files(name: str, part: Any) -> tuple[str, ...]:
    """The files part `name` occupies in a checkpoint."""
    return tuple(part.checkpoint_files) if stores_itself(part) else (f"{name}.pt",)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) state."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# ---------------------------------------------------------------------------------------------
# Parts


class PerRank:
    """A part whose state differs by rank (data position, RNG streams): saved from every rank."""

    per_rank = True

    def __init__(self, inner: Any, weights_only: bool = False):
        self.inner = inner
        # weights_only: the state holds only tensors and plain values (torch.load's safe mode);
        # a loader's state may hold arbitrary Python objects (our own pickles, from our own run).
        self.weights_only = weights_only

    def state_dict(self) -> Any:
        return self.inner.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.inner.load_state_dict(state)

    def load_ranks(self, file: Path, payload: Any, rank: int, world_size: int) -> None:
        """Restore from a saved `{"world_size", "ranks"}` payload: every rank's states to a part that
        takes them (`load_rank_states`), else this rank's own, refused for another number of processes."""
        take_all = getattr(self.inner, "load_rank_states", None)
        if take_all is None:
            self.inner.load_state_dict(rank_entry(file, payload, rank, world_size))
            return
        if not isinstance(payload, dict) or "ranks" not in payload:
            raise T5ForgeError(f"{file} is not a t5forge checkpoint file")
        take_all(payload["ranks"])


class Value:
    """A plain value held as a part (what a caller saves as-is or wants read back as-is)."""

    def __init__(self, value: Any = None):
        self.value = value

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state: Any) -> None:
        self.value = state


class RNGStreams:
    """Python, NumPy, torch CPU and CUDA RNGs (train/rng.py); restored last by the run builder's order.

    The streams of N ranks cannot be mapped onto M: with `reseed` (called with the saved number of
    ranks), a checkpoint of another number of processes reseeds them instead (the run builder's
    reseed: from the seed, the step and the rank); without it, such a checkpoint is refused."""

    def __init__(self, rank: int = 0, world_size: int = 1, reseed=None):
        self.rank, self.world_size, self.reseed = rank, world_size, reseed
        self.reseeded_from = None  # the saved number of ranks, once a load reseeded instead of restoring

    def state_dict(self) -> dict:
        return rng.capture()

    def load_state_dict(self, state: dict) -> None:
        rng.restore(state)

    def load_rank_states(self, states: list) -> None:
        if len(states) == self.world_size:
            rng.restore(states[self.rank])
            self.reseeded_from = None
        elif self.reseed is None:
            raise T5ForgeError(
                f"the checkpoint's RNG states are those of {len(states)} processes and this run has "
                f"{self.world_size}: resume with {len(states)} processes (torchrun --nproc_per_node {len(states)})"
            )
        else:
            self.reseed(len(states))
            self.reseeded_from = len(states)


def rng_reseeded_from(parts: Mapping[str, Any]) -> int | None:
    """The saved number of ranks when the last load of `parts` reseeded their RNG streams (a
    checkpoint of another number of processes) instead of restoring them; None otherwise."""
    streams = getattr(parts.get("rng"), "inner", None)
    return getattr(streams, "reseeded_from", None)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are DTensor shards (FSDP2's fully_shard)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in unwrap_model(model).parameters())


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


class ModelPart:
    """The weights as a t5forge model directory (so a checkpoint is loadable by `load_model`)."""

    checkpoint_files = layout.MODEL_FILES

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None):
        self.model, self.tokenizer = model, tokenizer
        self._staged: dict | None = None

    def stage(self) -> None:
        """Every rank, before rank 0 writes: a sharded model's full weights, gathered to rank 0's CPU
        (a collective; the other ranks keep nothing). A no-op for a plain model."""
        if is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            self._staged = get_model_state_dict(unwrap_model(self.model), options=_full_options(cpu_offload=True))

    def unstage(self) -> None:
        self._staged = None

    def state_dict(self) -> dict:
        return self._staged if self._staged is not None else unwrap_model(self.model).state_dict()

    def load_state_dict(self, state: dict) -> None:
        load_full_weights(self.model, state)

    def nbytes(self) -> int:
        return tensor_bytes(self.state_dict())

    def save_files(self, directory: Path) -> None:
        save_model_dir(unwrap_model(self.model), self.tokenizer, directory, state_dict=self._staged)

    def load_files(self, directory: Path, map_location) -> None:
        file = directory / layout.MODEL_WEIGHTS
        read(file, lambda: load_model_weights(directory, self.model, map_location=map_location))


class OptimizerPart:
    """optimizer.pt: {"optimizer_class": name, "state_dict": optimizer.state_dict()}; a sharded
    model's optimizer state is saved full, in the same layout (`model` names its parameters)."""

    checkpoint_files = (layout.OPTIMIZER,)

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None):
        self.optimizer, self.model = optimizer, model
        self._staged: dict | None = None

    def _sharded(self) -> bool:
        return self.model is not None and is_sharded(self.model)

    def stage(self) -> None:
        """Every rank, before rank 0 writes: a sharded model's full optimizer state on rank 0's CPU,
        keyed by parameter index as a single process's `optimizer.state_dict()` (a collective)."""
        if self._sharded():
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            by_name = get_optimizer_state_dict(unwrap_model(self.model), self.optimizer,
                                               options=_full_options(cpu_offload=True))
            self._staged = _indexed(by_name, self._names(), self.optimizer) if by_name else {}

    def unstage(self) -> None:
        self._staged = None

    def _names(self) -> list[str]:
        """The parameter names in the optimizer's order: the index a state_dict gives each one."""
        names = {p: n for n, p in unwrap_model(self.model).named_parameters()}
        return [names[p] for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        state = self._staged if self._staged is not None else self.optimizer.state_dict()
        return {"optimizer_class": type(self.optimizer).__name__, "state_dict": state}

    def load_state_dict(self, state: dict, source: str = "the checkpoint's optimizer state") -> None:
        if state["optimizer_class"] != type(self.optimizer).__name__:
            raise T5ForgeError(
                f"{source} holds {state['optimizer_class']} state but this run uses "
                f"{type(self.optimizer).__name__}; resume with the same optim.name"
            )
        try:
            if self._sharded():
                from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

                by_name = _named(state["state_dict"], self._names())
                set_optimizer_state_dict(unwrap_model(self.model), self.optimizer, by_name, options=_full_options())
                for group, saved in zip(self.optimizer.param_groups, state["state_dict"]["param_groups"]):
                    group.update({k: v for k, v in saved.items() if k != "params"})  # as saved (betas a tuple)
            else:
                self.optimizer.load_state_dict(state["state_dict"])
        except (ValueError, KeyError, IndexError, RuntimeError) as err:
            raise T5ForgeError(f"{source} does not fit this optimizer: {type(err).__name__}: {err}") from None

    def nbytes(self) -> int:
        if self._staged is not None:
            return tensor_bytes(self._staged)
        return sum(tensor_bytes(state) for state in self.optimizer.state.values())

    def save_files(self, directory: Path) -> None:
        torch.save(self.state_dict(), directory / layout.OPTIMIZER)

    def load_files(self, directory: Path, map_location) -> None:
        file = directory / layout.OPTIMIZER
        saved = read(file, lambda: torch.load(file, map_location=map_location, weights_only=True))
        self.load_state_dict(saved, source=str(file))


def _indexed(by_name: dict, names: list[str], optimizer) -> dict:
    """A state keyed by parameter names (torch.distributed.checkpoint's) keyed by index instead, with
    the optimizer's own param_groups: what `optimizer.state_dict()` of one process holds."""
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[n]: v for n, v in by_name["state"].items()},
            "param_groups": optimizer.state_dict()["param_groups"]}


def _named(indexed: dict, names: list[str]) -> dict:
    """The inverse of _indexed, for this optimizer's parameters (`names`, in its order)."""
    n_saved = sum(len(g["params"]) for g in indexed["param_groups"])
    if n_saved != len(names):
        raise ValueError(f"it holds {n_saved} parameters and this optimizer {len(names)}")
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in indexed["param_groups"]]
    return {"state": {names[i]: v for i, v in indexed["state"].items()}, "param_groups": groups}


class TrainStatePart:
    """train_state.json; loading updates the TrainState in place (the loop holds the same object)."""

    checkpoint_files = (layout.TRAIN_STATE,)

    def __init__(self, state: TrainState):
        self.state = state

    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, state: dict) -> None:
        self._take(TrainState.from_dict(state))

    def _take(self, saved: TrainState) -> None:
        import dataclasses

        for f in dataclasses.fields(saved):
            setattr(self.state, f.name, getattr(saved, f.name))

    def save_files(self, directory: Path) -> None:
        self.state.save(directory / layout.TRAIN_STATE)

    def load_files(self, directory: Path, map_location) -> None:
        file = directory / layout.TRAIN_STATE
        self._take(read(file, lambda: TrainState.load(file)))


class RunConfigText:
    """config.yaml: the resolved config of the run that wrote the checkpoint (for `t5forge evaluate`
    and for people). Not restored: a resumed run's config comes from its own command line."""

    checkpoint_files = (layout.RUN_CONFIG,)

    def __init__(self, text: str):
        self.text = text

    def state_dict(self) -> str:
        return self.text

    def load_state_dict(self, state: str) -> None:
        pass

    def save_files(self, directory: Path) -> None:
        (directory / layout.RUN_CONFIG).write_text(self.text)

    def load_files(self, directory: Path, map_location) -> None:
        pass


def run_parts(*, model, tokenizer, optimizer, train_state: TrainState, data, config_text: str,
              rng_streams: Any = None) -> dict[str, Any]:
    """The parts of a t5forge run's checkpoint, in restore order (the RNGs last, so nothing restored
    after them draws from them). `data`: the train loader (anything with state_dict / load_state_dict).
    The names are the file names of checkpoints written before parts existed."""
    return {
        "model": ModelPart(model, tokenizer),
        "optimizer": OptimizerPart(optimizer, model),
        "train_state": TrainStatePart(train_state),
        "config": RunConfigText(config_text),
        "data": PerRank(data),
        "rng": PerRank(rng_streams if rng_streams is not None else RNGStreams(), weights_only=True),
    }


# ---------------------------------------------------------------------------------------------
# Reading


def read(file: Path, reader):
    """`reader()` with any library error (truncated pickle, bad safetensors header, bad JSON) as one line."""
    try:
        return reader()
    except T5ForgeError:
        raise
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise T5ForgeError(
            f"{file} is unreadable ({type(err).__name__}: {first[:200]}); the checkpoint is damaged: "
            "resume from another one (resume=auto skips damaged checkpoints that have a manifest.json)"
        ) from None


def rank_entry(file: Path, payload: Any, rank: int, world_size: int) -> Any:
    if not isinstance(payload, dict) or "ranks" not in payload:
        raise T5ForgeError(f"{file} is not a t5forge checkpoint file")
    if payload["world_size"] != world_size:
        raise T5ForgeError(
            f"{file} was written by {payload['world_size']} processes and this run has {world_size}; "
            f"per-process state (data position, RNG) cannot be carried over: resume with {payload['world_size']} processes "
            f"(torchrun --nproc_per_node {payload['world_size']})"
        )
    return payload["ranks"][rank]


def load_parts(path: str | Path, parts: Mapping[str, Stateful], *, map_location=None, rank: int = 0,
               world_size: int = 1) -> None:
    """Restore every part from checkpoint `path`, in order. `map_location` (default: the model
    part's device) is where the model and optimizer tensors are read to; other parts read to the CPU."""
    path = Path(path)
    missing = [f for name, part in parts.items() for f in part_files(name, part) if not (path / f).is_file()]
    if missing:
        raise T5ForgeError(
            f"{path} is not a complete t5forge checkpoint for this run: it lacks {', '.join(missing)}"
            + _unknown_part_hint(path, parts, missing)
        )
    if map_location is None:
        model = next((p.model for p in parts.values() if isinstance(p, ModelPart)), None)
        first = next(unwrap_model(model).parameters(), None) if model is not None else None
        map_location = first.device if first is not None else "cpu"
    for name, part in parts.items():
        if stores_itself(part):
            part.load_files(path, map_location)
            continue
        file = path / f"{name}.pt"
        per_rank = getattr(part, "per_rank", False)
        weights_only = getattr(part, "weights_only", False)
        payload = read(file, lambda: torch.load(file, map_location="cpu", weights_only=weights_only))
        try:
            if per_rank:
                part.load_ranks(file, payload, rank, world_size)
            else:
                part.load_state_dict(payload)
        except T5ForgeError:
            raise
        except Exception as err:  # noqa: BLE001 (a part's own complaint, with the file named)
            raise T5ForgeError(f"{file} does not fit this run's part {name!r}: {type(err).__name__}: {err}") from None


def _unknown_part_hint(path: Path, parts: Mapping[str, Any], missing: list[str]) -> str:
    """Say so when what is missing is a part this run registers beyond the standard ones."""
    standard = set(layout.REQUIRED_FILES)
    extra = [f for f in missing if f not in standard]
    if not extra:
        return ""
    return (f" (this run saves parts the checkpoint was written without: {', '.join(extra)}; resume from a "
            "checkpoint of a run with the same parts, or start fresh with resume=false in a new out_dir)")


# ---------------------------------------------------------------------------------------------
# The model's weights, strictly


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_model_weights(path: str | Path, model: torch.nn.Module, map_location=None) -> None:
    """Load `path/model.safetensors` into `model` strictly: every key present, every shape equal.

    Weights tied in the model (one tensor under two names) are stored once; either name counts.
    """
    from safetensors import safe_open

    file = Path(path) / layout.MODEL_WEIGHTS
    if not file.is_file():
        raise T5ForgeError(f"{file} not found; is {path} a complete checkpoint?")
    target = unwrap_model(model)
    expected = target.state_dict()
    sharded = is_sharded(target)
    if sharded:
        map_location = "cpu"  # the full tensors; each rank copies its shards to its device
    if map_location is None:
        first = next(target.parameters(), None)
        map_location = first.device if first is not None else "cpu"
    aliases: dict[tuple, list[str]] = {}
    for key, tensor in expected.items():
        ptr = 0 if sharded else tensor.untyped_storage().data_ptr()  # a DTensor's storage is its shard's
        alias = (ptr, tensor.storage_offset(), tuple(tensor.shape)) if ptr else key  # empty tensors alias nothing
        aliases.setdefault(alias, []).append(key)

    with safe_open(str(file), framework="pt", device=str(torch.device(map_location))) as f:
        renames = legacy_renames(f.keys(), expected)  # written before a parameter was renamed
        stored = {renames.get(key, key): tuple(f.get_slice(key).get_shape()) for key in f.keys()}
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
        tensors = {renames.get(key, key): f.get_tensor(key) for key in f.keys()}
    for group in aliases.values():
        present = next(k for k in group if k in tensors)
        for key in group:
            tensors.setdefault(key, tensors[present])
    load_full_weights(target, tensors)


def load_full_weights(model: torch.nn.Module, tensors: dict) -> None:
    """Load full (unsharded) weights strictly; a sharded model keeps each rank's shards of them."""
    target = unwrap_model(model)
    if is_sharded(target):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(target, tensors, options=_full_options(strict=True))
    else:
        target.load_state_dict(tensors, strict=True)
