"""`t5forge evaluate`: score a model (HF directory, t5forge model dir, checkpoint or run dir).

Generation metrics (exact match and Rouge-L as the official SNI evaluation computes them):

    t5forge evaluate RUN_DIR --sni data/sni --split test --max-instances 100 --output eval/sni
    t5forge evaluate MODEL --files dev.jsonl --input-field question --target-field answer --num-beams 4

Held-out span-corruption loss (NLL per target token, accuracy) on local text files:

    t5forge evaluate RUN_DIR --heldout c4-validation.*.json.gz --input-length 512 --batches 100

A short table goes to stdout; with --output DIR, `metrics.json` (and for generation
`predictions.jsonl`) are written there.
"""

from __future__ import annotations

import math
from pathlib import Path

from t5forge.errors import T5ForgeError

HELP = "Evaluate a model: SNI / seq2seq generation metrics or held-out span-corruption loss."


def add_arguments(parser) -> None:
    parser.add_argument("model_path", metavar="MODEL_PATH", help="HF T5 dir, t5forge model/checkpoint dir or run dir")
    mode = parser.add_argument_group("what to evaluate (choose one)")
    mode.add_argument("--sni", type=Path, metavar="DIR",
                      help="Super-NaturalInstructions folder (splits/default/*.txt + tasks/*.json)")
    mode.add_argument("--files", nargs="+", type=Path, metavar="FILE", help="seq2seq files (jsonl/json/csv/parquet)")
    mode.add_argument("--heldout", nargs="+", metavar="FILE",
                      help="text files (json/jsonl/txt/parquet, globs allowed) for the held-out span-corruption loss")

    gen = parser.add_argument_group("generation (--sni / --files)")
    gen.add_argument("--split", default="test", choices=("train", "test"), help="SNI split (default: test)")
    gen.add_argument("--max-instances", type=int, metavar="N", default=100,
                     help="SNI instances per task (default: 100, the official evaluation set)")
    gen.add_argument("--input-field", metavar="NAME", default="input", help="--files: field holding the source text")
    gen.add_argument("--target-field", metavar="NAME", default="target",
                     help="--files: field holding the reference(s)")
    gen.add_argument("--id-field", metavar="NAME", default=None,
                     help="--files: field holding an example id (default: file:row)")
    gen.add_argument("--task-field", metavar="NAME", default=None, help="--files: field to group per-task metrics by")
    gen.add_argument("--max-source-length", type=int, metavar="N", default=1024,
                     help="source tokens kept (default: 1024)")
    gen.add_argument("--max-new-tokens", type=int, metavar="N", default=128,
                     help="generated tokens at most (default: 128)")
    gen.add_argument("--num-beams", type=int, metavar="N", default=1, help="1 = greedy (default)")

    held = parser.add_argument_group("held-out loss (--heldout)")
    held.add_argument("--input-length", type=int, metavar="N", default=512,
                      help="encoder tokens per example (default: 512)")
    held.add_argument("--batches", type=int, metavar="N", default=None,
                      help="evaluate the first N batches (default: all)")
    held.add_argument("--text-field", metavar="NAME", default="text", help="field of each record holding the text")
    held.add_argument("--noise-density", type=float, metavar="F", default=0.15,
                      help="masked token fraction (default: 0.15)")
    held.add_argument("--mean-noise-span-length", type=float, metavar="F", default=3.0, help="(default: 3.0)")

    common = parser.add_argument_group("common")
    common.add_argument("--tokenizer", metavar="PATH", default=None,
                        help="spiece.model / tokenizer.json / folder (default: the one stored with the model)")
    common.add_argument("--seed", type=int, metavar="N", default=None,
                        help="SNI instance shuffling (default 42, as Tk-Instruct) / held-out noise masks "
                             "(default 2137, pretrain's default seed)")
    common.add_argument("--batch-size", type=int, metavar="N", default=16, help="examples per batch (default: 16)")
    common.add_argument("--output", type=Path, metavar="DIR", help="write metrics.json (and predictions.jsonl) here")
    common.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ... (default: auto)")
    common.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="bf16 = bf16 autocast with fp32 weights (default: fp32)")


# ---------------------------------------------------------------------------------- checks
def _mode(args) -> str:
    chosen = [name for name in ("sni", "files", "heldout") if getattr(args, name)]
    if not chosen:
        raise T5ForgeError(
            "nothing to evaluate: give --sni DIR, --files F.jsonl (with --input-field/--target-field) "
            "or --heldout FILES"
        )
    if len(chosen) > 1:
        raise T5ForgeError(f"choose one of --sni, --files, --heldout (got {', '.join('--' + c for c in chosen)})")
    return chosen[0]


def _check_args(args, mode: str) -> None:
    minimums = {"batch_size": 1, "max_source_length": 2, "max_new_tokens": 1, "num_beams": 1,
                "input_length": 2, "batches": 1, "max_instances": 1}
    for name, low in minimums.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise T5ForgeError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    paths = {"sni": [args.sni], "files": args.files}.get(mode, [])
    for path in paths:
        if not path.exists():
            raise T5ForgeError(f"--{mode} {path} does not exist")
    if mode == "heldout":  # before the model loads: a typo should not cost a minute of loading
        from t5forge.data.sources import resolve_files

        resolve_files(args.heldout)
    if args.output is not None and args.output.exists() and not args.output.is_dir():
        raise T5ForgeError(f"--output {args.output} is a file; give a directory")


def _model_and_tokenizer(args, device):
    from t5forge.model.load import load_model
    from t5forge.tokenizer import load_tokenizer

    model, tokenizer = load_model(args.model_path, device=device)
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise T5ForgeError(
                f"--tokenizer {args.tokenizer} has {tokenizer.vocab_size} ids but the model's vocab_size is "
                f"{model.config.vocab_size}; use the tokenizer the model was trained with"
            )
    if tokenizer is None:
        raise T5ForgeError(f"{args.model_path} holds no tokenizer (spiece.model or tokenizer.json); pass --tokenizer")
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------- modes
def _generation(args, mode, model, tokenizer, device, autocast) -> dict:
    from t5forge.eval.generation import evaluate_generation

    if mode == "sni":
        from t5forge.data.instructions import load_sni

        seed = 42 if args.seed is None else args.seed
        examples = load_sni(args.sni, args.split, tokenizer, max_num_instances_per_task=args.max_instances,
                            max_source_length=args.max_source_length, max_target_length=args.max_new_tokens,
                            seed=seed)
        data = {"sni": str(args.sni), "split": args.split, "max_instances": args.max_instances, "seed": seed}
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
    print(f"{title}: {len(examples)} examples, {decoding}, at most {args.max_new_tokens} new tokens")
    metrics = evaluate_generation(
        model, tokenizer, examples, args.output, batch_size=args.batch_size,
        max_source_length=args.max_source_length, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
        device=device, autocast=autocast, progress=True,
        metadata={"model": str(args.model_path), "mode": mode, "data": data, "precision": args.precision},
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


def _heldout(args, model, tokenizer, device, autocast) -> dict:
    import itertools

    from t5forge.data.loader import build_pretrain_loader
    from t5forge.eval.generation import write_evaluation
    from t5forge.eval.loss import evaluate_loss

    seed = 2137 if args.seed is None else args.seed
    loader = build_pretrain_loader(
        tokenizer=tokenizer, dataset=None, dataset_config=None, files=list(args.heldout),
        text_field=args.text_field, split="validation", batch_size=args.batch_size,
        input_length=args.input_length, noise_density=args.noise_density,
        mean_noise_span_length=args.mean_noise_span_length, seed=seed,
    )
    target_length = loader.target_length
    batches = itertools.islice(iter(loader), args.batches) if args.batches else iter(loader)
    metrics = evaluate_loss(model, batches, device, autocast=autocast)
    loss = metrics["eval_loss"]
    # exp overflows a float past ~709 nats; an untrained model's loss can be that large
    metrics["eval_perplexity"] = math.exp(loss) if loss < 700 else (math.inf if loss == loss else math.nan)
    print(f"held-out span corruption on {len(args.heldout)} file(s): inputs {args.input_length} tokens, "
          f"targets {target_length}, batch size {args.batch_size}, seed {seed}")
    print(f"{'eval_loss':>12}  {'perplexity':>10}  {'accuracy':>8}  {'tokens':>10}")
    print(f"{metrics['eval_loss']:12.4f}  {metrics['eval_perplexity']:10.4g}  {metrics['eval_accuracy']:8.4f}  "
          f"{metrics['eval_tokens']:10,d}")
    if args.output is not None:
        metadata = {"model": str(args.model_path), "mode": "heldout", "precision": args.precision,
                    "data": {"files": list(args.heldout), "text_field": args.text_field,
                             "input_length": args.input_length, "target_length": target_length,
                             "noise_density": args.noise_density,
                             "mean_noise_span_length": args.mean_noise_span_length,
                             "batch_size": args.batch_size, "batches": args.batches, "seed": seed}}
        write_evaluation(args.output, metrics, metadata=metadata)
    return metrics


def run(args) -> int:
    from t5forge.train.setup import autocast_for, pick_device

    mode = _mode(args)
    _check_args(args, mode)
    try:
        device = pick_device(args.device)
    except RuntimeError:  # torch's own message for an unknown device string is a long list
        raise T5ForgeError(f"--device {args.device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    autocast = autocast_for(args.precision, device)
    model, tokenizer = _model_and_tokenizer(args, device)
    if mode == "heldout":
        _heldout(args, model, tokenizer, device, autocast)
    else:
        _generation(args, mode, model, tokenizer, device, autocast)
    if args.output is not None:
        print(f"wrote {args.output}/metrics.json" + ("" if mode == "heldout" else " and predictions.jsonl"))
    return 0
