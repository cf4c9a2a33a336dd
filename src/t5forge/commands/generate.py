"""`t5forge generate`: decode text with a model (HF directory, t5forge model dir, checkpoint or run).

    t5forge generate MODEL_PATH "translate English to German: Hello" --num-beams 4
    t5forge generate RUN_DIR "The <extra_id_0> walks in <extra_id_1> park"
    t5forge generate RUN_DIR --input-file prompts.txt                # one prompt per line
    t5forge generate RUN_DIR --input-file tasks.jsonl --field input --output predictions.jsonl
    t5forge generate RUN_DIR --input-file tasks.jsonl --jsonl > predictions.jsonl

Inputs come from the positional TEXT arguments or a file (`.txt`: one prompt per line; any other
name: JSON lines, one record per line). Each output is printed under the prompt it belongs to:

    [1] prompt: The <extra_id_0> walks in <extra_id_1> park
        -> <extra_id_0> dog<extra_id_1> the

Sentinels and other special tokens stay visible (only EOS and padding are dropped), so the answer
of a span-corruption model shows which span each piece fills. For machines: --jsonl prints one
JSON record per line (the input record plus "prediction") instead, and --output writes the same
records to a file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from t5forge.errors import T5ForgeError

HELP = "Generate text with a T5 model (greedy or beam search)."
PROMPT_SHOWN = 300  # characters of a prompt echoed above its output; --jsonl and --output keep all


def add_arguments(parser) -> None:
    parser.add_argument("model_path", metavar="MODEL_PATH", help="HF T5 dir, t5forge model/checkpoint dir or run dir")
    parser.add_argument("text", nargs="*", metavar="TEXT", help="input texts (or use --input-file)")
    parser.add_argument("--input-file", type=Path,
                        help="prompts: a .txt file (one prompt per line) or JSON lines (one record per line, "
                             "see --field)")
    parser.add_argument("--field", default="input",
                        help="field of each .jsonl record holding the input text (default: input)")
    parser.add_argument("--output", type=Path, help="write JSON lines: the input record plus 'prediction'")
    parser.add_argument("--jsonl", action="store_true",
                        help="print one JSON record per line (the input record plus 'prediction') instead of "
                             "the readable listing")
    parser.add_argument("--num-beams", type=int, default=1, help="1 = greedy (default)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-input-length", type=int, default=None, help="truncate inputs to this many tokens")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: as stored)")


def read_records(path: Path, field: str) -> list[dict]:
    """The prompts of --input-file as records: JSON lines (`field` holds the text) or plain lines
    (as {field: line}). An empty line or an empty prompt is an error naming the line: silently
    dropping it would shift every following output against the line it answers."""
    if not path.is_file():
        raise T5ForgeError(f"input file {path} does not exist")
    as_json = path.suffix.lower() != ".txt"
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                what = "a JSON record" if as_json else "a prompt"
                raise T5ForgeError(f"{path}:{line_no}: empty line; every line must hold {what} (delete the line)")
            if not as_json:
                records.append({field: line})
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise T5ForgeError(f"{path}:{line_no}: not valid JSON ({err.msg}); expected one JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise T5ForgeError(f"{path}:{line_no}: no string field {field!r}; choose the input field with --field")
            if not record[field].strip():
                raise T5ForgeError(f"{path}:{line_no}: field {field!r} is empty; give a prompt to generate from")
            records.append(record)
    if not records:
        raise T5ForgeError(f"input file {path} holds no records")
    return records


def shown_prompt(text: str) -> str:
    """A prompt on one line (newlines as \\n), cut to PROMPT_SHOWN characters."""
    one_line = text.replace("\r", "\\r").replace("\n", "\\n")
    if len(one_line) <= PROMPT_SHOWN:
        return one_line
    return f"{one_line[:PROMPT_SHOWN]} ... ({len(text):,} characters)"


def listing(index: int, prompt: str, output: str) -> str:
    """What the user reads for one prompt: its number and text, then the output indented under it."""
    body = output.replace("\n", "\n       ") if output else "(empty output: the model ended the sequence at once)"
    return f"[{index}] prompt: {shown_prompt(prompt)}\n    -> {body}"


def _records(args) -> tuple[list[dict], str]:
    if args.text and args.input_file:
        raise T5ForgeError("give input TEXT arguments or --input-file, not both")
    if not args.text and not args.input_file:
        raise T5ForgeError("nothing to generate from: give TEXT arguments or --input-file F.jsonl")
    if args.input_file:
        return read_records(args.input_file, args.field), args.field
    for i, text in enumerate(args.text, 1):
        if not text.strip():
            which = "the TEXT argument" if len(args.text) == 1 else f"TEXT argument {i} of {len(args.text)}"
            raise T5ForgeError(f"{which} is empty; give a prompt to generate from (an empty input generates "
                               "only from the end-of-sequence token)")
    return [{"input": t} for t in args.text], "input"


def run(args) -> int:
    import torch

    from t5forge.eval.generation import decode_output
    from t5forge.model.load import load_model

    for name in ("num_beams", "max_new_tokens", "batch_size", "max_input_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise T5ForgeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    records, field = _records(args)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise T5ForgeError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise T5ForgeError(f"--device {device}: no CUDA device is available here; use --device cpu")
    model, tokenizer = load_model(args.model_path, device=device, dtype=args.dtype)
    if tokenizer is None:
        raise T5ForgeError(f"{args.model_path} holds no tokenizer (spiece.model or tokenizer.json); add one")
    from t5forge.model import fast

    # The speed twins, as in training: long prompts then attend by query blocks (model/fast/blocked.py).
    # Their one-line report stays out of the output, which is the predictions only.
    fast.log.disabled, was = True, fast.log.disabled
    try:
        fast.apply(model, None, device=device)
    finally:
        fast.log.disabled = was
    model.eval()

    predictions = []
    for start in range(0, len(records), args.batch_size):
        batch = records[start : start + args.batch_size]
        ids = tokenizer.encode_batch([r[field] for r in batch])
        if args.max_input_length:  # keep the EOS the model was trained to see at the end
            n = args.max_input_length
            ids = [x if len(x) <= n else x[: n - 1] + [tokenizer.eos_id] for x in ids]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        out = model.generate(input_ids.to(device), mask.to(device), max_new_tokens=args.max_new_tokens,
                             num_beams=args.num_beams)
        for record, row in zip(batch, out.tolist()):
            text = decode_output(tokenizer, row)
            predictions.append(text)
            if args.jsonl:
                print(json.dumps({**record, "prediction": text}, ensure_ascii=False), flush=True)
            else:
                print(listing(len(predictions), record[field], text), flush=True)

    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.open("w", encoding="utf-8") as f:
            for record, text in zip(records, predictions):
                f.write(json.dumps({**record, "prediction": text}, ensure_ascii=False) + "\n")
        print(f"wrote {len(predictions)} predictions to {args.output}", file=sys.stderr)
    return 0
