"""`t5forge pretrain`: span-corruption pre-training from a RunConfig, end to end.

    argv -> RunConfig (frozen) -> Plan -> tokenizer, model, loaders, optimizer, schedule
         -> resume (false | auto | path) -> train() -> out_dir/{config.yaml, metrics.jsonl, checkpoints/}

Launch several processes with `torchrun --nproc_per_node N -m t5forge pretrain ...`: each rank
reads its own slice of the data; DDP keeps the replicas equal.
"""

from __future__ import annotations

import itertools
import logging

import torch

from t5forge.config import RunConfig, run_config_text
from t5forge.errors import T5ForgeError
from t5forge.train import rng
from t5forge.train.checkpoint import Checkpointer
from t5forge.train.loop import LoopParts, train
from t5forge.model.flops import training_flops
from t5forge.train.metrics_log import peak_flops
from t5forge.train.setup import (
    autocast_for, build_model, enable_fast_math, launch, load_run_tokenizer, log_device, model_summary, open_run_dir,
    pick_device, resume_or_seed, start_run_files, starting_weights, training_model,
)

log = logging.getLogger(__name__)


def build_loader(cfg: RunConfig, plan, tokenizer, world, split: str, **options):
    """The span-corruption loader of `split` ("train" or "validation"), or None when there is no
    held-out data (local training files without data.validation_files). `options` go to
    build_pretrain_loader (`t5forge data preview` passes its decode-error handling)."""
    from t5forge.data.loader import build_pretrain_loader

    d = cfg.data
    files = d.train_files if split == "train" else d.validation_files
    if split == "validation" and not files and d.train_files:
        return None
    if not files and not d.dataset:
        raise T5ForgeError("no training data: set data.train_files=[...] or data.dataset=NAME")
    return build_pretrain_loader(
        tokenizer=tokenizer, dataset=d.dataset or None, dataset_config=d.dataset_config or None,
        files=list(files), text_field=d.text_field, split=split, batch_size=plan.micro_batch_size,
        input_length=plan.input_length, noise_density=d.mlm_probability,
        mean_noise_span_length=d.mean_noise_span_length, seed=cfg.seed,
        # Held-out: every rank reads the same stream and evaluates its share of it (see
        # held_out_evaluator), so the evaluation set does not change with the number of ranks.
        rank=world.rank if split == "train" else 0, world_size=world.world_size if split == "train" else 1,
        # Held-out batches are few and read once per evaluation: workers would only add start-up time.
        num_workers=d.num_workers if split == "train" else 0,
        pin_memory=torch.cuda.is_available(), allow_changed_files=d.allow_changed_files,
        shuffle_buffer=d.shuffle_buffer, **options,
    )


def check_held_out(loader, cfg: RunConfig) -> None:
    """Read one held-out batch now: a validation file too small for a batch, or unreadable, fails at
    start-up instead of at the first evaluation (which may come only after the last step)."""
    where = held_out_name(cfg)
    try:
        next(iter(loader))
    except T5ForgeError as err:
        raise T5ForgeError(f"held-out data {where}: {err}") from None
    except Exception as err:  # noqa: BLE001 (decoding errors of any kind: name the files)
        raise T5ForgeError(f"held-out data {where}: cannot read one batch ({type(err).__name__}: {err}); "
                           "fix or replace data.validation_files") from None


def held_out_evaluator(cfg: RunConfig, loader, model, device, autocast, world):
    """step -> {eval_loss, eval_accuracy, ...} over the first `eval.steps` held-out batches; rank r
    of W takes batches r, r + W, ... and the sums are all-reduced."""
    from t5forge.eval.loss import evaluate_loss

    def evaluate(step: int) -> dict:
        batches = itertools.islice(iter(loader), world.rank, cfg.eval.steps, world.world_size)
        return evaluate_loss(model, batches, device, autocast=autocast, world=world)

    return evaluate


def held_out_name(cfg: RunConfig) -> str:
    return ", ".join(cfg.data.validation_files) or f"{cfg.data.dataset} (validation split)"


def said_when_short(evaluate, cfg: RunConfig, world):
    """`evaluate` that warns (once, rank 0) when the held-out data held fewer than eval.steps batches:
    the held-out set is the same at every evaluation, so is the shortfall."""
    warned = []

    def checked(step: int) -> dict:
        metrics = evaluate(step)
        if metrics["eval_batches"] < cfg.eval.steps and not warned and world.is_main:
            log.warning("held-out data %s ends early: each evaluation scores %d of eval.steps=%d batches; give "
                        "more data.validation_files or lower eval.steps",
                        held_out_name(cfg), metrics["eval_batches"], cfg.eval.steps)
            warned.append(True)
        return metrics

    return checked


def run_pretrain(cfg: RunConfig) -> int:
    return launch(cfg, _run)


def _run(cfg: RunConfig, world) -> int:
    from t5forge.optim.build import build_optimizer, build_schedule
    from t5forge.plan import make_plan

    device = pick_device(cfg.device, world.local_rank)
    log_device(cfg, device)
    enable_fast_math(device)
    weights = starting_weights(cfg)
    tokenizer = load_run_tokenizer(cfg, weights)
    plan = make_plan(cfg, world_size=world.world_size, tokenizer_ids=tokenizer.vocab_size)
    run_dir, resume_from = open_run_dir(cfg)

    # Data before the model: a wrong path fails in seconds, not after initialising 248M parameters.
    train_loader = build_loader(cfg, plan, tokenizer, world, "train")
    eval_loader = build_loader(cfg, plan, tokenizer, world, "validation") if cfg.eval.steps > 0 else None
    if eval_loader is not None:
        check_held_out(eval_loader, cfg)
    rng.seed_all(cfg.seed)  # same initial weights on every rank
    model = build_model(cfg, tokenizer, device, weights, plan.vocab_size)
    optimizer = build_optimizer(model, cfg.optim)
    lr_at = build_schedule(cfg.optim, total_steps=plan.total_steps)
    state = resume_or_seed(resume_from, cfg, model, optimizer, train_loader, world)

    autocast = autocast_for(cfg.precision, device)
    logger = start_run_files(cfg, run_dir, state, resume_from is not None, plan.total_steps, world,
                             f"{plan.summary()}\n{model_summary(model, plan, tokenizer)}")
    evaluate = None
    if eval_loader is not None:
        evaluate = said_when_short(held_out_evaluator(cfg, eval_loader, model, device, autocast, world), cfg, world)
    elif cfg.eval.steps > 0:
        log.info("no held-out data (data.validation_files is empty): training without evaluation")

    # MFU needs the device's peak (known for GPUs, not CPUs) and the step's FLOPs, counted from the
    # model's components (model/flops.py), only then.
    peak = peak_flops(device, "bf16" if cfg.precision == "bf16" else "tf32")
    flops = training_flops(model.config, plan.batch_size, plan.input_length, plan.target_length) if peak else None
    training = training_model(model, cfg, world, device, plan)  # the speed twins swapped in (model/fast/)
    parts = LoopParts(
        cfg=cfg, plan=plan, model=training.model, loss=training.loss, tokenizer=tokenizer,
        optimizer=optimizer, lr_at=lr_at,
        train_batches=iter(train_loader), data_state=train_loader.state_dict,
        restart_data=lambda position: (train_loader.load_state_dict(position), iter(train_loader))[1], evaluate=evaluate,
        checkpointer=Checkpointer(run_dir, keep_last=cfg.checkpoint.keep_last or None, world=world),
        logger=logger, world=world, device=device, autocast=autocast, config_text=run_config_text(cfg),
        flops_per_step=flops, peak_flops=peak,
    )
    with logger:
        state = train(parts, state)
    if world.is_main:
        best = f", best eval loss {state.best_eval_loss:.4f} at step {state.best_eval_step}" if state.best_eval_loss else ""
        log.info(f"done: {state.step} steps, {state.tokens_seen:,} tokens, "
              f"{state.elapsed_train_seconds:.0f}s of training{best}; checkpoints in {run_dir / 'checkpoints'}")
    return 0
