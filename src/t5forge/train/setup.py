"""What a run needs before its loop starts: device, precision, tokenizer and model.

Shared by `t5forge pretrain` and `t5forge finetune`, so both start from weights the same way:
a fresh T5 of `model.name`'s architecture, or `model.checkpoint_path` (an HF T5 directory or any
t5forge model/checkpoint/run directory) for continued pre-training and fine-tuning.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from t5forge.config import RunConfig
from t5forge.errors import T5ForgeError

log = logging.getLogger(__name__)


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    """`auto` -> this rank's GPU when there is one, else the CPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise T5ForgeError(f"device={spec} but no CUDA device is visible; use device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def enable_fast_math(device: torch.device) -> None:
    """TF32 matmuls on Ampere+ GPUs (nanoT5 does the same); fp32 weights and reductions stay fp32.
    On CPU, subnormal floats (below 1.2e-38) are flushed to zero: x86 handles them in microcode,
    and AdamWScale's second moment of tiny gradients is full of them (its step took 0.21 s instead
    of 0.12 s at t5-v1.1-small on an AVX-512 Xeon). GPUs have no such slow path.
    Called before the first parallel op: worker threads inherit the setting when they start."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device.type == "cpu":
        torch.set_flush_denormal(True)  # False (and nothing changes) on CPUs without FTZ/DAZ


def autocast_for(precision: str, device: torch.device):
    """A zero-argument context factory: bf16 autocast (weights stay fp32) or nothing for fp32."""
    if precision == "bf16":
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext
    raise T5ForgeError(f"precision={precision!r} is unknown; use bf16 or fp32")


def load_run_tokenizer(cfg: RunConfig):
    """The tokenizer of `data.tokenizer`; with `model.checkpoint_path`, the checkpoint's own when it has one."""
    from t5forge.tokenizer import load_tokenizer

    if cfg.model.checkpoint_path:
        from t5forge.model.load import resolve_model_dir

        # The directory load_model will read (a model dir, a checkpoint, a run's newest checkpoint).
        directory = resolve_model_dir(cfg.model.checkpoint_path)
        if any((directory / name).is_file() for name in ("spiece.model", "tokenizer.json")):
            log.info("tokenizer: %s (from model.checkpoint_path; data.tokenizer is not used)", directory)
            return load_tokenizer(directory)
    return load_tokenizer(cfg.data.tokenizer)


def build_model(cfg: RunConfig, tokenizer, device: torch.device) -> torch.nn.Module:
    """A fresh T5 (T5's init, seeded by the caller) or the weights of `model.checkpoint_path`.

    The architecture comes from the checkpoint when there is one; dropout and the attention back end
    always come from the run config, so a fine-tuning run can change them.
    """
    from t5forge.model.t5 import T5
    from t5forge.plan import resolve_model_config

    m = cfg.model
    if m.checkpoint_path:
        from t5forge.model.load import load_model

        model, _ = load_model(m.checkpoint_path, dropout_rate=m.dropout_rate, attention_backend=m.attention)
    elif not m.random_init:
        from t5forge.model.load import load_model

        # Released weights of model.name (an HF directory, or a Hub id when online).
        model, _ = load_model(m.name, dropout_rate=m.dropout_rate, attention_backend=m.attention)
    else:
        model = T5(resolve_model_config(cfg))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise T5ForgeError(
            f"the tokenizer {cfg.data.tokenizer} has {tokenizer.vocab_size} ids but the model's "
            f"vocabulary has {model.config.vocab_size} rows; set model.vocab_size >= {tokenizer.vocab_size} "
            "(a multiple of 128 is fastest)"
        )
    return model.to(device)


# ---------------------------------------------------------------------------------------------
# The steps every run takes around its own data and evaluation (pretrain.py, finetune.py).


def launch(cfg: RunConfig, run) -> int:
    """Join the torchrun process group (if any), call `run(cfg, world)`, leave the group."""
    from t5forge.train.distributed import init_world, shutdown

    on_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    world = init_world("cuda" if on_gpu else "cpu")
    try:
        if cfg.logging.wandb and world.is_main:
            from t5forge.train.wandb_sink import check_usable

            check_usable()  # a missing wandb or W&B login fails before data and model are loaded
        return run(cfg, world)
    finally:
        shutdown(world)


def open_run_dir(cfg: RunConfig):
    """(run_dir, checkpoint to resume from or None); refuses to start afresh over existing checkpoints."""
    from pathlib import Path

    from t5forge.train import run_lock
    from t5forge.train.checkpoint import latest, resolve_resume

    run_dir = Path(cfg.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise T5ForgeError(f"out_dir={cfg.out_dir} is a file, not a directory; give a directory for the run")
    run_lock.acquire_for_rank(run_dir)  # one writer per run directory, before anything there is read or removed
    resume_from = resolve_resume(cfg.resume, run_dir)
    if resume_from is None and latest(run_dir) is not None:
        raise T5ForgeError(
            f"{run_dir} already holds checkpoints ({latest(run_dir).name}); continue it with resume=auto "
            "or start a new run in another out_dir"
        )
    return run_dir, resume_from


def resume_or_seed(resume_from, cfg: RunConfig, model, optimizer, loader, world):
    """The TrainState to start from: the checkpoint's (weights, optimizer, data position and RNGs
    restored), or a fresh one with this rank's dropout seed. Call after everything is built, so
    nothing built afterwards draws from the restored RNGs."""
    from t5forge.train import rng
    from t5forge.train.checkpoint import load as load_checkpoint
    from t5forge.train.state import TrainState

    if resume_from is None:
        rng.seed_all(cfg.seed + 1 + world.rank)  # dropout differs across ranks
        return TrainState()
    state, rng_state, data_state = load_checkpoint(
        resume_from, model, optimizer, rank=world.rank, world_size=world.world_size
    )
    loader.load_state_dict(data_state)
    rng.restore(rng_state)
    if world.is_main:
        print(f"resumed from {resume_from} at step {state.step}", flush=True)
    return state


def training_model(model, cfg: RunConfig, world, device):
    """The module the loop calls: DDP-wrapped under torchrun, compiled with model.compile (null: on CUDA); on CPU
    without it, the elementwise stretches compiled on their own (model.compile_elementwise)."""
    from t5forge.model import fused
    from t5forge.train.distributed import wrap_ddp

    compiled = compiles(cfg.model, device)
    if fused.wanted(cfg.model.compile_elementwise, device, compiled):
        log.info("residual adds, norms and gated activations: torch.compile'd loops (model.compile_elementwise)")
        model.compile_elementwise(True)
    wrapped = wrap_ddp(model, world, device)
    if not compiled:
        return wrapped
    if wrapped is not model and cfg.model.attention == "flex":
        # DDPOptimizer (dynamo's graph splitting at DDP bucket boundaries) cannot split graphs holding
        # FlexAttention's higher-order op (pytorch#137481): compile DDP's module as one graph, its
        # gradients all-reduced after the backward by DDP's hooks (no compute/communication overlap).
        torch._dynamo.config.optimize_ddp = False
        log.info("DDP + compile + flex: dynamo's DDP graph splitting off (torch._dynamo.config.optimize_ddp)")
    return torch.compile(wrapped)


def compiles(model_cfg, device) -> bool:
    """model.compile resolved: null = on for CUDA, off elsewhere."""
    if model_cfg.compile is not None:
        return model_cfg.compile
    return torch.device(device).type == "cuda"


def start_run_files(cfg: RunConfig, run_dir, state, resumed: bool, total_steps: int, world, summary: str):
    """Write config.yaml and print the run summary (rank 0); return the MetricsLogger (a no-op elsewhere)."""
    from t5forge.config import config_to_dict, save_config
    from t5forge.train.metrics_log import MetricsLogger

    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        print(f"run directory: {run_dir}\n{summary}")
    return MetricsLogger(
        run_dir, tensorboard=cfg.logging.tensorboard, resume_step=state.step if resumed else None,
        total_steps=total_steps, enabled=world.is_main,
        wandb={"project": cfg.logging.wandb_project, "config": config_to_dict(cfg)} if cfg.logging.wandb else None,
    )
