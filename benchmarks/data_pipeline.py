"""Throughput of the pre-training data pipeline on one core: read + tokenize + corrupt + collate.

Reads the real C4 sample from the shared data folder (T5FORGE_DATA, default ../shared/data) with the
real T5 vocabulary, and reports examples/s of 512-input / 114-target span-corruption examples made
by one reader in this process (one SentencePiece thread, one torch thread), i.e. per dataloader
worker; plus the time of each stage alone, so a slow stage is visible.

    python benchmarks/data_pipeline.py [--examples 4000] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("T5FORGE_DATA", REPO.parent / "shared" / "data")).resolve()


def environment() -> str:
    import datasets
    import sentencepiece

    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        rev, dirty = "?", ""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"code {rev}{' (uncommitted changes)' if dirty else ''}; python {platform.python_version()}, "
            f"torch {torch.__version__}, datasets {datasets.__version__}, sentencepiece {sentencepiece.__version__}, "
            f"numpy {np.__version__}; {cpu}, {os.cpu_count()} cores, load average {load:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--files", nargs="+", default=[str(DATA / "c4-sample" / "c4-en.train-00000-first1000.json.gz")])
    parser.add_argument("--tokenizer", default=str(DATA / "t5-spiece" / "spiece.model"))
    args = parser.parse_args()

    from t5forge.data.loader import build_pretrain_loader
    from t5forge.data.sources import TextSource
    from t5forge.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer(args.tokenizer)
    tok.num_threads = 1  # one core, as in a dataloader worker

    t0 = time.perf_counter()
    loader = build_pretrain_loader(tokenizer=tok, files=args.files, batch_size=args.batch_size, num_workers=0)
    setup = time.perf_counter() - t0
    batches = -(-args.examples // args.batch_size)
    it = iter(loader)
    next(it)  # first batch: opens the file
    t0 = time.perf_counter()
    for batch in itertools.islice(it, batches):
        assert batch["input_ids"].shape == (args.batch_size, 512) and batch["labels"].shape == (args.batch_size, 114)
    elapsed = time.perf_counter() - t0
    examples = batches * args.batch_size
    rate = examples / elapsed

    # the stages alone, on one pass over the corpus
    source = TextSource(files=args.files)
    t0 = time.perf_counter()
    docs = [t for s in range(source.num_shards) for t in source.texts(s) if t.strip()]
    read = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = [i for j in range(0, len(docs), 16) for i in tok.encode_batch(docs[j : j + 16])]
    tokenize = time.perf_counter() - t0
    tokens = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])
    chunks = tokens[: len(tokens) // 568 * 568].reshape(-1, 568)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for j in range(0, len(chunks) - args.batch_size + 1, args.batch_size):
        inputs, targets = loader.corruption(chunks[j : j + args.batch_size], rng)
        torch.from_numpy(inputs), torch.from_numpy(targets)
    corrupt = time.perf_counter() - t0
    per_pass = len(chunks)

    print(environment())
    print(f"files: {', '.join(args.files)}")
    print(f"setup (datasets load_dataset, first batch excluded from timing): {setup:.2f} s")
    print(f"whole pipeline, one core: {examples} examples of 512/114 in {elapsed:.2f} s = {rate:.0f} examples/s "
          f"({rate * loader.raw_length / 1e3:.0f}k raw tokens/s)")
    print(f"stages for one pass ({len(docs)} docs, {len(tokens)} tokens, {per_pass} examples): "
          f"read {read:.2f} s, tokenize {tokenize:.2f} s, corrupt+collate {corrupt:.2f} s "
          f"-> {per_pass / (read + tokenize + corrupt):.0f} examples/s from the stages alone")


if __name__ == "__main__":
    main()
