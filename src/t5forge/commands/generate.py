"""`t5forge generate`: decode text with a model (HF directory, t5forge model dir, checkpoint or run).

    t5forge generate MODEL_PATH "translate English to German: Hello" --num-beams 4
    t5forge generate RUN_DIR --input-file tasks.jsonl --field input --output predictions.jsonl

Inputs come from the positional TEXT arguments or a JSON-lines file; outputs are printed one per
line, and with --output also written as JSON lines (the input record plus "prediction").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from t5forge.errors import T5ForgeError

HELP = "Generate text with a T5 model (greedy or beam search)."


def add_arguments(parser) -> None:
    parser.add_argument("model_path", metavar="MODEL_PATH", help="HF T5 dir, t5forge model/checkpoint dir or run dir")
    parser.add_argument("text", nargs="*", metavar="TEXT", help="input texts (or use --input-file)")
    parser.add_argument("--input-file", type=Path, help="JSON-lines file with one input record per line")
    parser.add_argument("--field", default="input", help="field of each record holding the input text (default: input)")
    parser.add_argument("--output", type=Path, help="write JSON lines: the input record plus 'prediction'")
    parser.add_argument("--num-beams", type=int, default=1, help="1 = greedy (default)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-input-length", type=int, default=None, help="truncate inputs to this many tokens")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: as stored)")


def read_records(path: Path, field: str) -> list[dict]:
    if not path.is_file():
        raise T5ForgeError(f"input file {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise T5ForgeError(f"{path}:{line_no}: not valid JSON ({err.msg}); expected one JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise T5ForgeError(f"{path}:{line_no}: no string field {field!r}; choose the input field with --field")
            records.append(record)
    if not records:
        raise T5ForgeError(f"input file {path} holds no records")
    return records


def run(args) -> int:
    import torch

    from t5forge.model.load import load_model

    if args.text and args.input_file:
        raise T5ForgeError("give input TEXT arguments or --input-file, not both")
    if not args.text and not args.input_file:
        raise T5ForgeError("nothing to generate from: give TEXT arguments or --input-file F.jsonl")
    for name in ("num_beams", "max_new_tokens", "batch_size", "max_input_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise T5ForgeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    records = read_records(args.input_file, args.field) if args.input_file else [{"input": t} for t in args.text]
    field = args.field if args.input_file else "input"

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
    model.eval()

    predictions = []
    for start in range(0, len(records), args.batch_size):
        batch = records[start : start + args.batch_size]
        ids = tokenizer.encode_batch([r[field] for r in batch])
        if args.max_input_length:  # keep the EOS the model was trained to see at the end
            n = args.max_input_length
            ids = [x if len(x) <= n else x[: n - 1] + [tokenizer.eos_id] for x in ids]
        width = max(len(x) for x in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        out = model.generate(input_ids.to(device), mask.to(device), max_new_tokens=args.max_new_tokens,
                             num_beams=args.num_beams)
        for row in out.tolist():
            text = tokenizer.decode(row, skip_special_tokens=True)
            predictions.append(text)
            print(text, flush=True)

    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.open("w", encoding="utf-8") as f:
            for record, text in zip(records, predictions):
                f.write(json.dumps({**record, "prediction": text}, ensure_ascii=False) + "\n")
        print(f"wrote {len(predictions)} predictions to {args.output}", file=sys.stderr)
    return 0
