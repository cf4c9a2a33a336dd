"""Generation-based evaluation: batched decoding of seq2seq examples, then the official SNI metrics.

`generate_predictions` decodes a list of `Seq2SeqExample`s (SNI prompts or plain seq2seq files)
and `evaluate_generation` scores them with `eval.metrics.compute_metrics` (exact match and Rouge-L,
overall, per task, per category), writing `predictions.jsonl` and `metrics.json` side by side.

As Tk-Instruct (and nanoT5, which uses its code) does:
- sources are cut to `max_source_length` tokens as transformers' `truncation=True` does (the first
  max - 1 tokens, then EOS);
- outputs are decoded with `skip_special_tokens=True` and transformers' (4.x default)
  `clean_up_tokenization_spaces=True`, then stripped: that is the text the official
  `evaluation.py` scores from Tk-Instruct's `predicted_examples.jsonl`.
Examples are decoded longest first, so each batch pads little and an out-of-memory error shows up
on the first batch rather than the last; results come back in the caller's order.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from t5forge.errors import T5ForgeError
from t5forge.eval.metrics import compute_metrics_for_examples, write_predictions

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: drop the space before punctuation and English clitics."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


def decode_prediction(tokenizer, ids) -> str:
    """Generated ids -> the prediction text that is scored (see the module docstring)."""
    return clean_up_tokenization(tokenizer.decode(ids, skip_special_tokens=True)).strip()


def decode_output(tokenizer, ids) -> str:
    """Generated ids -> the text as a person reads it (`t5forge generate`): everything up to the first
    EOS, padding dropped, sentinels and other special tokens shown ("<extra_id_0> the cat<extra_id_1>"),
    so the answer of a span-corruption model says which span each piece fills."""
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    return tokenizer.decode([i for i in ids if i != tokenizer.pad_id], skip_special_tokens=False)


def _encode_sources(tokenizer, examples, max_source_length: int) -> list[list[int]]:
    eos = tokenizer.eos_id
    ids = tokenizer.encode_batch([e.source for e in examples])
    # truncation=True keeps room for the EOS the encoder was trained to see last.
    return [x if len(x) <= max_source_length else x[: max_source_length - 1] + [eos] for x in ids]


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_predictions(model, tokenizer, examples, *, batch_size: int = 16, max_source_length: int = 1024,
                         max_new_tokens: int = 128, num_beams: int = 1, device=None,
                         autocast=contextlib.nullcontext, progress: bool = False) -> list[dict]:
    """One record per example, in the order given: id, task, categories, source, prediction, references.

    `device` defaults to the model's; `autocast` is a zero-argument context factory (e.g. bf16
    autocast on a GPU). The model is in eval mode while decoding and is restored afterwards.
    """
    for name, value, low in (("batch_size", batch_size, 1), ("max_source_length", max_source_length, 2),
                             ("max_new_tokens", max_new_tokens, 1), ("num_beams", num_beams, 1)):
        if value < low:
            raise T5ForgeError(f"{name} must be at least {low}, got {value}")
    examples = list(examples)
    if not examples:
        raise T5ForgeError("no examples to generate predictions for")
    device = torch.device(device) if device is not None else _device_of(model)
    sources = _encode_sources(tokenizer, examples, max_source_length)
    order = sorted(range(len(examples)), key=lambda i: -len(sources[i]))  # stable: ties keep their order

    predictions: list[str | None] = [None] * len(examples)
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm

        # disable=None: a bar on a terminal, nothing in a log file
        starts = tqdm(starts, desc="generating", unit="batch", disable=None, dynamic_ncols=True)
    for start in starts:
        index = order[start : start + batch_size]
        width = len(sources[index[0]])  # longest first
        input_ids = torch.full((len(index), width), tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            input_ids[row, : len(sources[i])] = torch.tensor(sources[i])
            attention_mask[row, : len(sources[i])] = 1
        with autocast():
            out = model.generate(input_ids.to(device), attention_mask.to(device),
                                 max_new_tokens=max_new_tokens, num_beams=num_beams)
        for i, ids in zip(index, out.tolist()):
            predictions[i] = decode_prediction(tokenizer, ids)

    return [
        {"id": e.id, "task": e.task, "categories": list(e.categories), "source": e.source,
         "prediction": p, "references": list(e.references)}
        for e, p in zip(examples, predictions)
    ]


def evaluate_generation(model, tokenizer, examples, out_dir=None, *, batch_size: int = 16,
                        max_source_length: int = 1024, max_new_tokens: int = 128, num_beams: int = 1,
                        device=None, autocast=contextlib.nullcontext, progress: bool = False,
                        metadata: dict | None = None) -> dict:
    """Generate (arguments as `generate_predictions`) and score with the official metrics.

    Returns `compute_metrics`' dict (exact_match, rougeL, num_examples, per_task, per_category;
    percent) plus the decoding settings under "generation". With `out_dir`, writes
    `predictions.jsonl` (one record per example) and `metrics.json` (the `metadata` entries, then
    the returned dict) there.
    """
    examples = list(examples)
    records = generate_predictions(
        model, tokenizer, examples, batch_size=batch_size, max_source_length=max_source_length,
        max_new_tokens=max_new_tokens, num_beams=num_beams, device=device, autocast=autocast, progress=progress,
    )
    metrics = compute_metrics_for_examples([r["prediction"] for r in records], examples)
    metrics["generation"] = {
        "num_beams": num_beams, "max_new_tokens": max_new_tokens, "max_source_length": max_source_length,
    }
    if out_dir is not None:
        write_evaluation(out_dir, metrics, records, metadata)
    return metrics


def write_evaluation(out_dir, metrics: dict, records=None, metadata: dict | None = None) -> Path:
    """`metrics.json` (metadata first, then the metrics) and, given records, `predictions.jsonl`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise T5ForgeError(f"output {out_dir} is a file; give a directory for {PREDICTIONS_FILE} and {METRICS_FILE}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if records is not None:
        write_predictions(out_dir / PREDICTIONS_FILE, records)
    text = json.dumps({**(metadata or {}), **metrics}, indent=2, ensure_ascii=False)
    (out_dir / METRICS_FILE).write_text(text + "\n", encoding="utf-8")
    return out_dir
