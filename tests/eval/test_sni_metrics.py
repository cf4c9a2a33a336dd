"""Exact match and Rouge-L as the official SNI evaluation computes them, overall / per task / per category."""

import json
import string

import pytest
from rouge_score import rouge_scorer

from t5forge.data.instructions import load_sni
from t5forge.errors import T5ForgeError
from t5forge.eval.metrics import (
    compute_metrics,
    compute_metrics_for_examples,
    exact_match,
    normalize_answer,
    rouge_l,
    write_predictions,
)
from t5forge.tokenizer import load_tokenizer


def test_hand_computed_values():
    assert normalize_answer("  The Cat,  sat!\n") == "the cat sat"
    assert exact_match("The Cat!", "the  cat") == 1.0
    assert exact_match("a cat", "cat") == 0.0  # articles are kept, unlike SQuAD
    # default rouge tokenizer + Porter stemmer: "the cat ran" vs "a cat run" -> LCS 1 of 3
    assert rouge_l("the cats ran", "a cat running") == pytest.approx(1 / 3, abs=1e-12)
    # P = 2/4, R = 2/2 -> F = 2/3
    assert rouge_l("The quick brown fox", "quick fox") == pytest.approx(2 / 3, abs=1e-12)
    assert rouge_l("", "quick fox") == 0.0
    got = compute_metrics(["cat", "dog"], [["a cat", "cat."], ["wolf"]], tasks=["t1", "t2"],
                          categories=["Word Analogy", "Word  analogy"])
    assert got["exact_match"] == 50.0 and got["rougeL"] == 50.0 and got["num_examples"] == 2
    assert got["per_task"] == {"t1": {"exact_match": 100.0, "rougeL": 100.0, "num_examples": 1},
                               "t2": {"exact_match": 0.0, "rougeL": 0.0, "num_examples": 1}}
    assert got["per_category"] == {"word_analogy": {"exact_match": 50.0, "rougeL": 50.0, "num_examples": 2}}


# ---- the official computation, written out independently (allenai/natural-instructions evaluation.py)
def _official_normalize(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    return " ".join(s.split())


_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _official(preds, refs):
    em = sum(max(float(_official_normalize(p) == _official_normalize(g)) for g in gold) for p, gold in zip(preds, refs))
    rl = sum(max(_SCORER.score(prediction=p, target=g)["rougeL"].fmeasure for g in gold) for p, gold in zip(preds, refs))
    return 100.0 * em / len(refs), 100.0 * rl / len(refs)


def _fixed_predictions(refs):
    preds = []
    for i, gold in enumerate(refs):
        kind = i % 5
        if kind == 0:
            preds.append(gold[0])
        elif kind == 1:
            preds.append(gold[-1].upper() + " !")
        elif kind == 2:
            preds.append(" ".join(gold[-1].split()[1:]) + " extra words")
        elif kind == 3:
            preds.append("")
        else:
            preds.append("the cat sat on the mat")
    return preds


def test_matches_official_on_real_sni_references(data_dir):
    sni = data_dir / "sni"
    tasks = [l.strip() for l in (sni / "splits" / "default" / "test_tasks.txt").read_text().splitlines() if l.strip()]
    refs, task_of, cat_of = [], [], []
    for t in tasks:
        data = json.loads((sni / "tasks" / f"{t}.json").read_text())
        for inst in data["Instances"][:100][:7]:
            refs.append(inst["output"])
            task_of.append(t)
            cat_of.append(data["Categories"][0])
    preds = _fixed_predictions(refs)
    got = compute_metrics(preds, refs, tasks=task_of, categories=cat_of)

    em, rl = _official(preds, refs)
    assert 0 < em < 100 and 0 < rl < 100
    assert got["exact_match"] == pytest.approx(em, abs=1e-6)
    assert got["rougeL"] == pytest.approx(rl, abs=1e-6)
    assert got["num_examples"] == len(refs) == 35
    for group_key, labels, name in (("per_task", task_of, lambda g: g),
                                    ("per_category", cat_of, lambda g: "_".join(g.lower().split()))):
        expected = {}
        for g in dict.fromkeys(labels):
            idx = [i for i, x in enumerate(labels) if x == g]
            expected[name(g)] = _official([preds[i] for i in idx], [refs[i] for i in idx])
        assert set(got[group_key]) == set(expected)
        for g, (gem, grl) in expected.items():
            assert got[group_key][g]["exact_match"] == pytest.approx(gem, abs=1e-6)
            assert got[group_key][g]["rougeL"] == pytest.approx(grl, abs=1e-6)
    assert "data_to_text" in got["per_category"] and "word_analogy" in got["per_category"]


def test_for_examples_and_predictions_file(data_dir, spiece_path, tmp_path):
    examples = load_sni(data_dir / "sni", "test", load_tokenizer(spiece_path))
    preds = [e.references[-1] for e in examples]  # a perfect system
    got = compute_metrics_for_examples(preds, examples)
    assert got["exact_match"] == 100.0 and got["rougeL"] == pytest.approx(100.0)
    assert len(got["per_task"]) == 5 and sum(v["num_examples"] for v in got["per_task"].values()) == 238
    records = [{"id": e.id, "task": e.task, "prediction": p, "references": list(e.references)} for e, p in zip(examples, preds)]
    out = tmp_path / "run" / "predictions.jsonl"
    write_predictions(out, records)
    lines = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    assert lines == records


def test_bad_metric_input():
    with pytest.raises(T5ForgeError, match="2 predictions but 1"):
        compute_metrics(["a", "b"], [["a"]])
    with pytest.raises(T5ForgeError, match="no reference"):
        compute_metrics(["a"], [[]])
    with pytest.raises(T5ForgeError, match="no predictions"):
        compute_metrics([], [])
    with pytest.raises(T5ForgeError, match="task labels"):
        compute_metrics(["a"], [["a"]], tasks=["t", "u"])
