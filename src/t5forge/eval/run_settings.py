"""The evaluation settings of a training run, read back from the config.yaml it saved.

`t5forge evaluate RUN_DIR` (or a checkpoint) scores what the run itself scored: the same held-out
files, input length, noise, tokenizer, batch size, seed and precision, and for a fine-tuning run
the same SNI prompts or seq2seq files and lengths. Every checkpoint holds the config of the run
that wrote it (train/checkpoint.py), and the run directory holds one too; the checkpoint's wins,
since a run resumed with other settings writes a new run-level file.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from t5forge import run_layout
from t5forge.errors import T5ForgeError

CONFIG_FILE = run_layout.RUN_CONFIG


@dataclass(frozen=True)
class RunSettings:
    cfg: object  # t5forge.config.RunConfig
    source: Path  # the config.yaml it was read from
    world_size: int  # processes the run trained with (its micro-batch depends on it)


def find_run_config(model_dir: Path) -> Path | None:
    """The config.yaml belonging to a checkpoint directory (its own, else its run directory's)."""
    return run_layout.run_config_of(model_dir)


def run_world_size(model_dir: Path) -> int:
    """The number of processes that wrote a checkpoint (data.pt records it); 1 when unknown."""
    data_file = model_dir / run_layout.DATA
    if not data_file.is_file():
        return 1
    import torch

    try:
        payload = torch.load(data_file, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 (a damaged data.pt only costs the exact micro-batch size)
        return 1
    size = payload.get("world_size") if isinstance(payload, dict) else None
    return size if isinstance(size, int) and size >= 1 else 1


def load_run_settings(model_dir: Path) -> RunSettings | None:
    """The run config of the checkpoint in `model_dir`, or None for a plain model directory."""
    from t5forge.config_files import load_config

    path = find_run_config(model_dir)
    if path is None:
        return None
    try:
        cfg = load_config([f"config={path}"])
    except T5ForgeError as err:
        raise T5ForgeError(f"{err} (the settings of the run that wrote {model_dir}, which evaluation "
                           "defaults to)") from None
    return RunSettings(cfg=cfg, source=path, world_size=run_world_size(model_dir))


def micro_batch_size(settings: RunSettings) -> int:
    """Examples per evaluation batch in the run: one rank's micro-batch (pre-training's held-out
    batches) or, when fine-tuning, the micro-batch generation ran with."""
    o = settings.cfg.optim
    per_rank = o.batch_size // max(settings.world_size, 1)
    return max(per_rank // max(o.grad_acc, 1), 1)


def heldout_config(settings: RunSettings | None, *, files, text_field, input_length, noise_density,
                   mean_noise_span_length, seed, batch_size, batches):
    """The RunConfig that pretrain's own held-out loader and evaluator (train/pretrain.py) would be
    built from, with every option that is not None replacing the run's value. Without a run, the
    defaults are RunConfig's (nanoT5's): 512-token inputs, density 0.15, spans of 3, seed 2137.
    Returns (cfg, micro-batch size, requested batches or None for all)."""
    from t5forge.config import RunConfig

    uses_run = settings is not None and settings.cfg.mode == "pt"
    cfg = settings.cfg if uses_run else RunConfig()
    d = cfg.data
    data = dataclasses.replace(
        d,
        validation_files=list(files) if files else list(d.validation_files if uses_run else []),
        text_field=text_field if text_field is not None else d.text_field,
        input_length=input_length if input_length is not None else d.input_length,
        mlm_probability=noise_density if noise_density is not None else d.mlm_probability,
        mean_noise_span_length=mean_noise_span_length if mean_noise_span_length is not None
        else d.mean_noise_span_length,
        num_workers=0,
    )
    micro = batch_size if batch_size is not None else (micro_batch_size(settings) if uses_run else 16)
    # a run without in-run evaluation (eval.steps=0) leaves the default at "all"
    requested = batches if batches is not None else ((cfg.eval.steps or None) if uses_run else None)
    cfg = dataclasses.replace(
        cfg, data=data, seed=seed if seed is not None else cfg.seed,
        optim=dataclasses.replace(cfg.optim, batch_size=micro, grad_acc=1),
        # "all batches" is an evaluation that stops where the files end
        eval=dataclasses.replace(cfg.eval, steps=requested or sys.maxsize),
    )
    return cfg, micro, requested
