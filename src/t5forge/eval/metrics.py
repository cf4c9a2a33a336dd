"""Generation metrics as the official Super-NaturalInstructions evaluation computes them.

Follows allenai/natural-instructions `eval/automatic/evaluation.py` (= Tk-Instruct's
`compute_metrics.py`), English ("default") track:
- exact match: both strings lower-cased, ASCII punctuation removed, whitespace collapsed (SQuAD's
  normalisation *without* removing articles, as the official code says);
- Rouge-L: `rouge_score.RougeScorer(["rougeL"], use_stemmer=True)`, i.e. the library's default
  tokenizer (lower-case, non-alphanumerics to spaces) with Porter stemming; F-measure;
- each prediction is scored against every reference and keeps the best; scores are averaged over
  examples and reported in percent, overall, per task and per category (the task's first category,
  named as the official code does: lower-case words joined by "_", e.g. "data_to_text").
The official script rounds to 4 decimals for printing; we return the unrounded values.
"""

from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path
from typing import Sequence

from t5forge.errors import T5ForgeError

_PUNCTUATION = set(string.punctuation)
_scorer = None  # built on first use: rouge_score imports nltk, which is slow to import


def _rouge_scorer():
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _scorer


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, collapse whitespace (articles are kept)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
    return _rouge_scorer().score(target=reference, prediction=prediction)["rougeL"].fmeasure


def category_key(category: str) -> str:
    """The official grouping name of a category: "Data to Text" -> "data_to_text"."""
    return "_".join(category.lower().split())


def _mean_scores(pairs) -> dict:
    em = rl = 0.0
    for pred, refs in pairs:
        em += max(exact_match(pred, r) for r in refs)
        rl += max(rouge_l(pred, r) for r in refs)
    n = len(pairs)
    return {"exact_match": 100.0 * em / n, "rougeL": 100.0 * rl / n, "num_examples": n}


def compute_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    tasks: Sequence[str] | None = None,
    categories: Sequence[str] | None = None,
) -> dict:
    """Exact match and Rouge-L (percent, best over references), overall and grouped.

    Returns {"exact_match", "rougeL", "num_examples", "per_task": {task: {...}},
    "per_category": {category_key: {...}}}; the groups appear when `tasks` / `categories` are given
    (one category per example: the task's first one).
    """
    n = len(predictions)
    if len(references) != n:
        raise T5ForgeError(f"metrics: {n} predictions but {len(references)} reference lists")
    if n == 0:
        raise T5ForgeError("metrics: no predictions to score")
    pairs = []
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise T5ForgeError(f"metrics: example #{i} has no reference to score against")
        pairs.append((pred, refs))
    result = _mean_scores(pairs)
    for key, groups, name in (("per_task", tasks, str), ("per_category", categories, category_key)):
        if groups is None:
            continue
        if len(groups) != n:
            raise T5ForgeError(f"metrics: {n} predictions but {len(groups)} {key[4:]} labels")
        grouped: dict[str, list] = {}
        for pair, group in zip(pairs, groups):
            grouped.setdefault(name(group), []).append(pair)
        result[key] = {g: _mean_scores(p) for g, p in grouped.items()}
    return result


def compute_metrics_for_examples(predictions: Sequence[str], examples) -> dict:
    """`compute_metrics` for Seq2SeqExamples: references, tasks and first categories taken from them."""
    tasks = [e.task for e in examples]
    categories = [e.categories[0] if e.categories else "" for e in examples]
    return compute_metrics(
        predictions,
        [e.references for e in examples],
        tasks=tasks if any(tasks) else None,
        categories=categories if any(categories) else None,
    )


def write_predictions(path, records) -> None:
    """One JSON object per line, e.g. {"id", "task", "prediction", "references"}.

    With `id` and `prediction` fields the file is accepted as is by the official
    `evaluation.py --prediction_file`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            if dataclasses.is_dataclass(record):
                record = dataclasses.asdict(record)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
