"""`t5forge evaluate`: score a model (HF directory, t5forge model dir, checkpoint or run dir).

On a run directory or a checkpoint, every evaluation setting defaults to what the run itself
used (its saved config.yaml): the held-out files, input length, noise, batch size, `eval.steps`
batches, seed, precision and tokenizer of a pre-training run; the SNI folder or seq2seq files,
prompt format and lengths of a fine-tuning run. Options given on the command line win.

    t5forge evaluate RUN_DIR                          # what the run evaluates, as it does
    t5forge evaluate RUN_DIR --heldout other-validation.json.gz --batches 100
    t5forge evaluate RUN_DIR --sni data/sni --split test --max-instances 100 --output eval/sni
    t5forge evaluate MODEL --files dev.jsonl --input-field question --target-field answer --num-beams 4
    t5forge evaluate HF_MODEL --heldout c4-validation.*.json.gz --input-length 512 --batches 100

A short table goes to stdout; with --output DIR, `metrics.json` (and for generation
`predictions.jsonl`) are written there.
"""

from __future__ import annotations

import math
from pathlib import Path

from t5forge.errors import T5ForgeError
from t5forge.eval.run_settings import heldout_config, load_run_settings, micro_batch_size

HELP = "Evaluate a model: SNI / seq2seq generation metrics or held-out span-corruption loss."
RUN = "the run's"  # help text: a default read from the run's config.yaml


def add_arguments(parser) -> None:
    parser.add_argument("model_path", metavar="MODEL_PATH", nargs="?",
                        help="HF T5 dir, t5forge model/checkpoint dir or run dir")
    mode = parser.add_argument_group(
        "what to evaluate (choose one; on a run or checkpoint, nothing = what the run evaluates)")
    mode.add_argument("--sni", nargs="?", const="", metavar="DIR",
                      help="Super-NaturalInstructions folder (splits/default/*.txt + tasks/*.json); "
                           "no DIR = the fine-tuning run's finetune.sni_dir")
    mode.add_argument("--files", nargs="*", metavar="FILE",
                      help="seq2seq files (jsonl/json/csv/parquet); no FILE = the run's finetune.validation_files")
    mode.add_argument("--heldout", nargs="*", metavar="FILE",
                      help="text files (json/jsonl/txt/parquet, globs allowed) for the held-out span-corruption "
                           "loss; no FILE = the run's data.validation_files")

    gen = parser.add_argument_group("generation (--sni / --files)")
    gen.add_argument("--split", default="test", choices=("train", "test"), help="SNI split (default: test)")
    gen.add_argument("--max-instances", type=int, metavar="N", default=None,
                     help=f"SNI instances per task (default: {RUN} finetune.max_num_instances_per_task, else 100, "
                          "the official evaluation set)")
    gen.add_argument("--input-field", metavar="NAME", default=None,
                     help=f"--files: field holding the source text (default: {RUN}, else input)")
    gen.add_argument("--target-field", metavar="NAME", default=None,
                     help=f"--files: field holding the reference(s) (default: {RUN}, else target)")
    gen.add_argument("--id-field", metavar="NAME", default=None,
                     help="--files: field holding an example id (default: file:row)")
    gen.add_argument("--task-field", metavar="NAME", default=None, help="--files: field to group per-task metrics by")
    gen.add_argument("--max-source-length", type=int, metavar="N", default=None,
                     help=f"source tokens kept (default: {RUN} finetune.max_seq_len, else 1024)")
    gen.add_argument("--max-new-tokens", type=int, metavar="N", default=None,
                     help=f"generated tokens at most (default: {RUN} finetune.max_target_len, else 128)")
    gen.add_argument("--num-beams", type=int, metavar="N", default=1, help="1 = greedy (default)")

    held = parser.add_argument_group("held-out loss (--heldout)")
    held.add_argument("--input-length", type=int, metavar="N", default=None,
                      help=f"encoder tokens per example (default: {RUN} data.input_length, else 512)")
    held.add_argument("--batches", type=int, metavar="N", default=None,
                      help=f"evaluate the first N batches (default: {RUN} eval.steps, else all)")
    held.add_argument("--text-field", metavar="NAME", default=None,
                      help=f"field of each record holding the text (default: {RUN}, else text)")
    held.add_argument("--noise-density", type=float, metavar="F", default=None,
                      help=f"masked token fraction (default: {RUN} data.mlm_probability, else 0.15)")
    held.add_argument("--mean-noise-span-length", type=float, metavar="F", default=None,
                      help=f"(default: {RUN} data.mean_noise_span_length, else 3.0)")

    common = parser.add_argument_group("common")
    common.add_argument("--tokenizer", metavar="PATH", default=None,
                        help="spiece.model / tokenizer.json / folder (default: the one stored with the model, "
                             "else the run's data.tokenizer)")
    common.add_argument("--seed", type=int, metavar="N", default=None,
                        help=f"SNI instance shuffling / held-out noise masks (default: {RUN} seed, else 42 for "
                             "SNI as Tk-Instruct, 2137 for held-out as pretrain)")
    common.add_argument("--batch-size", type=int, metavar="N", default=None,
                        help=f"examples per batch (default: {RUN} micro-batch, else 16)")
    common.add_argument("--output", type=Path, metavar="DIR", help="write metrics.json (and predictions.jsonl) here")
    common.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ... (default: auto)")
    common.add_argument("--precision", default=None, choices=("fp32", "bf16"),
                        help=f"bf16 = bf16 autocast with fp32 weights (default: {RUN}, else fp32)")


# ---------------------------------------------------------------------------------- model path, mode
def _looks_like_model(spec) -> bool:
    from t5forge.run_layout import looks_like_run_or_model

    return looks_like_run_or_model(spec)


def _take_model_path(args) -> None:
    """`evaluate --heldout RUN` (the mode option swallowed the run directory): take it back."""
    if args.model_path is not None:
        return
    for name in ("heldout", "files"):
        items = getattr(args, name)
        if items and _looks_like_model(items[-1]):
            args.model_path = items[-1]
            setattr(args, name, items[:-1])
            return
    if args.sni and _looks_like_model(args.sni):
        args.model_path, args.sni = args.sni, ""
        return
    raise T5ForgeError("give MODEL_PATH: a run directory, a checkpoint, or a model directory "
                       "(e.g. t5forge evaluate RUN_DIR --heldout)")


def _mode(args, settings) -> str:
    chosen = [name for name in ("sni", "files", "heldout") if getattr(args, name) is not None]
    if len(chosen) > 1:
        raise T5ForgeError(f"choose one of --sni, --files, --heldout (got {', '.join('--' + c for c in chosen)})")
    if chosen:
        return chosen[0]
    if settings is not None:  # what the run evaluates
        cfg = settings.cfg
        if cfg.mode == "pt":
            args.heldout = []
            return "heldout"
        if cfg.finetune.sni_dir:
            args.sni = ""
            return "sni"
        if cfg.finetune.validation_files:
            args.files = []
            return "files"
    raise T5ForgeError(
        "nothing to evaluate: give --sni DIR, --files F.jsonl (with --input-field/--target-field) "
        "or --heldout FILES"
    )


# ---------------------------------------------------------------------------------- settings
def _run_kind(settings) -> str:
    return "pre-training" if settings.cfg.mode == "pt" else "fine-tuning"


def _generation_defaults(args, mode, settings) -> bool:
    """Fill the generation options left unset from a fine-tuning run's config (or the built-in
    defaults); True when the run's settings were used."""
    ft = settings.cfg.finetune if settings is not None and settings.cfg.mode == "ft" else None
    if settings is None:
        where = f"{args.model_path} has no run config.yaml"
    elif ft is None:
        where = f"{settings.source} is a pre-training run's config"
    else:
        where = f"{settings.source} sets none"
    if mode == "sni" and not args.sni:
        if ft is None or not ft.sni_dir:
            raise T5ForgeError(f"--sni without DIR takes the fine-tuning run's finetune.sni_dir, but {where}; "
                               "give --sni DIR")
        args.sni = ft.sni_dir
    if mode == "files" and not args.files:
        if ft is None or not ft.validation_files:
            raise T5ForgeError(f"--files without FILE takes the fine-tuning run's finetune.validation_files, but "
                               f"{where}; give --files FILE ...")
        args.files = list(ft.validation_files)
    if mode == "sni":
        args.sni = Path(args.sni)
    else:
        args.files = [Path(f) for f in args.files]
    defaults = {  # option: (the run's value, the value without a run)
        "max_instances": (ft and ft.max_num_instances_per_task, 100),
        "max_source_length": (ft and ft.max_seq_len, 1024),
        "max_new_tokens": (ft and ft.max_target_len, 128),
        "input_field": (ft and ft.input_field, "input"),
        "target_field": (ft and ft.target_field, "target"),
        "seed": (settings.cfg.seed if ft else None, 42),
        "batch_size": (micro_batch_size(settings) if ft else None, 16),
    }
    for name, (from_run, fallback) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, from_run if ft is not None else fallback)
    args.prompt_format = None
    if ft is not None:
        from t5forge.data.instructions import PromptFormat

        args.prompt_format = PromptFormat(
            add_task_name=ft.add_task_name, add_task_definition=ft.add_task_definition,
            num_pos_examples=ft.num_pos_examples, num_neg_examples=ft.num_neg_examples,
            add_explanation=ft.add_explanation)
    return ft is not None


def _heldout_settings(args, settings):
    """(cfg, micro-batch, requested batches) for pretrain's held-out loader; the files are checked
    here, before the model loads: a typo should not cost a minute of loading."""
    from t5forge.data.sources import resolve_files

    held = heldout_config(settings, files=args.heldout, text_field=args.text_field, input_length=args.input_length,
                          noise_density=args.noise_density, mean_noise_span_length=args.mean_noise_span_length,
                          seed=args.seed, batch_size=args.batch_size, batches=args.batches)
    cfg = held[0]
    if args.heldout:
        resolve_files(args.heldout)
        return held
    if settings is None or settings.cfg.mode != "pt":
        what = f"{settings.source} is a fine-tuning run" if settings is not None else \
            f"{args.model_path} has no run config.yaml"
        raise T5ForgeError(f"--heldout needs FILES here: {what}, so there are no data.validation_files to take")
    if cfg.data.validation_files:
        try:
            resolve_files(cfg.data.validation_files)
        except T5ForgeError as err:
            raise T5ForgeError(f"data.validation_files of {settings.source}: {err}; relative paths count from "
                               "where the run was launched: run from there, or give --heldout FILES") from None
    elif cfg.data.train_files or not cfg.data.dataset:
        raise T5ForgeError(f"the run has no held-out data (data.validation_files is empty in {settings.source}); "
                           "give --heldout FILES")
    return held


def _check_args(args, mode: str) -> None:
    minimums = {"batch_size": 1, "max_source_length": 2, "max_new_tokens": 1, "num_beams": 1,
                "input_length": 2, "batches": 1, "max_instances": 1}
    for name, low in minimums.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise T5ForgeError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if args.output is not None and args.output.exists() and not args.output.is_dir():
        raise T5ForgeError(f"--output {args.output} is a file; give a directory")


def _check_paths(args, mode: str) -> None:
    paths = {"sni": [args.sni], "files": args.files}.get(mode, [])
    for path in paths:
        if not path.exists():
            raise T5ForgeError(f"--{mode} {path} does not exist")


def _model_and_tokenizer(args, directory, settings, device):
    from t5forge.model.load import load_model
    from t5forge.tokenizer import load_tokenizer

    model, tokenizer = load_model(directory, device=device)
    # The speed twins, as training applies them (eager; the compiled stretches are for training only):
    # faster, and the held-out score of a run's checkpoint is computed the way the run computed it.
    from t5forge.model import fast

    model, _, _ = fast.apply(model, device=device)
    name = args.tokenizer
    if name is None and tokenizer is None and settings is not None:
        name = settings.cfg.data.tokenizer
    if name is not None:
        tokenizer = load_tokenizer(name)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise T5ForgeError(
                f"--tokenizer {name} has {tokenizer.vocab_size} ids but the model's vocab_size is "
                f"{model.config.vocab_size}; use the tokenizer the model was trained with"
            )
    if tokenizer is None:
        raise T5ForgeError(f"{args.model_path} holds no tokenizer (spiece.model or tokenizer.json); pass --tokenizer")
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------- modes
def _generation(args, mode, model, tokenizer, device, autocast, precision) -> dict:
    from t5forge.eval.generation import evaluate_generation

    fmt = {"fmt": args.prompt_format} if args.prompt_format is not None else {}
    if mode == "sni":
        from t5forge.data.instructions import load_sni

        examples = load_sni(args.sni, args.split, tokenizer, max_num_instances_per_task=args.max_instances,
                            max_source_length=args.max_source_length, max_target_length=args.max_new_tokens,
                            seed=args.seed, **fmt)
        data = {"sni": str(args.sni), "split": args.split, "max_instances": args.max_instances, "seed": args.seed}
        title = f"SNI {args.split} ({args.sni})"
    else:
        from t5forge.data.seq2seq import load_seq2seq_files

        examples = load_seq2seq_files(args.files, input_field=args.input_field, target_field=args.target_field,
                                      id_field=args.id_field, task_field=args.task_field, tokenizer=tokenizer,
                                      max_source_length=args.max_source_length,
                                      max_target_length=args.max_new_tokens, name="evaluate")
        data = {"files": [str(f) for f in args.files], "input_field": args.input_field,
                "target_field": args.target_field}
        title = ", ".join(str(f) for f in args.files)
    decoding = "greedy" if args.num_beams == 1 else f"beam search ({args.num_beams} beams)"
    print(f"{title}: {len(examples)} examples, {decoding}, at most {args.max_new_tokens} new tokens, "
          f"sources cut to {args.max_source_length} tokens, batch size {args.batch_size}")
    metrics = evaluate_generation(
        model, tokenizer, examples, args.output, batch_size=args.batch_size,
        max_source_length=args.max_source_length, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
        device=device, autocast=autocast, progress=True,
        metadata={"model": str(args.model_path), "mode": mode, "data": data, "precision": precision},
    )
    print(generation_table(metrics))
    return metrics


def generation_table(metrics: dict) -> str:
    """Overall and per-category exact match / Rouge-L (per task when there are no categories)."""
    rows = [("overall", metrics)]
    groups = metrics.get("per_category") or metrics.get("per_task") or {}
    rows += [(f"  {name}", m) for name, m in sorted(groups.items())]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'':{width}}  {'exact_match':>11}  {'rougeL':>7}  {'n':>6}"]
    for name, m in rows:
        lines.append(f"{name:{width}}  {m['exact_match']:11.2f}  {m['rougeL']:7.2f}  {m['num_examples']:6d}")
    return "\n".join(lines)


def _heldout(args, held, model, tokenizer, device, autocast, precision) -> dict:
    from t5forge.distributed import World
    from t5forge.eval.generation import write_evaluation
    from t5forge.plan import make_plan
    from t5forge.train.pretrain import build_loader, held_out_evaluator, held_out_name

    cfg, micro, requested = held
    d = cfg.data
    # pretrain's own loader and evaluator: the batches (and noise masks) the run scored
    loader = build_loader(cfg, make_plan(cfg, num_sentinels=tokenizer.num_sentinels), tokenizer, World(), "validation")
    metrics = held_out_evaluator(cfg, loader, model, device, autocast, World())(0)
    scored = metrics["eval_batches"]
    loss = metrics["eval_loss"]
    # exp overflows a float past ~709 nats; an untrained model's loss can be that large
    metrics["eval_perplexity"] = math.exp(loss) if loss < 700 else (math.inf if loss == loss else math.nan)
    where = held_out_name(cfg)
    files = f"{len(d.validation_files)} file(s)" if d.validation_files else where
    objective = (f"UL2 mixture of {len(d.ul2_denoisers)} denoisers" if d.objective == "ul2" else
                 f"noise density {d.mlm_probability}, mean span {d.mean_noise_span_length}")
    print(f"held-out {'UL2' if d.objective == 'ul2' else 'span corruption'} on {files}: inputs {d.input_length} "
          f"tokens, targets {loader.target_length}, batch size {micro}, seed {cfg.seed}, {objective}, {precision}")
    if requested is not None and scored < requested:
        print(f"scored {scored} of {requested} batches: {where} has no more")
    else:
        print(f"scored {scored} batches ({scored * micro} examples)")
    print(f"{'eval_loss':>12}  {'perplexity':>10}  {'accuracy':>8}  {'tokens':>10}")
    print(f"{metrics['eval_loss']:12.4f}  {metrics['eval_perplexity']:10.4g}  {metrics['eval_accuracy']:8.4f}  "
          f"{metrics['eval_tokens']:10,d}")
    if args.output is not None:
        metadata = {"model": str(args.model_path), "mode": "heldout", "precision": precision,
                    "data": {"files": list(d.validation_files), "text_field": d.text_field,
                             "input_length": d.input_length, "target_length": loader.target_length,
                             "noise_density": d.mlm_probability,
                             "mean_noise_span_length": d.mean_noise_span_length,
                             "batch_size": micro, "batches": requested, "batches_scored": scored,
                             "seed": cfg.seed}}
        write_evaluation(args.output, metrics, metadata=metadata)
    return metrics


def run(args) -> int:
    from t5forge.model.load import resolve_model_dir
    from t5forge.train.setup import autocast_for, pick_device

    _take_model_path(args)
    # A Hub id is fetched only once the options are known to be right (by load_model); it holds no run config.
    local = Path(args.model_path).expanduser().exists()
    directory = resolve_model_dir(args.model_path) if local else args.model_path
    settings = load_run_settings(directory) if local else None
    mode = _mode(args, settings)
    _check_args(args, mode)
    if mode == "heldout":
        held = _heldout_settings(args, settings)
        from_run = settings is not None and settings.cfg.mode == "pt"
    else:
        from_run = _generation_defaults(args, mode, settings)
        _check_paths(args, mode)
    precision = args.precision or (settings.cfg.precision if settings is not None else "fp32")
    if from_run:
        print(f"settings from {settings.source} (options given here win)")
    elif settings is not None:
        print(f"{settings.source} is a {_run_kind(settings)} run: --{mode} uses evaluate's own defaults")
    try:
        device = pick_device(args.device)
    except RuntimeError:  # torch's own message for an unknown device string is a long list
        raise T5ForgeError(f"--device {args.device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    autocast = autocast_for(precision, device)
    model, tokenizer = _model_and_tokenizer(args, directory, settings, device)
    if mode == "heldout":
        _heldout(args, held, model, tokenizer, device, autocast, precision)
    else:
        _generation(args, mode, model, tokenizer, device, autocast, precision)
    if args.output is not None:
        print(f"wrote {args.output}/metrics.json" + ("" if mode == "heldout" else " and predictions.jsonl"))
    return 0
