"""The run config's schema and its rules: one frozen, typed tree of dataclasses (RunConfig).

Key names follow nanoT5 wherever the meaning is the same (`optim.base_lr`, `optim.batch_size`,
`data.input_length`, `eval.every_steps`, ...), so `t5forge pretrain task=pt_8h optim.base_lr=1e-2`
reads like `python -m nanoT5.main task=pt_8h optim.base_lr=1e-2`.

Here: the sections and their keys (each with its help and its own rules, `_key`), walking the
schema (`is_key`, unknown-key errors that list the valid keys), `describe_keys` for --list-keys,
and the checks (`check_value`, CROSS_KEY_RULES, `validate`). Reading and writing configs (presets,
YAML files, `a.b=value`, the run's config.yaml) is `t5forge.config_files`. The config is an input
only: derived numbers (micro-batch, span-corruption lengths, steps from epochs or a time budget)
live in `t5forge.plan.Plan`, counters in `t5forge.train.state.TrainState`.
"""

import dataclasses
import difflib
import functools
import typing
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from t5forge.constraints import Rule, above, at_least, check, file_list, matches, not_blank, one_of, within
from t5forge.data.ul2 import DEFAULT_DENOISERS, mixture_problem
from t5forge.durations import parse_time_budget
from t5forge.errors import T5ForgeError
from t5forge.model.components import HF_COMPONENTS, name_problem

OPTIMIZERS = ("adamwscale", "adamw", "adafactor")
LR_SCHEDULERS = ("cosine", "legacy", "inverse_sqrt", "constant", "linear")
PRECISIONS = ("bf16", "fp32")
MODES = ("pt", "ft")
OBJECTIVES = ("span_corruption", "ul2")
ATTENTIONS = ("sdpa", "eager", "flex")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")  # model/activation_checkpointing.py MODES
ON_NONFINITE = ("rollback", "stop")
DECAYING_SCHEDULES = ("cosine", "linear")  # their warmup must end before the run does


def _key(default, doc: str, *rules: Rule):
    """A config field with its one-line help and the rules its value must keep (t5forge.constraints).

    `validate` checks every key's rules (a null value has none to keep: null means "automatic" or
    "keep model.name's"); `--list-keys` shows them. Rules between keys are CROSS_KEY_RULES."""
    metadata = {"help": doc, "rules": rules}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _device_problem(value: str) -> str:
    hint = " (write cuda for a GPU)" if value == "gpu" else ""
    return f"must be auto, cpu, cuda or cuda:N{hint}"


def _duration_problem(value: str) -> None:
    parse_time_budget(value, key="optim.time_budget")  # raises its own message: how to write a duration


_POSITIVE_OVERRIDE = at_least(1, note="or null to keep model.name's value")


def _registered(kind: str):
    """The value names a registered component of `kind` (model/components.py)."""
    return check("a registered name (model/components.py)", lambda name: name_problem(kind, name))


@dataclass(frozen=True)
class ModelConfig:
    name: str = _key("google/t5-v1_1-base", "architecture: google/t5-v1_1-{small,base,large}, "
                     "google/t5-{small,base,large}-lm-adapt (= v1.1's), google/mt5-{small,base,large}, t5-small, "
                     "t5-base, tiny, or a local HF T5 / mT5 / UMT5 model directory (config.json)",
                     not_blank("name an architecture or a model directory"))
    checkpoint_path: str = _key("", "start from these weights (HF T5 / mT5 / UMT5 dir, t5forge model/checkpoint/run "
                                "dir): continued pre-training / fine-tuning with the checkpoint's architecture and "
                                "vocabulary (model.* architecture overrides are refused); '' = none")
    random_init: bool = _key(True, "without checkpoint_path: true = fresh weights, false = model.name's pretrained weights")
    compile: Optional[bool] = _key(None, "torch.compile the model (bf16 + compile is the GPU recipe); null = on "
                                   "for CUDA (as nanoT5 runs), off for CPU (eager; see model.compile_elementwise)")
    compile_elementwise: Optional[bool] = _key(None, "torch.compile only the residual adds, norms and gated "
                                               "activations while training on CPU (model/fast/compiled.py); null = on "
                                               "there for a residual stream (micro-batch x input length x "
                                               "d_model) of 400k+ elements, unless model.compile")
    activation_checkpointing: str = _key("none", "recompute activations in the backward instead of keeping them, per "
                                         "block (model/activation_checkpointing.py): none = keep all; full = every "
                                         "block of each stack keeps only its input (least memory, one more forward "
                                         "of every block); selective = every other block (blocks 0, 2, 4, ...: about "
                                         "half the saving for half the recompute)", one_of(*ACTIVATION_CHECKPOINTING))
    attention: str = _key("sdpa", "attention back end (flex: FlexAttention, GPU training)",
                          one_of(*ATTENTIONS))
    dropout_rate: float = _key(0.0, "dropout everywhere (nanoT5 overwrites T5's 0.1 with 0.0)", within("[0, 1)"))
    # Architecture overrides on top of model.name (null = keep the named architecture's value).
    vocab_size: Optional[int] = _key(None, "override: embedding rows (>= the tokenizer's ids); null = a fresh "
                                      "model's from the tokenizer, rounded up to a multiple of 128 (T5: 32128)",
                                      _POSITIVE_OVERRIDE)
    d_model: Optional[int] = _key(None, "override: hidden size", _POSITIVE_OVERRIDE)
    d_kv: Optional[int] = _key(None, "override: size of one attention head", _POSITIVE_OVERRIDE)
    d_ff: Optional[int] = _key(None, "override: feed-forward inner size", _POSITIVE_OVERRIDE)
    num_layers: Optional[int] = _key(None, "override: encoder layers (and decoder layers unless num_decoder_layers)",
                                     _POSITIVE_OVERRIDE)
    num_decoder_layers: Optional[int] = _key(None, "override: decoder layers", _POSITIVE_OVERRIDE)
    num_heads: Optional[int] = _key(None, "override: attention heads", _POSITIVE_OVERRIDE)
    relative_attention_num_buckets: Optional[int] = _key(None, "override: relative position buckets", _POSITIVE_OVERRIDE)
    relative_attention_max_distance: Optional[int] = _key(None, "override: relative position max distance",
                                                          _POSITIVE_OVERRIDE)
    feed_forward_proj: Optional[str] = _key(None, "override: relu | gated-gelu | gated-silu | gelu | ...")
    tie_word_embeddings: Optional[bool] = _key(None, "override: share input embedding and LM head")
    model_type: Optional[str] = _key(None, "override: the checkpoint family export writes (config.json model_type): "
                                     "t5 | mt5 (untied) | umt5 (with model.position=t5_bias_per_layer)",
                                     one_of(*HF_COMPONENTS, note="or null to keep model.name's"))
    layer_norm_epsilon: Optional[float] = _key(None, "override: RMSNorm epsilon", above(0))
    # Components by name (model/components.py; docs/architecture.md says how to add one).
    feed_forward: Optional[str] = _key(None, "override: feed-forward component (dense = T5's; switch = "
                                       "sparse mixture of experts, Fedus et al. 2021, see model.num_experts)",
                                       _registered("feed_forward"))
    position: Optional[str] = _key(None, "override: position scheme: t5_bias = T5's learned relative bias "
                                         "(Raffel et al. 2020); t5_bias_per_layer = a table in every layer "
                                         "(UMT5, Chung et al. 2023); alibi = linear distance biases (Press et al. "
                                         "2022, \"Train Short, Test Long\"); rope = rotary position embeddings, q and "
                                         "k of self-attention rotated by position (Su et al. 2021, \"RoFormer\"; "
                                         "needs an even d_kv); none = no position information",
                                   _registered("position"))
    rope_theta: Optional[float] = _key(None, "override: model.position=rope: the base of the rotation frequencies, "
                                       "theta_i = base^(-2i/d_kv); default 10000 (the paper's)", above(0))
    block: Optional[str] = _key(None, "override: block component (pre_norm = T5's; normformer = NormFormer, "
                                "Shleifer et al. 2021: norms after attention and inside the feed-forward, "
                                "head-wise attention scale; primer = Primer's multi-dconv-head attention, So et "
                                "al. 2021: depthwise conv after the self-attention q/k/v projections, full Primer "
                                "with model.feed_forward=squared_relu)", _registered("block"))
    encoder: Optional[str] = _key(None, "override: encoder component (stack = T5's; hourglass = Hourglass, Nawrot "
                                  "et al. 2022, \"Hierarchical Transformers Are More Efficient Language Models\": "
                                  "the middle blocks on a sequence shortened by model.hourglass_factor)",
                                  _registered("encoder"))
    hourglass_factor: Optional[int] = _key(None, "override: model.encoder=hourglass: shortening factor k (average "
                                           "pooling of k tokens, each shortened vector repeated k times back; T5Config "
                                           "default 2)", at_least(2, note="or null for the default, 2"))
    hourglass_pre: Optional[int] = _key(None, "override: model.encoder=hourglass: blocks at full length before the "
                                        "shortened ones (default 1)", at_least(0, note="or null for the default, 1"))
    hourglass_post: Optional[int] = _key(None, "override: model.encoder=hourglass: blocks at full length after the "
                                         "shortened ones (default 1; num_layers - pre - post run shortened)",
                                         at_least(0, note="or null for the default, 1"))
    # The sparse mixture-of-experts feed-forward (model.feed_forward=switch; model/moe.py); unused otherwise.
    num_experts: Optional[int] = _key(None, "override: experts per sparse layer (model.feed_forward=switch); "
                                      "default 8", _POSITIVE_OVERRIDE)
    expert_top_k: Optional[int] = _key(None, "override: experts per token, 1 (Switch, Fedus et al. 2021) or 2 "
                                       "(gates renormalised); default 1",
                                       check("1 or 2", lambda v: None if v in (1, 2) else "must be 1 or 2"))
    expert_capacity_factor: Optional[float] = _key(None, "override: slots per expert = ceil(factor * tokens * top_k "
                                                   "/ experts) in training, the rest dropped (passed through "
                                                   "the residual); default 1.25", above(0))
    moe_every: Optional[int] = _key(None, "override: every k-th layer of each stack is sparse (layers k-1, 2k-1, "
                                    "...), the others dense; default 2", _POSITIVE_OVERRIDE)
    router_aux_loss_coef: Optional[float] = _key(None, "override: weight of the router's load-balancing loss "
                                                 "(logged aux_router_balance); default 0.01", at_least(0.0))
    router_z_loss_coef: Optional[float] = _key(None, "override: weight of the router z-loss (Zoph et al. 2022; "
                                               "logged aux_router_z); default 0.001", at_least(0.0))

    def architecture_overrides(self) -> dict:
        """The set architecture fields, as T5Config keyword arguments."""
        return {f: getattr(self, f) for f in ARCHITECTURE_KEYS if getattr(self, f) is not None}


ARCHITECTURE_KEYS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
    "relative_attention_num_buckets", "relative_attention_max_distance", "feed_forward_proj",
    "tie_word_embeddings", "model_type", "layer_norm_epsilon", "feed_forward", "position", "block", "encoder",
    "hourglass_factor", "hourglass_pre", "hourglass_post", "rope_theta",
    "num_experts", "expert_top_k", "expert_capacity_factor", "moe_every", "router_aux_loss_coef",
    "router_z_loss_coef",
)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _key("allenai/c4", "HF dataset used when train_files is empty ('' = none)")
    dataset_config: str = _key("en", "its configuration name")
    train_files: List[str] = _key([], "local text files (json/jsonl/parquet/txt, .gz ok) instead of the Hub dataset",
                                  file_list())
    validation_files: List[str] = _key([], "held-out files (empty + Hub dataset: its validation split)", file_list())
    text_field: str = _key("text", "field holding the text in json/parquet records")
    tokenizer: str = _key("google/t5-v1_1-base", "spiece.model, tokenizer.json, a directory holding one, or a Hub id",
                          not_blank("name a tokenizer (spiece.model, tokenizer.json, a directory or a Hub id)"))
    input_length: int = _key(512, "encoder tokens per pre-training example (after span corruption)", at_least(8))
    objective: str = _key("span_corruption", "pre-training objective: span_corruption (T5's, with data.mlm_probability "
                          "and data.mean_noise_span_length) | ul2 (UL2's mixture of denoisers, Tay et al. 2022: "
                          "data.ul2_denoisers; adds the paradigm tokens [NLU] [NLG] [S2S] to the vocabulary)",
                          one_of(*OBJECTIVES))
    ul2_denoisers: List[str] = _key(list(DEFAULT_DENOISERS), "data.objective=ul2: the denoisers, each KIND:MEAN_SPAN:"
                                    "RATE:WEIGHT for R (regular) and X (extreme) span corruption, S:RATE:WEIGHT for "
                                    "the S (prefix LM) denoiser; weights are normalised to proportions. Default: "
                                    "the UL2 paper's seven, S at 20%",
                                    check("a list of denoisers like [R:3:0.15:2,X:64:0.5:1,S:0.25:3]", mixture_problem))
    mlm_probability: float = _key(0.15, "span-corruption noise density", within("(0, 1)"))
    mean_noise_span_length: float = _key(3.0, "mean corrupted span length", at_least(1.0))
    num_workers: int = _key(8, "data loader worker processes per rank", at_least(0))
    shuffle_buffer: int = _key(10000, "training chunks shuffled together, as nanoT5's 10,000-example buffer "
                               "(here: consecutive blocks of this many chunks, each permuted); 0 = corpus order",
                               at_least(0))
    allow_changed_files: bool = _key(False, "resume even though the training files changed since the checkpoint "
                                     "(added, removed, resized or rewritten): continue from the saved position")


@dataclass(frozen=True)
class OptimConfig:
    name: str = _key("adamwscale", "the optimizer (adamwscale: nanoT5's AdamW, each step scaled by the weight's RMS)", one_of(*OPTIMIZERS))
    base_lr: float = _key(2e-2, "peak learning rate (the `legacy` schedule ignores it)", above(0))
    batch_size: int = _key(128, "global sequences per optimizer step (all ranks, all micro-steps)", at_least(1))
    total_steps: int = _key(65536, "optimizer steps (schedule length); -1 with epochs > 0")
    epochs: int = _key(-1, "fine-tuning: > 0 sets total_steps from the data size")
    warmup_steps: int = _key(10000, "warmup steps", at_least(0))
    lr_scheduler: str = _key("cosine", "learning-rate schedule after the warmup (legacy: nanoT5's, ignores base_lr)", one_of(*LR_SCHEDULERS))
    final_cosine: float = _key(1e-5, "cosine: lr at the end (absolute)")
    weight_decay: float = _key(0.0, "decoupled weight decay, matrices only (p.dim() >= 2)", at_least(0.0))
    grad_clip: float = _key(1.0, "clip the global grad norm to this (0 = off)", at_least(0.0))
    grad_acc: int = _key(1, "micro-steps per optimizer step (per rank)", at_least(1))
    max_nonfinite_steps: int = _key(8, "stop after this many optimizer steps in a row with a NaN/inf loss or "
                                    "gradient (each is skipped: no update)", at_least(1))
    on_nonfinite: str = _key("rollback", "after optim.max_nonfinite_steps bad steps in a row: 'rollback' to the last "
                             "checkpoint with the learning rate times optim.rollback_lr_factor, or 'stop'",
                             one_of(*ON_NONFINITE))
    rollback_lr_factor: float = _key(0.5, "each rollback multiplies the learning rate by this", within("(0, 1]"))
    max_rollbacks: int = _key(3, "stop instead of rolling back once this many rollbacks were done", at_least(0))
    resume_optimizer: bool = _key(False, "with model.checkpoint_path a t5forge checkpoint or run: continue its "
                                  "optimizer state and schedule step too (the data position and RNGs start afresh; "
                                  "resume=PATH continues a run whole); false = a fresh optimizer and schedule at step 0")
    time_budget: str = _key("", "training-time budget (4h, 90m, 1h30m); drives the schedule; '' = none",
                            check("a duration (4h, 90m, 1h30m, 45s) or ''", _duration_problem))


@dataclass(frozen=True)
class EvalConfig:
    every_steps: Optional[int] = _key(100000, "evaluate every N optimizer steps (and at the end); null = automatic: "
                                      "about 10 evaluations a run", at_least(1))
    steps: int = _key(500, "batches per evaluation (0 = no evaluation)", at_least(0))


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: Optional[int] = _key(100000, "save every N optimizer steps (and at the end); null = automatic: "
                                      "about 10 checkpoints a run", at_least(1))
    keep_last: int = _key(3, "checkpoints kept on disk (0 = all)", at_least(0))
    every_minutes: float = _key(0.0, "also save when this many minutes of wall clock have passed since the "
                                "last save, so a crash costs at most that much (0 = off)", at_least(0.0))


@dataclass(frozen=True)
class LoggingConfig:
    every_steps: Optional[int] = _key(None, "log train metrics every N optimizer steps; null = automatic: about 100 "
                                      "points a run, at most every 100 steps (nanoT5's). Step 1 and at least 10 "
                                      "points of the lr warmup are logged too", at_least(1))
    tensorboard: bool = _key(False, "also write TensorBoard events to out_dir/tensorboard")
    wandb: bool = _key(False, "also log config and metrics to Weights & Biases (pip install wandb; WANDB_MODE=offline "
                       "needs no account); a resumed run continues the same W&B run")
    wandb_project: str = _key("t5forge", "W&B project (the entity from WANDB_ENTITY or your W&B default)")


@dataclass(frozen=True)
class FinetuneConfig:
    sni_dir: str = _key("", "Super-NaturalInstructions folder (splits/default/, tasks/)")
    train_files: List[str] = _key([], "or: seq2seq files (jsonl/json/csv/parquet, .gz ok)", file_list())
    validation_files: List[str] = _key([], "seq2seq files for evaluation", file_list())
    input_field: str = _key("input", "seq2seq files: source field")
    target_field: str = _key("target", "seq2seq files: target field (string or list of references)")
    max_seq_len: int = _key(1024, "encoder tokens (prompts are cut to this)", at_least(1))
    max_target_len: int = _key(128, "decoder tokens (and generation length at evaluation)", at_least(1))
    max_num_instances_per_task: int = _key(100, "SNI instances per task", at_least(1))
    add_task_name: bool = _key(False, "SNI prompt: task name")
    add_task_definition: bool = _key(True, "SNI prompt: task definition")
    num_pos_examples: int = _key(2, "SNI prompt: positive examples", at_least(0))
    num_neg_examples: int = _key(0, "SNI prompt: negative examples", at_least(0))
    add_explanation: bool = _key(False, "SNI prompt: example explanations")
    pack: bool = _key(False, "padding-free training batches: several examples per row, same loss as padded")
    pack_source_len: int = _key(0, "packed row capacity in encoder tokens, at least the micro-batch's longest "
                                "source (0 = automatic: the whole micro-batch in one row with attention=sdpa on "
                                "CPU, else the longest source; longer rows also pay off with attention=flex)", at_least(0))
    pack_target_len: int = _key(0, "packed row capacity in target tokens, at least the micro-batch's longest target "
                                "(0 = automatic, as pack_source_len)", at_least(0))


@dataclass(frozen=True)
class RunConfig:
    mode: str = _key("pt", "pt (pre-training) | ft (fine-tuning); set by the presets", one_of(*MODES))
    seed: int = _key(2137, "random seed (model init, data order, span corruption)")
    precision: str = _key("bf16", "bf16 (autocast, fp32 weights) | fp32", one_of(*PRECISIONS))
    device: str = _key("auto", "where to compute (auto: this rank's GPU when there is one, else the CPU)",
                       matches(r"auto|cpu|cuda(:\d+)?", "auto | cpu | cuda | cuda:N", _device_problem))
    out_dir: str = _key("", "run directory ('' = runs/<command>-<date>-<time>)")
    resume: str = _key("false", "false | auto (newest checkpoint in out_dir, a fresh start when none; needs an "
                       "explicit out_dir) | a checkpoint path; not saved in the run's config.yaml")
    stop_at_step: int = _key(0, "end this process after this step with a checkpoint (the schedule still spans "
                             "the whole run; resume=auto continues it); 0 = run to the end; not saved in the "
                             "run's config.yaml", at_least(0, note="0 = run to the end"))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# ---------------------------------------------------------------------------------- schema walking
@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def _resolve(path: str, source: str):
    """(field type, dotted key) for `path`, or a T5ForgeError naming the key and the valid ones."""
    cls, parts = RunConfig, path.split(".")
    for i, part in enumerate(parts):
        hints = _type_hints(cls)
        prefix = ".".join(parts[:i])
        if part not in hints:
            raise T5ForgeError(_unknown_key_message(path, part, cls, prefix, source))
        tp = hints[part]
        if i < len(parts) - 1 and not _is_section(tp):
            raise T5ForgeError(f"{source}: {'.'.join(parts[: i + 1])} is a value, not a section; unknown key {path!r}")
        cls = tp
    return cls, path


def is_key(path: str) -> bool:
    """Whether `path` (like optim.base_lr) is a config key."""
    try:
        return not _is_section(_resolve(path, "")[0])
    except T5ForgeError:
        return False


# Keys accepted once and never read. An older run's saved config.yaml still names them, so a config
# file drops them with a warning (config_files: the run reloads and resumes); an override or a preset
# naming one gets the unknown-key error, saying why the key went.
RETIRED_KEYS = {
    "logging.grad_l2": "the gradient norm is always logged, as grad_norm",
    "logging.weights_l2": "the weight norm was never logged",
}


def _unknown_key_message(path, part, cls, prefix, source) -> str:
    valid = list(_type_hints(cls))
    close = difflib.get_close_matches(part, valid, n=1)
    hint = f" (did you mean {'.'.join(filter(None, [prefix, close[0]]))}?)" if close else ""
    if path in RETIRED_KEYS:
        hint = f" (removed: {RETIRED_KEYS[path]})"
    where = f"in {prefix}" if prefix else "at the top level"
    extra = "; task=NAME and config=PATH are command-line selectors, not keys" if part in ("task", "config") else ""
    return f"{source}: unknown config key {path!r}{hint}; valid keys {where}: {', '.join(valid)}{extra}"


def _describe_type(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return _describe_type(next(a for a in args if a is not type(None))) + " or null"
    if typing.get_origin(tp) in (list, List):
        return "a list like [a,b]"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _yaml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(value) + "]"
    return "''" if value == "" else str(value)


def describe_keys(cfg: Optional[RunConfig] = None) -> list[tuple[str, str, str, str, str]]:
    """(key, type, value, help, constraint) for every leaf key, in schema order (for docs and
    `--list-keys`); the constraint is `constraint_text(key)`, '' for a key without rules.

    The value is the schema default, or `cfg`'s value when given (a preset's, a file's: what
    `--list-keys task=pt_cpu` shows)."""
    rows = []
    for key, f, tp, value in _leaves(values=cfg):
        if cfg is None:
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((key, _describe_type(tp), _yaml_scalar(value), f.metadata.get("help", ""), constraint_text(key)))
    return rows


# ---------------------------------------------------------------------------------- validation
def _fail(key: str, value, what: str):
    raise T5ForgeError(f"config key {key}={value!r}: {what}")


def warmup_fits(lr_scheduler: str, warmup_steps: int, total_steps: int) -> bool:
    """The one rule between warmup and run length: cosine and linear decay after the warmup, so it
    must end before the run does. The config checks it for a fixed optim.total_steps, the Plan for
    steps derived from optim.epochs."""
    return lr_scheduler not in DECAYING_SCHEDULES or warmup_steps < total_steps


@dataclass(frozen=True)
class CrossKeyRule:
    """A rule between keys: `problem(cfg)` says what is wrong with `key` (None when fine); `text`
    is shown by --list-keys next to the key's own rules. Checked after every key's own rules, so
    it may rely on them (e.g. optim.grad_acc >= 1)."""
    key: str
    text: str
    problem: Callable[[RunConfig], Optional[str]]


def _if(condition: bool, what: str) -> Optional[str]:
    return what if condition else None


# Every rule that involves more than one key, in one place (each key's own rules sit on its _key).
CROSS_KEY_RULES = (
    CrossKeyRule("data.dataset", "needed for pre-training unless data.train_files", lambda c: _if(
        c.mode == "pt" and not c.data.train_files and not c.data.dataset.strip(),
        "is empty and data.train_files too: give one of them")),
    CrossKeyRule("optim.batch_size", "divisible by optim.grad_acc", lambda c: _if(
        c.optim.batch_size % c.optim.grad_acc != 0, f"must be divisible by optim.grad_acc={c.optim.grad_acc}")),
    CrossKeyRule("optim.total_steps", ">= 1 unless optim.epochs > 0", lambda c: _if(
        c.optim.epochs <= 0 and c.optim.total_steps < 1, "must be >= 1 (or set optim.epochs > 0 when fine-tuning)")),
    CrossKeyRule("optim.epochs", "fine-tuning only", lambda c: _if(
        c.optim.epochs > 0 and c.mode == "pt",
        "applies to fine-tuning only; pre-training streams data, set optim.total_steps")),
    CrossKeyRule("optim.warmup_steps", ">= 1 for inverse_sqrt", lambda c: _if(
        c.optim.lr_scheduler == "inverse_sqrt" and c.optim.warmup_steps < 1,
        "must be >= 1 for inverse_sqrt (lr = base_lr * sqrt(warmup / step))")),
    CrossKeyRule("optim.warmup_steps", f"< optim.total_steps for {', '.join(DECAYING_SCHEDULES)}", lambda c: _if(
        c.optim.epochs <= 0 and c.optim.total_steps >= 1
        and not warmup_fits(c.optim.lr_scheduler, c.optim.warmup_steps, c.optim.total_steps),
        f"must be < optim.total_steps={c.optim.total_steps} for {c.optim.lr_scheduler}")),
    CrossKeyRule("optim.resume_optimizer", "needs model.checkpoint_path", lambda c: _if(
        c.optim.resume_optimizer and not c.model.checkpoint_path,
        "takes the optimizer state of the starting checkpoint: set model.checkpoint_path (a t5forge run or "
        "checkpoint)")),
    CrossKeyRule("optim.final_cosine", "in [0, optim.base_lr]", lambda c: _if(
        not 0 <= c.optim.final_cosine <= c.optim.base_lr, f"must be in [0, optim.base_lr={c.optim.base_lr}]")),
)


def _leaves(cls=None, prefix: str = "", values=None):
    """(dotted key, dataclass field, type, value or None) for every leaf key, in schema order."""
    cls = cls or RunConfig
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(values, f.name) if values is not None else None
        if _is_section(hints[f.name]):
            yield from _leaves(hints[f.name], f"{prefix}{f.name}.", value)
        else:
            yield f"{prefix}{f.name}", f, hints[f.name], value


@functools.lru_cache(maxsize=None)
def _rules() -> dict:
    return {key: f.metadata.get("rules", ()) for key, f, _, _ in _leaves()}


def check_value(key: str, value) -> None:
    """`key`'s own rules on `value` (None passes: null means automatic); the T5ForgeError names the
    key, the value and what it must be. Code that takes a config value as an argument checks it
    here, so it keeps the config's rule and wording."""
    if value is None:
        return
    for rule in _rules()[key]:
        what = rule.problem(value)
        if what:
            _fail(key, value, what)


def validate(cfg: RunConfig) -> None:
    """Every key's own rules, then CROSS_KEY_RULES: the checks that need no file system and no other
    module; the Plan checks what depends on the world size or the data."""
    for key, _, _, value in _leaves(values=cfg):
        check_value(key, value)
    for rule in CROSS_KEY_RULES:
        what = rule.problem(cfg)
        if what:
            section, _, name = rule.key.rpartition(".")
            _fail(rule.key, getattr(getattr(cfg, section) if section else cfg, name), what)


def constraint_text(key: str) -> str:
    """`key`'s rules as --list-keys shows them: its own, then those it shares with other keys
    (">= 1; divisible by optim.grad_acc"); '' for a key without rules."""
    texts = [rule.text for rule in _rules()[key]] + [rule.text for rule in CROSS_KEY_RULES if rule.key == key]
    nullable = type(None) in typing.get_args(_resolve(key, "constraint_text")[0])
    return "; ".join(texts) + (", or null" if texts and nullable else "")


def time_budget_seconds(cfg: RunConfig) -> Optional[float]:
    """optim.time_budget in seconds, or None when there is no budget."""
    return parse_time_budget(cfg.optim.time_budget, key="optim.time_budget")
