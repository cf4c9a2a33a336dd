"""The plan of a run: numbers derived from the config and the world size, never written back into it.

    plan = make_plan(cfg, world_size=dist.world_size)
    plan.micro_batch_size, plan.grad_acc        # per rank: micro_batch * grad_acc * world = batch_size
    plan.input_length, plan.target_length       # span corruption: 512 -> (568 raw tokens, 114 targets)
                                                # UL2: the longest target of its denoisers (data/ul2.py)
    plan.vocab_size                             # a fresh model's embedding rows (tokenizer.vocab_size given)
    lr = lr_at(plan.schedule_step(state.step, elapsed_s))   # before each optimizer step
    if plan.should_stop(state.step, elapsed_s): ...

With `optim.time_budget` the schedule runs on progress = max(steps done / total_steps, time spent /
budget), i.e. the run ends (with the lr at its floor) when either the steps or the time run out,
whichever comes first. Without a budget, progress is steps done / total_steps.

The hooks' intervals (`plan.log_every_steps`, `eval_every_steps`, `checkpoint_every_steps`) are
the config's, or, where the config says null, scaled with the run's length: about LOG_POINTS log
points and EVAL_POINTS evaluations / checkpoints a run, never sparser than nanoT5's intervals
(NANOT5_INTERVALS), so nanoT5's long runs log as before while a 150-step fine-tune logs every
step. `plan.logs_at(step)` adds step 1 and at least 10 points of the lr warmup, so a plot shows it.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from t5forge.config import RunConfig, time_budget_seconds, warmup_fits
from t5forge.errors import T5ForgeError


@dataclass(frozen=True)
class Plan:
    world_size: int
    batch_size: int  # global sequences per optimizer step (optim.batch_size)
    grad_acc: int  # micro-steps per optimizer step, on every rank
    micro_batch_size: int  # sequences per micro-step per rank
    input_length: int  # encoder tokens per example
    target_length: int  # decoder tokens per example
    raw_input_length: Optional[int]  # pre-training: text tokens per example before span corruption (UL2: None)
    total_steps: int  # optimizer steps: the schedule length and the step limit
    warmup_steps: int
    time_budget_seconds: Optional[float]  # None: no budget, the step count alone drives the schedule
    log_every_steps: int = 100  # train metrics after every N steps (see logs_at)
    warmup_log_every_steps: int = 100  # ... and every N steps during the warmup
    eval_every_steps: int = 100000
    checkpoint_every_steps: int = 100000
    automatic: tuple = ()  # the config keys whose interval was null (resolved here)
    evaluates: bool = True  # eval.steps > 0
    # A fresh model's embedding rows and why (fresh_vocab_size); None: the starting weights' own
    # (or no tokenizer was given to make_plan).
    vocab_size: Optional[int] = None
    vocab_reason: str = ""
    objective: str = ""  # pre-training with UL2: "UL2 mixture of N denoisers" (the summary says so)

    @property
    def time_driven(self) -> bool:
        return self.time_budget_seconds is not None

    @property
    def tokens_per_step(self) -> int:
        """Encoder + decoder tokens per optimizer step, all ranks (padding included when fine-tuning)."""
        return self.batch_size * (self.input_length + self.target_length)

    def progress(self, step: int, elapsed_seconds: float = 0.0) -> float:
        """Fraction of the run done after `step` optimizer steps and `elapsed_seconds` of training."""
        by_steps = step / self.total_steps
        if not self.time_driven:
            return by_steps
        return max(by_steps, elapsed_seconds / self.time_budget_seconds)

    def schedule_step(self, step: int, elapsed_seconds: float = 0.0) -> float:
        """The (possibly fractional) step to evaluate the lr schedule at for the next update."""
        if not self.time_driven:
            return float(step)
        return min(self.progress(step, elapsed_seconds), 1.0) * self.total_steps

    def should_stop(self, step: int, elapsed_seconds: float = 0.0) -> bool:
        return self.progress(step, elapsed_seconds) >= 1.0

    def logs_at(self, step: int) -> bool:
        """Whether the train metrics of `step` (1 = the first) are logged: step 1, every
        log_every_steps, and every warmup_log_every_steps up to the end of the warmup."""
        if step == 1 or step % self.log_every_steps == 0:
            return True
        return step <= self.warmup_steps and step % self.warmup_log_every_steps == 0

    def intervals_summary(self) -> str:
        def note(key: str) -> str:
            return " (auto)" if key in self.automatic else ""

        log = f"intervals: log every {self.log_every_steps} step{'' if self.log_every_steps == 1 else 's'}{note('logging.every_steps')}"
        if self.warmup_steps and self.warmup_log_every_steps < self.log_every_steps:
            log += f", every {self.warmup_log_every_steps} in the {self.warmup_steps} warmup steps"
        if not self.evaluates:
            evaluation = "no evaluation (eval.steps=0)"
        elif self.eval_every_steps >= self.total_steps:
            evaluation = f"eval at the end only{note('eval.every_steps')}"
        else:
            evaluation = f"eval every {self.eval_every_steps}{note('eval.every_steps')}"
        if self.checkpoint_every_steps >= self.total_steps:
            checkpoint = f"checkpoint at the end only{note('checkpoint.every_steps')}"
        else:
            checkpoint = f"checkpoint every {self.checkpoint_every_steps}{note('checkpoint.every_steps')}"
        return f"{log}; {evaluation}; {checkpoint}"

    def summary(self) -> str:
        lines = [
            f"batch {self.batch_size} = {self.world_size} rank(s) x {self.grad_acc} micro-step(s) x {self.micro_batch_size}",
            f"lengths: input {self.input_length}, target {self.target_length}"
            + (f" (span corruption of {self.raw_input_length} text tokens)" if self.raw_input_length else "")
            + (f" ({self.objective}; shorter targets padded)" if self.objective else ""),
            f"steps {self.total_steps} (warmup {self.warmup_steps}), {self.tokens_per_step:,} tokens per step",
            self.intervals_summary(),
        ]
        if self.vocab_size is not None:
            lines.append(f"vocabulary: {self.vocab_size:,} rows ({self.vocab_reason})")
        if self.time_driven:
            lines.append(f"time budget {self.time_budget_seconds:.0f}s drives the schedule; stop at whichever ends first")
        return "\n".join(lines)


# nanoT5's intervals (default.yaml): automatic ones are never sparser, so its long runs keep them.
NANOT5_INTERVALS = {"logging.every_steps": 100, "eval.every_steps": 100000, "checkpoint.every_steps": 100000}
LOG_POINTS = 100  # automatic logging.every_steps: about this many train points a run
EVAL_POINTS = 10  # automatic eval.every_steps / checkpoint.every_steps: about this many a run
WARMUP_LOG_POINTS = 10  # at least this many train points during the lr warmup


def resolve_intervals(cfg: RunConfig, total_steps: int, warmup_steps: int) -> dict:
    """The hooks' intervals: the config's, or for a null key total_steps / points, at least 1 and at
    most nanoT5's interval. Also the denser interval used during the warmup, and the automatic keys."""
    given = {"logging.every_steps": cfg.logging.every_steps, "eval.every_steps": cfg.eval.every_steps,
             "checkpoint.every_steps": cfg.checkpoint.every_steps}
    points = {"logging.every_steps": LOG_POINTS, "eval.every_steps": EVAL_POINTS,
              "checkpoint.every_steps": EVAL_POINTS}
    every = {key: value if value is not None else max(1, min(NANOT5_INTERVALS[key], total_steps // points[key]))
             for key, value in given.items()}
    log_every = every["logging.every_steps"]
    return dict(
        log_every_steps=log_every,
        warmup_log_every_steps=max(1, min(log_every, warmup_steps // WARMUP_LOG_POINTS)) if warmup_steps else log_every,
        eval_every_steps=every["eval.every_steps"],
        checkpoint_every_steps=every["checkpoint.every_steps"],
        automatic=tuple(key for key, value in given.items() if value is None),
        evaluates=cfg.eval.steps > 0,
    )


def split_batch(batch_size: int, grad_acc: int, world_size: int) -> int:
    """Sequences per micro-step per rank; a T5ForgeError listing valid grad_acc values if it does not divide."""
    if world_size < 1:
        raise T5ForgeError(f"world size must be >= 1, got {world_size}")
    per_micro = grad_acc * world_size
    if batch_size % per_micro == 0:
        return batch_size // per_micro
    if batch_size % world_size:
        hint = f"make optim.batch_size a multiple of the world size ({world_size})"
    else:
        ok = [g for g in range(1, batch_size // world_size + 1) if (batch_size // world_size) % g == 0]
        hint = f"with {world_size} rank(s) optim.grad_acc can be one of {', '.join(map(str, ok))}"
    raise T5ForgeError(
        f"optim.batch_size={batch_size} is not divisible by optim.grad_acc ({grad_acc}) x world size "
        f"({world_size}) = {per_micro}; {hint}"
    )


def fresh_vocab_size(cfg: RunConfig, tokenizer_ids: Optional[int]) -> tuple[Optional[int], str]:
    """(embedding rows, why) of a fresh model: model.vocab_size when set, else the tokenizer's ids
    rounded up to a multiple of 128 as T5 does (its 32,100 ids -> 32,128 rows), so that a vocabulary
    trained by `t5forge tokenizer train` sizes the model. (None, "") when the run starts from weights
    (model.checkpoint_path, or model.random_init=false): they keep their own vocabulary."""
    from t5forge.data.tokenizer_train import MULTIPLE, rounded_vocab_size

    m = cfg.model
    if m.checkpoint_path or not m.random_init:
        return None, ""
    if m.vocab_size is not None:
        rows, reason = m.vocab_size, "model.vocab_size"
    elif tokenizer_ids is None:
        return None, ""
    else:
        rows = rounded_vocab_size(tokenizer_ids)
        reason = f"tokenizer: {tokenizer_ids:,} ids, rounded up to a multiple of {MULTIPLE}"
    if tokenizer_ids is not None and rows < tokenizer_ids:
        raise T5ForgeError(
            f"model.vocab_size={rows} is smaller than the tokenizer's {tokenizer_ids} ids; set model.vocab_size "
            f">= {tokenizer_ids} (a multiple of {MULTIPLE} is fastest) or leave it unset to size it from the tokenizer"
        )
    return rows, reason


def make_plan(cfg: RunConfig, world_size: int = 1, train_examples: Optional[int] = None,
              tokenizer_ids: Optional[int] = None, num_sentinels: int = 100) -> Plan:
    """Derive the plan; `train_examples` (fine-tuning) turns optim.epochs into total_steps;
    `tokenizer_ids` (the run's tokenizer.vocab_size) sizes a fresh model's vocabulary;
    `num_sentinels` (the tokenizer's) sets how long UL2's span denoisers' spans must be."""
    o = cfg.optim
    micro = split_batch(o.batch_size, o.grad_acc, world_size)

    objective = ""
    if cfg.mode == "pt" and cfg.data.objective == "ul2":
        from t5forge.data.ul2 import mixture_lengths, parse_mixture

        input_length, raw = cfg.data.input_length, None
        denoisers = parse_mixture(cfg.data.ul2_denoisers)
        target_length = mixture_lengths(input_length, denoisers, num_sentinels)[1]
        objective = f"UL2 mixture of {len(denoisers)} denoiser{'s' if len(denoisers) > 1 else ''}"
    elif cfg.mode == "pt":
        from t5forge.data.span_corruption import compute_input_and_target_lengths

        input_length = cfg.data.input_length
        raw, target_length = compute_input_and_target_lengths(
            input_length, cfg.data.mlm_probability, cfg.data.mean_noise_span_length
        )
    else:
        input_length, target_length, raw = cfg.finetune.max_seq_len, cfg.finetune.max_target_len, None

    if o.epochs > 0:
        if train_examples is None:
            raise T5ForgeError("optim.epochs > 0 needs the training set size; this command trains by steps: set optim.total_steps")
        if train_examples < 1:
            raise T5ForgeError("the training set is empty; check the fine-tuning data files")
        # A last partial batch is still an optimizer step (the loader does not drop it).
        total_steps = math.ceil(train_examples / o.batch_size) * o.epochs
    else:
        total_steps = o.total_steps
    if not warmup_fits(o.lr_scheduler, o.warmup_steps, total_steps):  # the config's rule, on the derived steps
        raise T5ForgeError(
            f"optim.warmup_steps={o.warmup_steps} must be < the {total_steps} training steps for the "
            f"{o.lr_scheduler} schedule"
        )
    vocab_size, vocab_reason = fresh_vocab_size(cfg, tokenizer_ids)
    return Plan(
        world_size=world_size,
        batch_size=o.batch_size,
        grad_acc=o.grad_acc,
        micro_batch_size=micro,
        input_length=input_length,
        target_length=target_length,
        raw_input_length=raw,
        total_steps=total_steps,
        warmup_steps=o.warmup_steps,
        time_budget_seconds=time_budget_seconds(cfg),
        **resolve_intervals(cfg, total_steps, o.warmup_steps),
        vocab_size=vocab_size,
        vocab_reason=vocab_reason,
        objective=objective,
    )


def resolve_model_config(cfg: RunConfig, vocab_size: Optional[int] = None):
    """The T5Config of a fresh model: model.name's architecture + the model.* overrides, with
    `vocab_size` (the plan's, see fresh_vocab_size) embedding rows when given.

    model.name is a built-in architecture (T5Config.from_name) or a directory holding an HF
    `config.json` or a t5forge `model_config.json`. A run that starts from model.checkpoint_path
    takes the architecture from the checkpoint instead.
    """
    from t5forge.model.config import KNOWN_NAMES, T5Config

    m = cfg.model
    path = Path(m.name).expanduser()
    # A built-in name always means the built-in architecture; a folder of that name in the working
    # directory is taken only when written as a path (./tiny).
    builtin = m.name.removeprefix("google-t5/") in KNOWN_NAMES and not m.name.startswith((".", "/", "~"))
    if path.is_dir() and not builtin:
        for file_name in ("model_config.json", "config.json"):
            if (path / file_name).is_file():
                base = T5Config.from_json_file(path / file_name)
                break
        else:
            raise T5ForgeError(f"model.name={m.name!r} is a directory without config.json or model_config.json")
    else:
        try:
            base = T5Config.from_name(m.name)
        except T5ForgeError as err:
            raise T5ForgeError(f"model.name={m.name!r}: {err}") from None
    changes = {**m.architecture_overrides(), "dropout_rate": m.dropout_rate, "attention_backend": m.attention}
    if vocab_size is not None:
        changes["vocab_size"] = vocab_size
    if "num_layers" in changes and "num_decoder_layers" not in changes:
        changes["num_decoder_layers"] = changes["num_layers"]  # as HF: the decoder follows num_layers
    try:
        return base.replace(**changes)
    except T5ForgeError as err:
        raise T5ForgeError(f"model.* overrides on {m.name!r}: {err}") from None
