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
    """TF32 matmuls on Ampere+ GPUs (nanoT5 does the same); fp32 weights and reductions stay fp32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


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
