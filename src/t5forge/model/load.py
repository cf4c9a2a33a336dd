"""Saving and loading models: t5forge model directories, checkpoints, run directories, HF directories.

A t5forge model directory holds `model.safetensors` (t5forge parameter names), `model_config.json`
(the T5Config) and the tokenizer files. A checkpoint (`RUN/checkpoints/step-NNNNNNNN/`) is such a
directory plus the rest of the run's state; `load_model` on a run directory takes its newest
complete checkpoint, by the rule resume=auto uses (run_layout.py: not `.tmp`, manifest sizes and
checksums verified; a damaged newer one is skipped with a warning). An HF directory holds
`config.json` and `model.safetensors` / `pytorch_model.bin`. Parameters saved under an older
t5forge name (`LEGACY_NAMES`) are renamed on reading, so checkpoints written before a rename load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from t5forge import run_layout
from t5forge.errors import T5ForgeError
from t5forge.model.config import T5Config
from t5forge.model.hf import load_hf, load_state_dict_strict, read_weights, write_weights

WEIGHTS = run_layout.MODEL_WEIGHTS
CONFIG = run_layout.MODEL_CONFIG
# Old t5forge parameter name -> its name now (the stack's position scheme became `stack.position`).
LEGACY_NAMES = {
    "encoder.relative_bias.weight": "encoder.position.weight",
    "decoder.relative_bias.weight": "decoder.position.weight",
}
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def unwrap(model):
    """The bare T5 inside torch.compile / DDP wrappers (their state_dict keys carry prefixes)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            return model
        model = inner


def save_model_dir(model, tokenizer, directory, state_dict=None) -> Path:
    """Write model.safetensors + model_config.json (+ tokenizer files when a tokenizer is given).
    `state_dict`: the weights to write instead of the model's own (a sharded model's, gathered)."""
    model = unwrap(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = model.state_dict() if state_dict is None else state_dict
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    write_weights(sd, directory / WEIGHTS)
    (directory / CONFIG).write_text(json.dumps(model.config.to_json_dict(), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def newest_checkpoint(run_or_checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory (or its checkpoints/), or None."""
    return run_layout.newest_model_checkpoint(run_or_checkpoints_dir)


def _parse_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) in _DTYPES:
        return _DTYPES[str(dtype)]
    raise T5ForgeError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")


def legacy_renames(stored, expected) -> dict[str, str]:
    """{stored name: the model's name} for each name in `stored` that LEGACY_NAMES renames to a
    name the model has (`expected`) and that the model no longer has itself. Keyed by names only,
    so a checkpoint loader that reads lazily (train/checkpoint.py) can use it too."""
    stored, expected = set(stored), set(expected)
    return {old: new for old, new in LEGACY_NAMES.items()
            if old in stored and old not in expected and new in expected and new not in stored}


def upgrade_state_dict(sd: dict, expected) -> dict:
    """`sd` with its legacy parameter names (LEGACY_NAMES) renamed to the names in `expected`."""
    renames = legacy_renames(sd, expected)
    return {renames.get(name, name): tensor for name, tensor in sd.items()}


def _load_model_dir(directory: Path, overrides: dict):
    from t5forge.model.t5 import T5

    config = T5Config.from_json_file(directory / CONFIG)
    if overrides:
        config = config.replace(**overrides)
    sd, path = read_weights(directory, names=(WEIGHTS,))
    model = T5(config)
    load_state_dict_strict(model, upgrade_state_dict(sd, model.state_dict()), str(path))
    return model


def _download(repo_id: str) -> Path:
    from t5forge.hub import HubUnavailable, snapshot

    patterns = ["config.json", "model.safetensors", "spiece.model", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json"]
    try:
        folder = snapshot(repo_id, patterns)
        if not (folder / "model.safetensors").is_file():  # older repos only have the .bin
            folder = snapshot(repo_id, patterns + ["pytorch_model.bin"])
    except HubUnavailable as err:
        raise T5ForgeError(
            f"model {repo_id!r} is not a local path, and {err}; pass a local HF or t5forge model directory "
            "(a run, checkpoint or `t5forge export` folder; for training: model.checkpoint_path=DIR)"
        ) from None
    return folder


def resolve_model_dir(path) -> Path:
    """The directory that actually holds the weights for `path` (see load_model)."""
    spec = str(path)
    p = Path(spec).expanduser()
    if not p.exists():
        looks_like_repo = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
        if looks_like_repo and not isinstance(path, Path):
            return _download(spec)
        raise T5ForgeError(f"model path {spec} does not exist")
    if p.is_file():
        if p.name in (WEIGHTS, CONFIG, "config.json", "pytorch_model.bin"):
            return p.parent
        raise T5ForgeError(f"{p} is a file; pass the directory holding the model (config + weights)")
    if (p / CONFIG).is_file() or (p / "config.json").is_file():
        return p
    checkpoint = newest_checkpoint(p)
    if checkpoint is not None:
        return checkpoint
    raise T5ForgeError(
        f"{p} is neither a model directory (model_config.json or config.json with weights), a checkpoint, "
        "nor a run directory with complete checkpoints/step-NNNNNNNN/"
    )


def load_model(path, device="cpu", dtype=None, **overrides):
    """(model, tokenizer) from an HF T5 directory, a t5forge model or checkpoint directory, or a run
    directory (its newest complete checkpoint). `overrides` replace T5Config fields, e.g.
    attention_backend="eager" or dropout_rate=0.0. The tokenizer is None if the directory has none."""
    dtype = _parse_dtype(dtype)
    directory = resolve_model_dir(path)
    if (directory / CONFIG).is_file():
        model = _load_model_dir(directory, overrides)
        tokenizer = None
        if (directory / "spiece.model").is_file() or (directory / "tokenizer.json").is_file():
            from t5forge.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(directory)
    else:
        model, tokenizer = load_hf(directory, **overrides)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise T5ForgeError(
            f"the tokenizer in {directory} has {tokenizer.vocab_size} ids but the model's vocab_size is "
            f"{model.config.vocab_size}; use the tokenizer the model was trained with"
        )
    refuse_nonfinite(model, directory)
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    return model, tokenizer


def first_nonfinite(model) -> str | None:
    """The name of the first weight holding a NaN or an infinity, or None when all are finite."""
    for name, tensor in unwrap(model).state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def refuse_nonfinite(model, source) -> None:
    """A T5ForgeError when a weight of `model` (read from `source`) is NaN or infinite: such a model
    diverged in training and would generate nothing but garbage."""
    bad = first_nonfinite(model)
    if bad is not None:
        raise T5ForgeError(
            f"{source}: weight {bad!r} holds non-finite values (NaN or inf); the run that wrote it diverged, "
            "use an earlier checkpoint"
        )

