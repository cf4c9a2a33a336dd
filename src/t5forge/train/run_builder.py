"""One training run's wiring, shared by `t5forge pretrain` and `t5forge finetune`.

    device -> run directory (its lock, the checkpoint to resume from) -> starting weights, tokenizer
      -> task.prepare: the task's data and Plan (data before the model: a wrong path fails in
         seconds, not after initialising 248M parameters)
      -> model, optimizer, schedule -> task.train_loader -> checkpoint parts -> resume or a fresh seed
      -> run files (config.yaml, metrics.jsonl, the summary) -> task.evaluator -> LoopParts -> train()

A task (train/pretrain.py, train/finetune.py) brings only what is its own: its data, the Plan built
from it, its evaluation, its summary and closing lines, its FLOPs count. Everything a checkpoint
holds is registered once, in `checkpoint_parts` (names and storage: train/checkpoint_parts.py), and
the same mapping is saved by the loop, restored on resume and on a rollback: new run state (an
EMA, a router bias) is one more entry there, or in a task's `extra_parts`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from t5forge.config import RunConfig
from t5forge.config_files import run_config_text
from t5forge.model.memory import check_step_fits
from t5forge.train import rng
from t5forge.train.checkpoint import Checkpointer
from t5forge.train.checkpoint_parts import RNGStreams, run_parts
from t5forge.train.loop import LoopParts, train
from t5forge.train.setup import (
    autocast_for, build_model, enable_fast_math, launch, load_run_tokenizer, log_device, model_summary, open_run_dir,
    pick_device, resume_or_seed, start_run_files, starting_weights, training_model,
)
from t5forge.train.state import TrainState

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What the builder has built so far; the task's hooks read it (and `prepare` sets `plan`)."""

    cfg: RunConfig
    world: Any  # t5forge.train.distributed.World
    device: torch.device
    run_dir: Path
    resume_from: Path | None
    weights: Path | None  # the starting weights' directory (setup.starting_weights), None for a fresh model
    tokenizer: Any
    plan: Any = None
    model: torch.nn.Module | None = None  # the bare T5 (the loop gets its DDP / compiled wrapper)
    optimizer: torch.optim.Optimizer | None = None
    state: TrainState | None = None
    autocast: Callable[[], Any] | None = None


class Task:
    """The part of a run that is pre-training's or fine-tuning's own; hooks in the order they run."""

    def prepare(self, run: Run) -> None:
        """Read the data (before the model is built) and set `run.plan`."""
        raise NotImplementedError

    def train_loader(self, run: Run):
        """The training loader (state_dict / load_state_dict for checkpoints; iterating it gives micro-batches)."""
        raise NotImplementedError

    def batches(self, run: Run, loader) -> Iterable[dict]:
        """The endless iterator of micro-batches the loop reads (again after a rollback)."""
        return iter(loader)

    def summary(self, run: Run, loader) -> str:
        """The run summary's lines (the console and nothing else)."""
        return f"{run.plan.summary()}\n{model_summary(run.model, run.plan, run.tokenizer)}"

    def evaluator(self, run: Run) -> Callable[[int], dict] | None:
        return None

    def flops_per_step(self, run: Run) -> float | None:
        return None

    def peak_flops(self, run: Run) -> float | None:
        return None

    def extra_parts(self, run: Run, loader) -> dict[str, Any]:
        """More named run state for every checkpoint (see checkpoint_parts.py), restored on resume."""
        return {}

    def done(self, run: Run, state: TrainState) -> str:
        """The closing console line."""
        return f"done: {state.step} steps"


def checkpoint_parts(run: Run, task: Task, loader) -> dict[str, Any]:
    """Every named part a checkpoint of this run holds, in restore order (the RNGs last)."""
    rng_streams = RNGStreams(run.world.rank, run.world.world_size, reseed=lambda saved: reseed_streams(run, saved))
    parts = run_parts(model=run.model, tokenizer=run.tokenizer, optimizer=run.optimizer, train_state=run.state,
                      data=loader, config_text=run_config_text(run.cfg), rng_streams=rng_streams)
    extra = task.extra_parts(run, loader)
    clash = sorted(set(extra) & set(parts))
    if clash:
        raise ValueError(f"extra checkpoint parts {clash} reuse the names of a run's own parts")
    streams = parts.pop("rng")
    return {**parts, **extra, "rng": streams}


def reseed_streams(run: Run, saved_ranks: int) -> None:
    """A checkpoint of another number of ranks: its per-rank RNG streams (dropout) have no
    counterpart here, so every rank reseeds from (seed, step, rank); restored after the train state."""
    step = run.state.step
    rng.seed_all(rng.derived_seed(run.cfg.seed, step, run.world.rank))
    if run.world.is_main:
        log.info("RNG streams: the checkpoint holds those of %d rank(s) and this run has %d; reseeded from "
                 "(seed %d, step %d, rank)", saved_ranks, run.world.world_size, run.cfg.seed, step)


def run_task(cfg: RunConfig, task: Task) -> int:
    """Launch (torchrun's process group, if any) and run `task`; the exit code."""
    return launch(cfg, lambda cfg, world: build_and_train(cfg, world, task))


def build_and_train(cfg: RunConfig, world, task: Task) -> int:
    from t5forge.optim.build import build_optimizer, build_schedule

    device = pick_device(cfg.device, world.local_rank)
    log_device(cfg, device)
    enable_fast_math(device)
    run_dir, resume_from = open_run_dir(cfg)
    weights = starting_weights(cfg)
    run = Run(cfg=cfg, world=world, device=device, run_dir=run_dir, resume_from=resume_from, weights=weights,
              tokenizer=load_run_tokenizer(cfg, weights))
    task.prepare(run)

    rng.seed_all(cfg.seed)  # same initial weights on every rank (a fresh model)
    run.model = build_model(cfg, run.tokenizer, device, weights, run.plan.vocab_size)
    # a micro-batch too long for this device is refused here, with the numbers, not by the allocator mid-step
    sharded = cfg.distributed.strategy == "fsdp" and world.distributed
    # FSDP keeps 1/world of the weights, gradients and optimizer state on a rank (a block's gathered
    # weights come and go within the step's slack)
    params = -(-run.model.num_parameters() // world.world_size) if sharded else run.model.num_parameters()
    need = check_step_fits(run.model.config, params, run.plan.micro_batch_size,
                           run.plan.input_length, run.plan.target_length, device, precision=cfg.precision,
                           optimizer_states=1 if cfg.optim.name == "adafactor" else 2,
                           checkpointing=cfg.model.activation_checkpointing)
    log.info("memory: a micro-step needs about %s", need.line())
    training = None
    if sharded:
        # FSDP2 replaces the parameters by their shards: the optimizer is built on those, and a
        # resume loads the full checkpoint into them (each rank keeps its shards).
        training = training_model(run.model, cfg, world, device, run.plan)
    run.optimizer = build_optimizer(run.model, cfg.optim)
    lr_at = build_schedule(cfg.optim, total_steps=run.plan.total_steps)
    loader = task.train_loader(run)
    run.state = TrainState()
    parts = checkpoint_parts(run, task, loader)
    # fills run.state (and every part) from the checkpoint; optim.resume_optimizer: the starting weights' optimizer
    resume_or_seed(resume_from, cfg, parts, world, weights=weights, total_steps=run.plan.total_steps)

    run.autocast = autocast_for(cfg.precision, device)
    logger = start_run_files(cfg, run_dir, run.state, resume_from is not None, run.plan.total_steps, world,
                             task.summary(run, loader))
    evaluate = task.evaluator(run)
    # MFU needs the device's peak (known for GPUs, not CPUs) and the step's FLOPs: counted only then
    # (model/flops.py builds the model once more, on the meta device).
    peak = task.peak_flops(run)
    if training is None:
        training = training_model(run.model, cfg, world, device, run.plan)  # the speed twins swapped in (model/fast/)
    loop_parts = LoopParts(
        cfg=cfg, plan=run.plan, model=training.model, loss=training.loss,
        optimizer=run.optimizer, lr_at=lr_at, train_batches=task.batches(run, loader),
        restart_data=lambda: task.batches(run, loader), evaluate=evaluate,
        checkpointer=Checkpointer(run_dir, keep_last=cfg.checkpoint.keep_last or None, world=world),
        checkpoint_parts=parts, logger=logger, world=world, device=device, autocast=run.autocast,
        flops_per_step=task.flops_per_step(run) if peak else None, peak_flops=peak,
    )
    with logger:
        state = train(loop_parts, run.state)
    if world.is_main:
        log.info("%s", task.done(run, state))
    return 0
