"""`t5forge export CHECKPOINT OUT_DIR`: write a t5forge model, checkpoint or run as an HF T5 directory.

The result (config.json, model.safetensors, generation_config.json, tokenizer files) loads with
`transformers.AutoModelForSeq2SeqLM.from_pretrained(OUT_DIR)` (T5ForConditionalGeneration, or
MT5 / UMT5ForConditionalGeneration for those families) and `AutoTokenizer.from_pretrained(OUT_DIR)`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from t5forge.errors import T5ForgeError

HELP = "Export a t5forge checkpoint (or model/run directory) as a Hugging Face T5 (mT5, UMT5) directory."


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="t5forge checkpoint, model directory or run directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="directory to write the HF model into")
    parser.add_argument("--dtype", default=None, help="store weights as fp32 | bf16 | fp16 (default: as stored)")
    parser.add_argument("--force", action="store_true", help="write into OUT_DIR even if it is not empty")


def run(args) -> int:
    from t5forge.model.hf import export_hf
    from t5forge.model.load import load_model

    out_dir: Path = args.out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise T5ForgeError(f"OUT_DIR {out_dir} is a file; give a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.force:
        raise T5ForgeError(f"OUT_DIR {out_dir} is not empty; choose a new directory or pass --force")
    model, tokenizer = load_model(args.checkpoint, device="cpu", dtype=args.dtype)
    export_hf(model, tokenizer, out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"exported {n_params / 1e6:.1f}M parameters to {out_dir} "
          f"(model_type {model.config.model_type})")
    if tokenizer is None:
        print(f"note: {args.checkpoint} holds no tokenizer; {out_dir} has none either", file=sys.stderr)
    return 0
