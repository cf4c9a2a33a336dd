"""The unigram baseline for span-corruption NLL: what a model that ignores its input would score.

Counts target-token frequencies over the training corpus's span-corruption targets (add-one
smoothed over the whole vocabulary) and reports the cross-entropy of the held-out targets that
`t5forge pretrain` evaluates on (the same loader, seed, lengths and number of batches). A trained
model's eval_loss must fall well below this number to have learned anything beyond frequencies.

    python benchmarks/unigram_baseline.py --input-length 128 --batch-size 16 --eval-batches 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("T5FORGE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-files", nargs="+", default=[str(DATA / "c4-sample/c4-en.train-00000-first1000.json.gz")])
    p.add_argument("--validation-files", nargs="+", default=[str(DATA / "c4-sample/c4-en.olmo-sample-1000.json.gz")])
    p.add_argument("--tokenizer", default=str(DATA / "t5-spiece/spiece.model"))
    p.add_argument("--input-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="micro-batch of the run being compared")
    p.add_argument("--eval-batches", type=int, default=10, help="eval.steps of the run being compared")
    p.add_argument("--seed", type=int, default=2137)
    args = p.parse_args()

    from t5forge.data.loader import build_pretrain_loader
    from t5forge.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    common = dict(tokenizer=tok, dataset=None, input_length=args.input_length, seed=args.seed, batch_size=args.batch_size)
    counts = np.ones(tok.vocab_size, dtype=np.float64)  # add-one smoothing
    train = build_pretrain_loader(files=args.train_files, split="validation", **common)  # one pass, no repeat
    n_train = 0
    for batch in train:
        labels = batch["labels"].numpy().ravel()
        counts += np.bincount(labels, minlength=tok.vocab_size)
        n_train += labels.size
    logp = np.log(counts / counts.sum())

    held_out = build_pretrain_loader(files=args.validation_files, split="validation", **common)
    nll, n = 0.0, 0
    for batch in itertools.islice(held_out, args.eval_batches):
        labels = batch["labels"].numpy().ravel()
        nll -= logp[labels].sum()
        n += labels.size
    result = {
        "unigram_nll": nll / n,
        "uniform_nll": math.log(tok.vocab_size),
        "train_target_tokens": n_train,
        "heldout_target_tokens": n,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
