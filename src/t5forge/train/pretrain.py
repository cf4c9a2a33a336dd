"""`t5forge pretrain`: span-corruption pre-training from a RunConfig, end to end.

    argv -> RunConfig (frozen) -> tokenizer -> Plan -> loaders -> model, optimizer, schedule
         -> resume (false | auto | path) -> train() -> out_dir/{config.yaml, metrics.jsonl, checkpoints/}

The wiring is the shared run builder's (train/run_builder.py); this module holds what is
pre-training's own: the span-corruption loaders, the held-out evaluation, the summary numbers.

Launch several processes with `torchrun --nproc_per_node N -m t5forge pretrain ...`: each rank
reads its own slice of the data; DDP keeps the replicas equal.
"""

from __future__ import annotations

import itertools
import logging

import torch

from t5forge.config import RunConfig
from t5forge.errors import T5ForgeError
from t5forge.run_layout import checkpoints_dir
from t5forge.model.flops import training_flops
from t5forge.train.metrics_log import peak_flops
from t5forge.train.run_builder import Run, Task, run_task

log = logging.getLogger(__name__)


def build_loader(cfg: RunConfig, plan, tokenizer, world, split: str, **options):
    """The span-corruption (or UL2, data.objective) loader of `split` ("train" or "validation"), or None when there is no
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
        mean_noise_span_length=d.mean_noise_span_length, objective=d.objective, ul2_denoisers=d.ul2_denoisers,
        seed=cfg.seed,
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


class PretrainTask(Task):
    """What pre-training brings to the shared run (train/run_builder.py): span-corruption loaders
    (train, held-out), the held-out evaluation and the FLOPs of a step for MFU."""

    def prepare(self, run: Run) -> None:
        from t5forge.plan import make_plan

        cfg, world = run.cfg, run.world
        run.plan = make_plan(cfg, world_size=world.world_size, tokenizer_ids=run.tokenizer.vocab_size,
                             num_sentinels=run.tokenizer.num_sentinels)
        # Data before the model: a wrong path fails in seconds, not after initialising 248M parameters.
        self.loader = build_loader(cfg, run.plan, run.tokenizer, world, "train")
        if cfg.data.objective == "ul2" and world.is_main:
            for line in self.loader.corruption.describe():
                log.info("UL2 denoiser %s", line)
        self.eval_loader = build_loader(cfg, run.plan, run.tokenizer, world, "validation") if cfg.eval.steps > 0 else None
        if self.eval_loader is not None:
            check_held_out(self.eval_loader, cfg)

    def train_loader(self, run: Run):
        return self.loader

    def evaluator(self, run: Run):
        cfg = run.cfg
        if self.eval_loader is None:
            if cfg.eval.steps > 0:
                log.info("no held-out data (data.validation_files is empty): training without evaluation")
            return None
        return said_when_short(held_out_evaluator(cfg, self.eval_loader, run.model, run.device, run.autocast,
                                                  run.world), cfg, run.world)

    def flops_per_step(self, run: Run) -> float:
        p = run.plan  # counted from the model's components (model/flops.py)
        return training_flops(run.model.config, p.batch_size, p.input_length, p.target_length)

    def peak_flops(self, run: Run) -> float | None:
        return peak_flops(run.device, "bf16" if run.cfg.precision == "bf16" else "tf32")

    def done(self, run: Run, state) -> str:
        best = f", best eval loss {state.best_eval_loss:.4f} at step {state.best_eval_step}" if state.best_eval_loss else ""
        return (f"done: {state.step} steps, {state.tokens_seen:,} tokens, "
                f"{state.elapsed_train_seconds:.0f}s of training{best}; checkpoints in {checkpoints_dir(run.run_dir)}")


def run_pretrain(cfg: RunConfig) -> int:
    return run_task(cfg, PretrainTask())
