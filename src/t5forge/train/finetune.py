"""`t5forge finetune`: supervised seq2seq fine-tuning (Tk-Instruct on SNI, or any seq2seq files) from a RunConfig.

    argv -> RunConfig (mode=ft) -> tokenizer (the starting checkpoint's own when it has one), model
         -> examples (finetune.sni_dir train/test, or finetune.train_files / validation_files)
         -> Plan (optim.epochs x ceil(examples / batch) steps) -> FinetuneLoader, optimizer, schedule
         -> resume (false | auto | path) -> train() -> out_dir/{config.yaml, metrics.jsonl, checkpoints/, eval/}

The wiring (device, model, optimizer, checkpoints, resume, metrics log, the loop) is the shared
run builder's (train/run_builder.py, train/loop.py); what differs is the data (finite,
epoch-based, see data/finetune_loader.py) and the evaluation:
held-out loss over the first `eval.steps` test batches (of optim.batch_size examples), then greedy generation of
`finetune.max_target_len` tokens for every test example, scored with the official SNI metrics
(exact match, Rouge-L), written to out_dir/eval/step-NNNNNNNN/{predictions.jsonl, metrics.json}.
"""

from __future__ import annotations

import itertools
import logging
import time

import torch

from t5forge.config import RunConfig
from t5forge.errors import T5ForgeError
from t5forge.run_layout import checkpoints_dir, eval_dir
from t5forge.train.run_builder import Run, Task, run_task
from t5forge.train.setup import model_summary
from t5forge.train.state import TrainState

log = logging.getLogger(__name__)


def load_finetune_data(cfg: RunConfig, tokenizer) -> tuple[list, list | None, str]:
    """(training examples, held-out examples or None, a name for the held-out set).

    Truncation counts (prompts and targets longer than finetune.max_seq_len / max_target_len) are
    logged by the readers; nothing is dropped.
    """
    f = cfg.finetune
    want_eval = cfg.eval.steps > 0
    if f.sni_dir and f.train_files:
        raise T5ForgeError("both finetune.sni_dir and finetune.train_files are set; give one source of fine-tuning data")
    if f.sni_dir:
        from t5forge.data.instructions import PromptFormat, load_sni

        fmt = PromptFormat(add_task_name=f.add_task_name, add_task_definition=f.add_task_definition,
                           num_pos_examples=f.num_pos_examples, num_neg_examples=f.num_neg_examples,
                           add_explanation=f.add_explanation)
        options = dict(max_num_instances_per_task=f.max_num_instances_per_task, max_source_length=f.max_seq_len,
                       max_target_length=f.max_target_len, seed=cfg.seed, fmt=fmt)
        train_examples = load_sni(f.sni_dir, "train", tokenizer, **options)
        eval_examples = load_sni(f.sni_dir, "test", tokenizer, **options) if want_eval else None
        return train_examples, eval_examples, f"SNI test ({f.sni_dir})"
    if f.train_files:
        from t5forge.data.seq2seq import load_seq2seq_files

        options = dict(input_field=f.input_field, target_field=f.target_field, tokenizer=tokenizer,
                       max_source_length=f.max_seq_len, max_target_length=f.max_target_len)
        train_examples = load_seq2seq_files(f.train_files, name="finetune.train_files", **options)
        eval_examples = None
        if want_eval and f.validation_files:
            eval_examples = load_seq2seq_files(f.validation_files, name="finetune.validation_files", **options)
        return train_examples, eval_examples, "finetune.validation_files"
    raise T5ForgeError(
        "no fine-tuning data: set finetune.sni_dir=DIR (Super-NaturalInstructions: splits/default/, tasks/) "
        "or finetune.train_files=[train.jsonl] (with finetune.input_field / finetune.target_field)"
    )


def build_train_loader(cfg: RunConfig, plan, examples, tokenizer, world, device: torch.device):
    from t5forge.data.finetune_loader import FinetuneLoader

    source_len, target_len = pack_capacity(cfg, plan.micro_batch_size, device)
    return FinetuneLoader(
        examples, tokenizer, batch_size=plan.batch_size, grad_acc=plan.grad_acc, rank=world.rank,
        world_size=world.world_size, max_source_length=cfg.finetune.max_seq_len,
        max_target_length=cfg.finetune.max_target_len, seed=cfg.seed, train=True, pack=cfg.finetune.pack,
        pack_source_len=source_len, pack_target_len=target_len,
    )


def _packing_note(loader) -> str:
    if not loader.pack:
        return ""
    caps = [("the micro-batch's longest" if c is None else f"up to {c}") for c in (loader.pack_source_len,
                                                                                  loader.pack_target_len)]
    return f"; packed rows: source {caps[0]}, target {caps[1]} tokens"


def pack_capacity(cfg: RunConfig, examples_per_batch: int, device: torch.device) -> tuple[int | None, int | None]:
    """Packed rows' (source, target) capacity for micro-batches of `examples_per_batch` examples;
    None = the micro-batch's longest example. Explicit finetune.pack_source_len / pack_target_len
    win. Left at 0: where attention runs example by example (sdpa on CPU, uncompiled:
    model/fast/spans.py) a row's width costs nothing extra, so the whole micro-batch goes
    into one row, padding-free; elsewhere attention over a packed row costs rows x width^2 (dense
    masks) or compiles per width (flex), so rows stay at the longest."""
    from t5forge.train.setup import compiles

    f = cfg.finetune
    if f.pack_source_len or f.pack_target_len or compiles(cfg.model, device):
        return f.pack_source_len or None, f.pack_target_len or None
    from t5forge.model.fast.spans import use_spans

    if not use_spans(cfg.model.attention, device):
        return None, None
    return f.max_seq_len * examples_per_batch, f.max_target_len * examples_per_batch


def generation_metrics(model, tokenizer, examples, *, cfg, batch_size, device, autocast, world, out_dir, metadata):
    """Greedy generation for every held-out example (sharded over ranks), scored on rank 0's copy of all
    predictions; predictions.jsonl and metrics.json go to `out_dir` (rank 0). Returns the flat numbers."""
    from t5forge.eval.generation import generate_predictions, write_evaluation
    from t5forge.eval.metrics import compute_metrics_for_examples

    mine = examples[world.rank :: world.world_size]
    records = generate_predictions(
        model, tokenizer, mine, batch_size=batch_size, max_source_length=cfg.finetune.max_seq_len,
        max_new_tokens=cfg.finetune.max_target_len, num_beams=1, device=device, autocast=autocast,
    ) if mine else []
    if world.distributed:
        gathered = [None] * world.world_size
        torch.distributed.all_gather_object(gathered, records)
        records = [None] * len(examples)
        for rank, part in enumerate(gathered):
            records[rank :: world.world_size] = part
    metrics = compute_metrics_for_examples([r["prediction"] for r in records], examples)
    if world.is_main:
        write_evaluation(out_dir, metrics, records, metadata)
    return {"rougeL": metrics["rougeL"], "exact_match": metrics["exact_match"], "gen_examples": metrics["num_examples"]}


def finetune_evaluator(cfg: RunConfig, plan, examples, name, tokenizer, model, device, autocast, world, run_dir):
    """step -> {eval_loss, eval_accuracy, eval_tokens, rougeL, exact_match, gen_examples, eval_seconds}."""
    from t5forge.data.finetune_loader import FinetuneLoader
    from t5forge.eval.loss import evaluate_loss

    try:
        import t5forge.eval.generation  # noqa: F401  (generation metrics are added when it is installed)
        can_generate = True
    except ModuleNotFoundError as err:
        if err.name != "t5forge.eval.generation":
            raise
        can_generate = False
        if world.is_main:
            log.warning("t5forge.eval.generation is not available: evaluating the held-out loss only")

    # An evaluation micro-batch holds a whole step's examples (batch_size / world size), not the
    # training micro-batch's, so the one-row capacity is sized for that many.
    eval_capacity = pack_capacity(cfg, plan.batch_size // world.world_size, device)

    def evaluate(step: int) -> dict:
        t0 = time.perf_counter()
        # The first reference of every example, in file order, one pass: the same batches every time.
        # An evaluation batch is one optimizer step's worth (optim.batch_size) split over the ranks,
        # without gradient accumulation, so eval.steps means the same examples at any world size.
        # Packed like the training batches when finetune.pack is on: the same sums, less padding.
        loader = FinetuneLoader(
            examples, tokenizer, batch_size=plan.batch_size, rank=world.rank,
            world_size=world.world_size, max_source_length=cfg.finetune.max_seq_len,
            max_target_length=cfg.finetune.max_target_len, seed=cfg.seed, train=False, pack=cfg.finetune.pack,
            pack_source_len=eval_capacity[0], pack_target_len=eval_capacity[1],
        )
        metrics = evaluate_loss(model, itertools.islice(iter(loader), cfg.eval.steps), device,
                                autocast=autocast, world=world)
        if can_generate:
            metadata = {"step": step, "data": name, "run_dir": str(run_dir)}
            metrics.update(generation_metrics(
                model, tokenizer, examples, cfg=cfg, batch_size=plan.micro_batch_size, device=device,
                autocast=autocast, world=world, out_dir=eval_dir(run_dir, step), metadata=metadata,
            ))
        metrics["eval_seconds"] = time.perf_counter() - t0
        return metrics

    return evaluate


def _track_epochs(loader, state: TrainState):
    """The loader's batches, keeping state.epoch (completed passes) current for train_state.json."""
    for batch in loader:
        state.epoch = loader.epochs_completed
        yield batch


class FinetuneTask(Task):
    """What fine-tuning brings to the shared run (train/run_builder.py): the examples, the epoch-based
    Plan and loader, the held-out loss + generation evaluation, the data summary line."""

    def prepare(self, run: Run) -> None:
        from t5forge.plan import make_plan

        cfg = run.cfg
        self.train_examples, self.eval_examples, self.eval_name = load_finetune_data(cfg, run.tokenizer)
        if self.eval_examples and cfg.distributed.strategy == "fsdp" and run.world.distributed:
            # Sharded weights are gathered in every forward, by every rank at once; greedy decoding
            # takes as many forwards as its longest output, which differs by rank.
            raise T5ForgeError(
                "distributed.strategy=fsdp does not run fine-tuning's evaluation (greedy generation takes a "
                "different number of decoding steps on each rank, and sharded weights need every rank in every "
                "forward): fine-tune with distributed.strategy=ddp (the default), or without held-out data")
        run.plan = make_plan(cfg, world_size=run.world.world_size, train_examples=len(self.train_examples),
                             tokenizer_ids=run.tokenizer.vocab_size)

    def train_loader(self, run: Run):
        return build_train_loader(run.cfg, run.plan, self.train_examples, run.tokenizer, run.world, run.device)

    def batches(self, run: Run, loader):
        return _track_epochs(loader, run.state)

    def summary(self, run: Run, loader) -> str:
        cfg = run.cfg
        epochs = f"{cfg.optim.epochs} epoch(s) of " if cfg.optim.epochs > 0 else ""
        held_out = f"{len(self.eval_examples)} held-out ({self.eval_name})" if self.eval_examples else "no held-out set"
        return (f"{run.plan.summary()}\ndata: {epochs}{len(self.train_examples)} training examples "
                f"({loader.steps_per_epoch} steps per epoch), {held_out}{_packing_note(loader)}\n"
                + model_summary(run.model, run.plan, run.tokenizer))

    def evaluator(self, run: Run):
        if self.eval_examples:
            return finetune_evaluator(run.cfg, run.plan, self.eval_examples, self.eval_name, run.tokenizer, run.model,
                                      run.device, run.autocast, run.world, run.run_dir)
        if run.cfg.eval.steps > 0:
            log.info("no held-out data (finetune.validation_files is empty): training without evaluation")
        return None

    # flops_per_step: None. Padded lengths vary per batch: a FLOPs count from the maximum lengths
    # would overstate MFU.

    def done(self, run: Run, state: TrainState) -> str:
        best = f", best eval loss {state.best_eval_loss:.4f} at step {state.best_eval_step}" if state.best_eval_loss else ""
        return (f"done: {state.step} steps ({state.epoch} epoch(s)), {state.examples_seen:,} examples, "
                f"{state.elapsed_train_seconds:.0f}s of training{best}; checkpoints in {checkpoints_dir(run.run_dir)}")


def run_finetune(cfg: RunConfig) -> int:
    if cfg.mode != "ft":
        raise T5ForgeError(f"mode={cfg.mode} is a pre-training config; run it with `t5forge pretrain`")
    return run_task(cfg, FinetuneTask())
