"""The training loop shared by pre-training and fine-tuning.

One optimizer step = `plan.grad_acc` micro-batches per rank. The loss of the step is the summed
token cross-entropy divided by the number of target tokens in the WHOLE step (all micro-batches,
all ranks), so long and short targets weigh by their tokens, as if the step were one big batch;
nanoT5 averages per micro-batch instead, which biases towards short targets when lengths vary.

After each step three hooks run at the plan's intervals (the config's, or scaled with the run's
length where it says null; see t5forge.plan): log (`plan.logs_at(step)`: every
`logging.every_steps`, step 1 and densely through the lr warmup), evaluate (every
`eval.every_steps`) and checkpoint (every `checkpoint.every_steps`, and every
`checkpoint.every_minutes` of wall clock); the run ends when the plan says so (steps done, or
`optim.time_budget` spent) with a final checkpoint and then a final evaluation, so a failing
evaluation never costs the trained weights. SIGTERM / SIGINT / SIGUSR1 end the run after the
current step with a checkpoint (RunStopped, exit code 75).
The time budget counts training steps only: compile warm-up, evaluation and checkpoint writing
run with the stopwatch paused.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import torch

from t5forge.distributed import World, all_reduce_sum, host_max, micro_step_sync, plain_norm
from t5forge.errors import RunStopped, T5ForgeError
from t5forge.model import fast
from t5forge.model.loss import TokenNLL
from t5forge.optim.schedules import set_lr
from t5forge.stop_signals import StopRequests
from t5forge.train.checkpoint import Checkpointer, checkpoint_step, unwrap_model
from t5forge.train.metrics_log import MetricsLogger, estimate_mfu
from t5forge.train.nonfinite import NonfiniteSteps, roll_back_if_due, check_weights_finite, warn_if_collapsed
from t5forge.train.setup import compiles
from t5forge.train.state import TrainState
from t5forge.train.timing import Stopwatch

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels",
                "encoder_segment_ids", "decoder_segment_ids")


@dataclass
class LoopParts:
    """Everything the loop touches, built by train/run_builder.py."""

    cfg: Any  # RunConfig
    plan: Any  # Plan
    model: torch.nn.Module  # possibly DDP- and compile-wrapped
    optimizer: torch.optim.Optimizer
    lr_at: Callable[[float], float]
    train_batches: Iterable[dict]  # endless iterator of micro-batches (the loader repeats epochs)
    evaluate: Callable[[int], dict] | None  # step -> metrics, or None for no evaluation
    checkpointer: Checkpointer
    # name -> stateful part (run_builder.checkpoint_parts): what every checkpoint saves, and what a
    # rollback restores; its "train_state" part holds the TrainState the loop advances
    checkpoint_parts: Mapping[str, Any]
    logger: MetricsLogger
    world: World
    device: torch.device
    autocast: Callable[[], Any]
    flops_per_step: float | None = None  # global training FLOPs per optimizer step (for MFU)
    peak_flops: float | None = None  # one device's peak FLOP/s in the run's precision
    # a fresh iterator of micro-batches from the loader's (restored) position, for a rollback
    restart_data: Callable[[], Iterable[dict]] | None = None
    loss: torch.nn.Module | None = None  # the token NLL (model/loss.py, or its fast twin); None: TokenNLL()


def count_tokens(batch: dict) -> int:
    """Encoder input tokens + decoder target tokens of a micro-batch, padding excluded (padded or packed)."""
    if "attention_mask" in batch:
        n_in = int(batch["attention_mask"].sum())
    elif "encoder_segment_ids" in batch:
        n_in = int((batch["encoder_segment_ids"] != 0).sum())
    else:
        n_in = batch["input_ids"].numel()
    return n_in + int((batch["labels"] != -100).sum())


def count_examples(batch: dict) -> int:
    """Examples (input, target pairs) in a micro-batch: rows, or in packed rows their segments, that
    hold a target token. A fine-tuning step's filler micro-batch (all labels -100) counts none; a
    packed row counts each example in it."""
    valid = batch["labels"] != -100
    if "decoder_segment_ids" in batch:
        segments = batch["decoder_segment_ids"]  # 1..k within each row (data/packing.py), 0 = padding
        keys = torch.arange(segments.shape[0]).unsqueeze(1) * (int(segments.max()) + 1) + segments
        return int(torch.unique(keys[valid]).numel())
    return int(valid.any(dim=1).sum())


def count_targets(batches: list[dict]) -> int:
    """Target tokens (labels != -100) of host micro-batches: no device read."""
    return sum(int((b["labels"] != -100).sum()) for b in batches)


def step_targets(local_targets: int, device: torch.device, world: World):
    """All ranks' target tokens of a step: a Python float in a single process; under torchrun a
    0-d device tensor, copied from pinned memory without waiting, then all-reduced."""
    if not world.distributed:
        return float(local_targets)
    host = torch.tensor(float(local_targets), pin_memory=device.type == "cuda")
    return all_reduce_sum(host.to(device, non_blocking=True), world)


class StepResult(NamedTuple):
    """What one optimizer step returns, as device tensors (read only when logged)."""

    loss_sum: torch.Tensor  # summed token NLL over all micro-batches and ranks
    n_targets: Any  # the step's target tokens, all ranks (float, or a 0-d tensor under torchrun)
    grad_norm: torch.Tensor
    finite: torch.Tensor  # False: NaN / inf loss or gradient norm, the update was skipped
    aux: dict  # auxiliary loss name -> its term, averaged over micro-batches and ranks (unweighted)


def train_step(model, optimizer, batches: list[dict], lr: float, *, grad_clip: float, device: torch.device,
               autocast: Callable[[], Any] = contextlib.nullcontext, world: World = World(),
               local_targets: int | None = None, host_reads: bool | None = None,
               loss_fn: torch.nn.Module | None = None) -> StepResult:
    """One optimizer step over the micro-`batches`. The model gives hidden states and auxiliary
    losses; `loss_fn` (model/loss.py's TokenNLL or its fast twin) the summed token NLL. The step
    minimises NLL / (target tokens of the whole step, all ranks) + sum(weight x aux term), each aux
    term averaged over the step's micro-batches and ranks. A non-finite loss or gradient norm skips
    the update (weights and optimizer state unchanged). `host_reads` (default: on CPU only, where
    reading a tensor costs no device sync) allows reading device values; without it the step never
    waits for the device, and a non-finite step is skipped by the optimizer itself where it can
    (see masked_step)."""
    if host_reads is None:
        host_reads = torch.device(device).type == "cpu"
    if local_targets is None:
        local_targets = count_targets(batches)
    if local_targets == 0 and not world.distributed:
        raise T5ForgeError("every target token of an optimizer step is padding (-100); check the data")
    loss_fn = loss_fn if loss_fn is not None else TokenNLL()
    core = unwrap_model(model)
    n_targets = step_targets(local_targets, device, world)
    loss_sum = torch.zeros((), device=device)
    aux_sum: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in MODEL_INPUTS}
        last = i == len(batches) - 1
        # DDP and FSDP reduce gradients only on the last micro-step of the optimizer step.
        sync = micro_step_sync(model, core, last) if world.distributed else contextlib.nullcontext()
        with sync:
            with autocast():
                out = model(**batch)
                nll = loss_fn(*core.output_projection(out.hidden), batch["labels"])
            # DDP and FSDP average gradients over ranks; multiply back so the step's gradient is the
            # gradient of (all ranks' summed NLL / all ranks' target tokens) + the mean aux terms.
            total = nll * (world.world_size / n_targets)
            for name, aux in out.aux_losses.items():
                total = total + aux.term * (aux.weight / len(batches))
                aux_sum[name] = aux_sum.get(name, 0.0) + aux.term.detach().float() / len(batches)
            total.backward()
        loss_sum += nll.detach()
    set_lr(optimizer, lr)
    params = [p for p in core.parameters() if p.grad is not None]
    loss_sum = all_reduce_sum(loss_sum, world)
    aux_mean = {name: all_reduce_sum(term, world) / world.world_size for name, term in aux_sum.items()}
    grad_norm = clip_gradients(params, grad_clip, host_reads=host_reads)
    # The gradient norm is the same on every rank (DDP averaged the gradients; FSDP's norm is
    # reduced over the shards), the loss all-reduced:
    # every rank takes the same decision.
    finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
    if host_reads:
        if bool(finite):
            optimizer.step()
    else:
        masked_step(optimizer, finite)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, n_targets, grad_norm, finite, aux_mean)


def masked_step(optimizer, finite: torch.Tensor) -> None:
    """optimizer.step() that leaves everything unchanged when `finite` is False. torch's fused AdamW
    takes the flag as an attribute, AdamWScale as an argument (both skip on the device and keep their
    step counts right); any other optimizer needs the flag on the host: one read of a 0-d tensor."""
    if getattr(optimizer, "accepts_found_inf", False):
        optimizer.step(found_inf=(~finite).float())
    elif isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused"):
        optimizer.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(finite):
        optimizer.step()


def clip_gradients(params: list[torch.Tensor], max_norm: float, host_reads: bool | None = None) -> torch.Tensor:
    """The gradients' total L2 norm (logged), after scaling them to at most max_norm when max_norm > 0:
    what torch.nn.utils.clip_grad_norm_ returns and does. That function multiplies every gradient by
    min(1, max_norm / (norm + 1e-6)) even when the factor is 1, a pass over all gradients
    (read and written: twice the model's size in memory traffic); here the pass runs only when it changes something: never without
    a limit (nanoT5's fine-tuning), and with `host_reads` (default: on CPU, where reading the norm
    costs no device sync) only when the norm is over the limit."""
    norm = plain_norm(torch.nn.utils.get_total_norm([p.grad for p in params], 2.0))  # FSDP: over all shards
    if host_reads is None:
        host_reads = norm.device.type == "cpu"
    if max_norm > 0 and (not host_reads or max_norm / (float(norm) + 1e-6) < 1.0):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def save_checkpoint(parts: LoopParts, state: TrainState) -> Path:
    check_weights_finite(parts.model, state.step, parts.checkpointer.latest)
    return parts.checkpointer.save(parts.checkpoint_parts, step=state.step)


def run_evaluation(parts: LoopParts, state: TrainState) -> None:
    metrics = parts.evaluate(state.step)
    best = state.update_best(metrics.get("eval_loss", math.nan))
    parts.logger.log_eval(state.step, **metrics, best=best)


def _evaluate_or_explain(parts: LoopParts, state: TrainState, saved: Path | None, save: Callable[[], Path]) -> None:
    """run_evaluation; when it fails, make sure the weights of this step are on disk (`saved`, or
    a checkpoint written now) and say so in the error."""
    try:
        run_evaluation(parts, state)
    except Exception as err:  # noqa: BLE001 (any failure: the trained weights must not be lost)
        if saved is None:
            saved = save()
        reason = str(err) if isinstance(err, T5ForgeError) else f"{type(err).__name__}: {err}"
        raise T5ForgeError(
            f"the evaluation at step {state.step} failed: {reason}; the weights of step {state.step} are saved in "
            f"{saved}; fix the held-out data and relaunch with resume=auto (it runs the missing evaluation, "
            f"then continues)"
        ) from err


def _agree(flags: list[float], parts: LoopParts) -> list[bool]:
    """The ranks' maximum of each flag (identity in a single process), so every rank takes the same branch."""
    return [bool(v) for v in host_max(flags, parts.world)]


def train(parts: LoopParts, state: TrainState) -> TrainState:
    """Run optimizer steps until the plan says stop; returns the final train state.

    Raises RunStopped after a checkpoint when SIGTERM / SIGINT / SIGUSR1 arrives (see stop_signals)."""
    with StopRequests() as stops:
        return _train(parts, state, stops)


def _train(parts: LoopParts, state: TrainState, stops: StopRequests) -> TrainState:
    cfg, plan = parts.cfg, parts.plan
    every_eval, every_ckpt = plan.eval_every_steps, plan.checkpoint_every_steps
    every_seconds = cfg.checkpoint.every_minutes * 60
    stopwatch = Stopwatch(initial=state.elapsed_train_seconds)
    wall_start = time.perf_counter() - state.elapsed_wall_seconds

    def fresh_window() -> dict:  # what a log record averages over: the steps since the last one
        zero = torch.zeros((), device=parts.device)
        return {"loss": zero.clone(), "targets": zero.clone(), "steps": 0, "tokens": 0, "seconds": 0.0,
                "aux": {}, "finite_steps": zero.clone()}

    window = fresh_window()
    first_step_of_process = True
    compiling = compiles(cfg.model, parts.device) or fast.enabled_in(unwrap_model(parts.model))
    skipped = NonfiniteSteps(parts.device, cfg.optim.max_nonfinite_steps)
    host_reads = parts.device.type == "cpu"
    collapse_warned = False
    last_eval = -1
    # Resumed from this run's own checkpoint of this step: it is on disk already (resume=PATH may
    # name another run's, which this run then saves in its own out_dir).
    saved_at: Path | None = parts.checkpointer.latest() if state.step > 0 else None
    if saved_at is not None and checkpoint_step(saved_at) != state.step:
        saved_at = None
    last_ckpt = state.step if saved_at is not None else -1
    last_save_time = time.perf_counter()

    def save() -> Path:
        nonlocal last_ckpt, last_save_time, saved_at
        skipped.check(state.step, parts.checkpointer.latest)  # never save after too many bad steps
        state.elapsed_wall_seconds = time.perf_counter() - wall_start
        saved_at = save_checkpoint(parts, state)
        last_ckpt, last_save_time = state.step, time.perf_counter()
        return saved_at

    # stop_at_step ends this process early (a checkpoint, no final evaluation); the schedule still
    # spans the whole run and resume=auto continues it, as a preemptible job would.
    stop_at = cfg.stop_at_step if cfg.stop_at_step > 0 else None

    if parts.evaluate is not None and state.step > 0 and state.step != stop_at:
        # Resumed at step N, whose checkpoint is written before its evaluation when N is the last
        # step. If metrics.jsonl (rank 0's) has N's eval record, it counts for best_eval and is not
        # repeated; if not (the run stopped during that evaluation, or a crash cut the record), the
        # evaluation runs now (a finished run's, after the loop below).
        record = parts.logger.eval_record(state.step)
        if record is not None and record.get("eval_loss") is not None:
            state.update_best(record["eval_loss"])
        (have,) = _agree([float(record is not None)], parts)
        if have:
            last_eval = state.step
        elif state.step % every_eval == 0 and not plan.should_stop(state.step, stopwatch.elapsed):
            _evaluate_or_explain(parts, state, saved_at, save)
            last_eval = state.step

    parts.model.train()
    while not plan.should_stop(state.step, stopwatch.elapsed) and state.step != stop_at:
        lr = parts.lr_at(plan.schedule_step(state.step, stopwatch.elapsed)) * state.lr_factor
        t0 = time.perf_counter()
        # The first step of a compiled model (or of its compiled elementwise stretches) is mostly
        # compilation: keep it off the budget clock.
        warmup = first_step_of_process and compiling
        if not warmup:
            stopwatch.start()
        batches = [next(parts.train_batches) for _ in range(plan.grad_acc)]
        tokens = sum(count_tokens(b) for b in batches)
        examples = sum(count_examples(b) for b in batches)
        loss_sum, n_targets, grad_norm, finite, aux = train_step(
            parts.model, parts.optimizer, batches, lr, grad_clip=cfg.optim.grad_clip, device=parts.device,
            autocast=parts.autocast, world=parts.world, host_reads=host_reads, loss_fn=parts.loss,
        )
        skipped.update(finite)
        stopwatch.pause()
        first_step_of_process = False

        state.step += 1
        state.tokens_seen += tokens * parts.world.world_size
        # Skipped steps stay out of the logged loss (it would be NaN until the next log).
        window["loss"] += torch.where(finite, loss_sum, 0.0)
        window["targets"] += finite * n_targets
        for name, term in aux.items():  # the auxiliary terms of the finite steps, logged as aux_NAME
            window["aux"][name] = window["aux"].get(name, 0.0) + torch.where(finite, term, 0.0)
        window["finite_steps"] = window["finite_steps"] + finite
        window["steps"] += 1
        window["tokens"] += tokens * parts.world.world_size
        window["seconds"] += time.perf_counter() - t0
        parts.logger.advance(state.step)

        # Every rank stops (or saves on the clock) at the same step: rank 0's clock decides the
        # time-based saves, any rank's signal the stop.
        time_due = every_seconds > 0 and parts.world.is_main and time.perf_counter() - last_save_time >= every_seconds
        # Each rank's examples ride along in the same reduction: rank r's count in slot r (the others
        # 0), so the maximum holds every rank's (the last step of an epoch may be partial, and packing
        # puts several examples in a row).
        per_rank = [0.0] * parts.world.world_size
        per_rank[parts.world.rank] = float(examples)
        stop_flag, due_flag, *per_rank = host_max(
            [float(stops.signal_name is not None), float(time_due), *per_rank], parts.world)
        stop_now, save_now = bool(stop_flag), bool(due_flag)
        state.examples_seen += int(sum(per_rank))
        finished = plan.should_stop(state.step, stopwatch.elapsed)

        log_now = plan.logs_at(state.step) or state.step == stop_at or stop_now or finished
        if ((log_now or state.step % every_ckpt == 0 or save_now or (host_reads and not bool(finite)))
                and (back := roll_back_if_due(parts, state, skipped)) is not None):
            last_ckpt, saved_at, last_save_time, last_eval = state.step, back, time.perf_counter(), state.step
            window.update(fresh_window())
            continue
        if log_now:
            skipped_steps = skipped.check(state.step, parts.checkpointer.latest)
            loss = (window["loss"] / window["targets"]).item()  # the host reads of a log step
            norm = float(grad_norm)
            if not collapse_warned:
                collapse_warned = warn_if_collapsed(loss, norm, unwrap_model(parts.model).config.vocab_size, state.step)
            seconds = window["seconds"] / window["steps"]
            parts.logger.log_train(
                state.step, loss=loss, grad_norm=norm, lr=lr, seconds_per_step=seconds,
                tokens_per_s=window["tokens"] / window["seconds"],
                mfu=estimate_mfu(parts.flops_per_step, seconds, (parts.peak_flops or 0) * parts.world.world_size),
                elapsed_train_seconds=stopwatch.elapsed, skipped_steps=skipped_steps,
                elapsed_seconds=time.perf_counter() - wall_start,  # wall clock since the run began, over resumes
                **{f"aux_{name}": (total / window["finite_steps"]).item() for name, total in window["aux"].items()},
            )
            window.update(fresh_window())

        elif host_reads and not bool(finite):  # free on CPU: stop as soon as the limit is reached
            skipped.check(state.step, parts.checkpointer.latest)

        state.elapsed_train_seconds = stopwatch.elapsed
        state.elapsed_wall_seconds = time.perf_counter() - wall_start
        # The final evaluation runs after the final checkpoint (below): a failure there keeps the weights.
        if parts.evaluate is not None and state.step % every_eval == 0 and not finished:
            _evaluate_or_explain(parts, state, None, save)
            last_eval = state.step
        if state.step % every_ckpt == 0 or save_now or (stop_now and last_ckpt != state.step):
            save()
        if stop_now:
            who = stops.signal_name or "a signal to another process"
            raise RunStopped(f"stopped by {who} at step {state.step}; checkpoint {saved_at}; "
                             f"continue with resume=auto")

    if last_ckpt != state.step:
        save()
    if parts.evaluate is not None and last_eval != state.step and state.step != stop_at:
        _evaluate_or_explain(parts, state, saved_at, save)
    state.elapsed_wall_seconds = time.perf_counter() - wall_start
    return state
