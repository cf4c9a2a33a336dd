"""What a run needs before its loop starts: device, precision, tokenizer and model.

Shared by `t5forge pretrain` and `t5forge finetune`, so both start from weights the same way:
a fresh T5 of `model.name`'s architecture, or `model.checkpoint_path` (an HF T5 / mT5 / UMT5
directory or any t5forge model/checkpoint/run directory) for continued pre-training and fine-tuning.
Starting weights keep their architecture and vocabulary: a model.* architecture override that
differs from the checkpoint's is refused, and so is a tokenizer that does not fit the embedding
rows (`check_tokenizer_fits`). The optimizer and schedule start afresh at step 0 unless
optim.resume_optimizer takes a t5forge checkpoint's (`resume_or_seed`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import NamedTuple

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


def log_device(cfg: RunConfig, device: torch.device) -> None:
    """The console line saying where and in which precision the run computes."""
    if device.type == "cuda":
        where = f"{device} ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        where = f"cpu ({torch.get_num_threads()} threads)"
    else:
        where = str(device)
    precision = "bf16 (autocast; fp32 weights and optimizer)" if cfg.precision == "bf16" else cfg.precision
    log.info("device: %s, precision %s", where, precision)


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


def starting_weights(cfg: RunConfig):
    """The directory a run's weights come from: model.checkpoint_path's, or (model.random_init=false)
    model.name's released weights, a local directory or a Hub download; None for a fresh model.
    Resolved before the tokenizer is loaded, so a missing starting point is named as such."""
    from pathlib import Path

    from t5forge.model.load import resolve_model_dir

    m = cfg.model
    if m.checkpoint_path:
        return resolve_model_dir(m.checkpoint_path)
    if m.random_init:
        return None
    if Path(m.name).expanduser().exists():
        return resolve_model_dir(m.name)  # a local directory's own errors say what is wrong with it
    if "/" not in m.name:
        why = "is neither a local directory nor a Hub id (owner/name)"
    else:
        try:
            return resolve_model_dir(m.name)
        except T5ForgeError as err:
            cause = err.__context__ or err  # the Hub client's error, behind our message
            first_line = str(cause).splitlines()[0] if str(cause) else ""
            why = f"could not be fetched from the Hugging Face Hub ({type(cause).__name__}: {first_line})"
    what, scratch = ("fine-tuning", "fine-tune") if cfg.mode == "ft" else ("this run", "pre-train")
    raise T5ForgeError(
        f"{what} starts from pre-trained weights (model.random_init=false) and model.checkpoint_path is not set: "
        f"set model.checkpoint_path=DIR (a t5forge run, checkpoint or HF T5 directory), or model.random_init=true "
        f"to {scratch} from scratch. Without a checkpoint, the weights are model.name's and model.name=<hub id> "
        f"needs the Hugging Face Hub: model.name={m.name!r} {why}"
    )


def has_own_tokenizer(weights) -> bool:
    """Whether the starting weights' directory holds its tokenizer (which then replaces data.tokenizer)."""
    return weights is not None and any((weights / name).is_file() for name in ("spiece.model", "tokenizer.json"))


def load_run_tokenizer(cfg: RunConfig, weights=None):
    """The tokenizer of `data.tokenizer`; the starting weights' own (`weights`, see starting_weights)
    when that directory holds one. Pre-training with data.objective=ul2 adds UL2's paradigm tokens
    after the sentinels (a tokenizer saved by such a run has them already)."""
    from t5forge.tokenizer import load_tokenizer

    if has_own_tokenizer(weights):
        origin = "model.checkpoint_path" if cfg.model.checkpoint_path else "model.name's weights"
        tokenizer = _with_objective_tokens(cfg, load_tokenizer(weights))
        log.info("tokenizer: %s (from %s; data.tokenizer is not used), %s ids", weights, origin,
                 f"{tokenizer.vocab_size:,}")
        return tokenizer
    tokenizer = _with_objective_tokens(cfg, load_tokenizer(cfg.data.tokenizer))
    log.info("tokenizer: %s (data.tokenizer), %s ids", cfg.data.tokenizer, f"{tokenizer.vocab_size:,}")
    return tokenizer


def _with_objective_tokens(cfg: RunConfig, tokenizer):
    if cfg.mode != "pt" or cfg.data.objective != "ul2":
        return tokenizer
    from t5forge.data.ul2 import ALL_PARADIGM_TOKENS

    added = tokenizer.with_added_tokens(ALL_PARADIGM_TOKENS)
    if added is not tokenizer:
        log.info("tokenizer: UL2's paradigm tokens %s added after the sentinels (ids %d-%d)",
                 " ".join(ALL_PARADIGM_TOKENS), added.sentinel_end, added.vocab_size - 1)
    return added


def weights_source(cfg: RunConfig, weights=None) -> str:
    """Where a run's starting weights come from, in words (before a resume replaces them)."""
    m = cfg.model
    if m.checkpoint_path:
        return f"{weights} (model.checkpoint_path)"
    if weights is not None:
        return f"the released weights of {m.name} ({weights}; model.random_init=false)"
    return f"fresh init of the {m.name} architecture (seed {cfg.seed})"


def build_model(cfg: RunConfig, tokenizer, device: torch.device, weights=None, vocab_size=None) -> torch.nn.Module:
    """The weights in `weights` (see starting_weights), or a fresh T5 (T5's init, seeded by the
    caller) of `vocab_size` embedding rows (the plan's; None: model.name's).

    The architecture comes from the checkpoint when there is one (a model.* architecture override
    that differs from it is refused), and so does the vocabulary (`check_tokenizer_fits`); dropout
    and the attention back end always come from the run config, so a fine-tuning run can change them.
    """
    from t5forge.model.t5 import T5
    from t5forge.plan import resolve_model_config

    m = cfg.model
    log.info("weights: %s", weights_source(cfg, weights))
    if weights is not None:
        from t5forge.model.load import load_model

        model, _ = load_model(weights, dropout_rate=m.dropout_rate, attention_backend=m.attention)
        refuse_conflicting_overrides(cfg, model.config, weights)
        if not has_own_tokenizer(weights):  # a checkpoint's own tokenizer was trained with it
            check_tokenizer_fits(tokenizer, model.config.vocab_size, weights)
    else:
        model = T5(resolve_model_config(cfg, vocab_size=vocab_size))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise T5ForgeError(
            f"the tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids but the model's "
            f"vocabulary has {model.config.vocab_size} rows; set model.vocab_size >= {tokenizer.vocab_size} "
            "(a multiple of 128 is fastest)"
        )
    return model.to(device)


def refuse_conflicting_overrides(cfg: RunConfig, config, weights) -> None:
    """A T5ForgeError naming every model.* architecture override whose value differs from the
    starting weights' own (`config`): a checkpoint keeps its architecture; equal values pass."""
    where = "model.checkpoint_path" if cfg.model.checkpoint_path else "model.name's released weights"
    conflicts = [f"model.{key}={value!r} (the checkpoint has {getattr(config, key)!r})"
                 for key, value in cfg.model.architecture_overrides().items() if getattr(config, key) != value]
    if conflicts:
        raise T5ForgeError(
            f"{weights} ({where}) keeps its own architecture and vocabulary, but the run config sets "
            f"{', '.join(conflicts)}; drop {'these overrides' if len(conflicts) > 1 else 'the override'} "
            "(a preset's: set it to null, e.g. model.d_model=null) or start a fresh model without a checkpoint"
        )


def check_tokenizer_fits(tokenizer, rows: int, weights) -> None:
    """A T5ForgeError unless the starting weights' `rows` embedding rows are the tokenizer's ids,
    up to T5's rounding to a multiple of 128 (32,100 ids -> 32,128 rows; mT5: 250,100 -> 250,112):
    another vocabulary would read every id as the wrong token."""
    from t5forge.data.tokenizer_train import MULTIPLE, rounded_vocab_size

    ids = tokenizer.vocab_size
    if not ids <= rows <= rounded_vocab_size(ids):
        fewest = (rows - 1) // MULTIPLE * MULTIPLE + 1  # the fewest ids that round up to `rows`
        raise T5ForgeError(
            f"the tokenizer {tokenizer.source} has {ids:,} ids but the checkpoint {weights} has {rows:,} embedding "
            f"rows (they fit a tokenizer of {fewest:,} to {rows:,} ids: T5 rounds its ids up to a multiple of "
            f"{MULTIPLE}); the checkpoint keeps its vocabulary: pass the checkpoint's tokenizer (data.tokenizer=...) "
            "or copy its spiece.model / tokenizer.json into the checkpoint directory"
        )


def model_summary(model, plan, tokenizer) -> str:
    """The run summary's model lines: parameters and, for starting weights, their vocabulary (the
    plan's summary already names a fresh model's)."""
    lines = [f"model: {model.num_parameters():,} parameters"]
    if plan.vocab_size is None:
        lines.append(f"vocabulary: {model.config.vocab_size:,} rows (the starting weights'; tokenizer: "
                     f"{tokenizer.vocab_size:,} ids)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The steps every run takes around its own data and evaluation (called in order by run_builder.py).


def launch(cfg: RunConfig, run) -> int:
    """Join the torchrun process group (if any), call `run(cfg, world)`, leave the group.
    Local paths are made absolute first, so the run and its saved config.yaml name the same files."""
    from t5forge.config_files import absolute_paths
    from t5forge.distributed import init_world, shutdown

    cfg = absolute_paths(cfg)
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
    log.info("run directory: %s", run_dir)
    run_lock.acquire_for_rank(run_dir)  # one writer per run directory, before anything there is read or removed
    resume_from = resolve_resume(cfg.resume, run_dir)
    if resume_from is None and latest(run_dir) is not None:
        raise T5ForgeError(
            f"{run_dir} already holds checkpoints ({latest(run_dir).name}); continue it with resume=auto "
            "or start a new run in another out_dir"
        )
    return run_dir, resume_from


def resume_or_seed(resume_from, cfg: RunConfig, parts, world, weights=None, total_steps=None) -> None:
    """Start from the checkpoint `resume_from` (every named part of the run restored in place:
    weights, optimizer, train state, data position, RNGs, ...; see run_builder.checkpoint_parts), or
    fresh with this rank's dropout seed when it is None: a fresh optimizer and schedule at step 0,
    unless optim.resume_optimizer takes them (the optimizer state and the train state, its step
    included) from the starting weights `weights`, a t5forge checkpoint; the data position and the
    RNGs start afresh there too. Call after everything is built, so nothing built afterwards draws
    from the restored RNGs."""
    from t5forge.train import rng
    from t5forge.train.checkpoint_parts import load_parts, rng_reseeded_from

    if resume_from is None:
        why = f"resume=auto found no checkpoint in {cfg.out_dir}" if cfg.resume == "auto" else "resume=false"
        if cfg.optim.resume_optimizer:
            step = continue_optimizer(weights, parts, total_steps)
            log.info("start: the optimizer state and schedule of %s (optim.resume_optimizer), at step %d; "
                     "the data position and RNGs fresh (%s)", weights, step, why)
        else:
            log.info("start: fresh, at step 0 (%s)", why)
        rng.seed_all(cfg.seed + 1 + world.rank)  # dropout differs across ranks
        return
    load_parts(resume_from, parts, rank=world.rank, world_size=world.world_size)
    step = parts["train_state"].state.step
    saved_ranks = rng_reseeded_from(parts)  # a checkpoint of another number of ranks: reseeded, not restored
    rngs = ("RNG states" if saved_ranks is None
            else f"RNG streams reseeded: the checkpoint's are those of {saved_ranks} rank(s)")
    log.info("resumed from %s at step %d (weights, optimizer, data position and %s)", resume_from, step, rngs)


def continue_optimizer(weights, parts, total_steps=None) -> int:
    """Load the optimizer and train-state parts from the t5forge checkpoint `weights` (the starting
    weights' directory); the step it continues from."""
    from t5forge import run_layout
    from t5forge.train.checkpoint_parts import load_parts

    needed = (run_layout.OPTIMIZER, run_layout.TRAIN_STATE)
    if weights is None or not all((weights / name).is_file() for name in needed):
        raise T5ForgeError(
            f"optim.resume_optimizer=true needs a t5forge training checkpoint as model.checkpoint_path (it holds "
            f"{' and '.join(needed)}), but {weights} has none: an HF or exported model directory carries weights "
            "only; set optim.resume_optimizer=false to start the optimizer and schedule afresh"
        )
    load_parts(weights, {"optimizer": parts["optimizer"], "train_state": parts["train_state"]})
    step = parts["train_state"].state.step
    if total_steps is not None and step >= total_steps:
        raise T5ForgeError(
            f"optim.resume_optimizer=true continues the schedule of {weights} at step {step}, but the run has "
            f"{total_steps} steps (optim.total_steps counts from that run's step 0); raise optim.total_steps "
            "above it, or set optim.resume_optimizer=false to start a fresh schedule"
        )
    return step


class Training(NamedTuple):
    """What the loop trains: the module it calls and the token loss (model/loss.py or its twin)."""

    model: torch.nn.Module
    loss: torch.nn.Module


def training_model(model, cfg: RunConfig, world, device, plan=None) -> Training:
    """The module the loop calls and its token loss. The plain model gets its speed twins
    (model/fast/: `fast.apply`, which logs what it swapped and what it left plain) and the
    activation checkpointing of model.activation_checkpointing; then under torchrun it is
    DDP-wrapped or, with distributed.strategy=fsdp, sharded in place by FSDP2 (the same module
    object: the optimizer, built before, holds its parameters, which fully_shard replaces by
    DTensors, so the optimizer is rebuilt on them by the caller; see run_builder.build_and_train);
    then compiled with model.compile (null: on CUDA). On CPU without
    model.compile, the twins' elementwise stretches run compiled on their own
    (model.compile_elementwise; null: when the plan's residual stream, micro-batch x input length x
    d_model, is large enough to gain from it)."""
    from t5forge.distributed import shard_fsdp, wrap_ddp
    from t5forge.model import activation_checkpointing, fast
    from t5forge.model.fast.compiled import wanted
    from t5forge.model.loss import TokenNLL

    compiled = compiles(cfg.model, device)
    stream = plan.micro_batch_size * plan.input_length * model.config.d_model if plan is not None else None
    elementwise = wanted(cfg.model.compile_elementwise, device, compiled, stream)
    log.info("compile: %s", compile_note(cfg.model, device, compiled, elementwise, stream))
    model, loss, _ = fast.apply(model, TokenNLL(), device=device, compiled=compiled, elementwise=elementwise)
    # After the twins (the stack twin reads its blocks' exact types), before DDP / FSDP and torch.compile.
    activation_checkpointing.apply(model, cfg.model.activation_checkpointing)
    if cfg.distributed.strategy == "fsdp" and world.distributed:
        wrapped = shard_fsdp(model, world, cfg.precision, cfg.distributed.fsdp_reshard_after_forward)
        log.info("data parallel: FSDP2 over %d ranks (fully_shard per block; %s)", world.world_size,
                 "bf16 compute, fp32 weights and reductions" if cfg.precision == "bf16" else "fp32")
    else:
        wrapped = wrap_ddp(model, world, device)
    if not compiled:
        return Training(wrapped, loss)
    if wrapped is not model and cfg.model.attention == "flex":
        # DDPOptimizer (dynamo's graph splitting at DDP bucket boundaries) cannot split graphs holding
        # FlexAttention's higher-order op (pytorch#137481): compile DDP's module as one graph, its
        # gradients all-reduced after the backward by DDP's hooks (no compute/communication overlap).
        torch._dynamo.config.optimize_ddp = False
        log.info("DDP + compile + flex: dynamo's DDP graph splitting off (torch._dynamo.config.optimize_ddp)")
    return Training(torch.compile(wrapped), loss)


def compile_note(model_cfg, device, compiled: bool, elementwise: bool, stream: int | None = None) -> str:
    """Compiled or eager, and why (the console line of training_model)."""
    from t5forge.model.fast.compiled import MIN_ELEMENTS

    why = "model.compile=" + ("true" if model_cfg.compile else "false") if model_cfg.compile is not None else (
        f"model.compile=null: {'on' if compiled else 'off'} for {torch.device(device).type}")
    if compiled:
        return f"torch.compile of the whole model ({why})"
    if elementwise and torch.device(device).type == "cpu":
        return (f"eager ({why}); residual adds, norms and gated activations torch.compile'd on activations of "
                f"{MIN_ELEMENTS:,}+ elements (model.compile_elementwise)")
    if (model_cfg.compile_elementwise is None and torch.device(device).type == "cpu" and stream is not None
            and stream < MIN_ELEMENTS):
        return (f"eager ({why}); the elementwise stretches too: the residual stream ({stream:,} elements a "
                f"micro-batch) is below the {MIN_ELEMENTS:,} where compiling them pays "
                "(model.compile_elementwise=true compiles them anyway)")
    return f"eager ({why}; model.compile_elementwise off)"


def compiles(model_cfg, device) -> bool:
    """model.compile resolved: null = on for CUDA, off elsewhere."""
    if model_cfg.compile is not None:
        return model_cfg.compile
    return torch.device(device).type == "cuda"


def start_run_files(cfg: RunConfig, run_dir, state, resumed: bool, total_steps: int, world, summary: str):
    """Write config.yaml and log the run summary (rank 0); return the MetricsLogger (a no-op elsewhere)."""
    from t5forge.config_files import config_to_dict, run_definition, save_config
    from t5forge.run_layout import RUN_CONFIG
    from t5forge.train.metrics_log import MetricsLogger

    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / RUN_CONFIG)
        for line in summary.splitlines():
            log.info("%s", line)
    return MetricsLogger(
        run_dir, tensorboard=cfg.logging.tensorboard, resume_step=state.step if resumed else None,
        total_steps=total_steps, enabled=world.is_main,
        wandb={"project": cfg.logging.wandb_project, "config": config_to_dict(run_definition(cfg))} if cfg.logging.wandb else None,
    )
