"""Resuming the pre-training data position on another number of ranks or workers: every token of
every document of a small real corpus enters training exactly once per epoch, across the change.

The loaders are driven directly, rank by rank in lockstep as DDP steps them, with `record_spans`
on: each batch then names, per row, the (epoch, shard, record, first token, end token) pieces of
documents it holds. A checkpoint in between is what a run saves: every rank's `state_dict()`, handed
to the new layout's loaders by `load_rank_states` (train/checkpoint_parts.py, PerRank)."""

import gzip
import json
from collections import defaultdict

import pytest
import torch

from t5forge.data.loader import build_pretrain_loader
from t5forge.errors import T5ForgeError

BATCH = 2
INPUT_LENGTH = 32  # 36 text tokens per example


def _write(path, docs):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, c4_docs):
    """120 real C4 documents, cut to their first 300 characters, as one file or as six (20 each)."""
    docs = [text[:300] for text in c4_docs[:120]]
    folder = tmp_path_factory.mktemp("redeal")
    return {
        "one_file": ([_write(folder / "all.json.gz", docs)], {(0, i): t for i, t in enumerate(docs)}),
        "six_files": ([_write(folder / f"part-{k}.json.gz", docs[20 * k : 20 * (k + 1)]) for k in range(6)],
                      {(k, i): docs[20 * k + i] for k in range(6) for i in range(20)}),
    }


def _loaders(files, tokenizer, world_size, num_workers, shuffle_buffer):
    loaders = []
    for rank in range(world_size):
        loader = build_pretrain_loader(tokenizer=tokenizer, files=files, batch_size=BATCH, seed=5, rank=rank,
                                       world_size=world_size, num_workers=num_workers, input_length=INPUT_LENGTH,
                                       shuffle_buffer=shuffle_buffer)
        loader.record_spans = True
        loaders.append(loader)
    return loaders


def _train(loaders, batches_per_rank, read):
    """Every rank takes `batches_per_rank` micro-batches (DDP's lockstep); their spans go to `read`."""
    iterators = [iter(loader) for loader in loaders]
    for _ in range(batches_per_rank):
        for it in iterators:
            batch = next(it)
            assert batch["input_ids"].shape == (BATCH, INPUT_LENGTH)
            read += [piece for row in batch["spans"] for piece in row]
    for it in iterators:
        it.close()  # its workers stop


def _checkpoint(loaders, tmp_path):
    """Every rank's data state through torch.save / torch.load, as data.pt holds them."""
    torch.save({"world_size": len(loaders), "ranks": [loader.state_dict() for loader in loaders]}, tmp_path / "data.pt")
    return torch.load(tmp_path / "data.pt", weights_only=False)["ranks"]


def _audit(read, docs, tokenizer):
    """Epoch 0: every token of every document exactly once. Later epochs (not all readers may have
    finished them): no token twice."""
    lengths = {key: len(tokenizer.encode(text)) for key, text in docs.items()}  # EOS included
    by_epoch = defaultdict(lambda: defaultdict(list))
    for epoch, shard, record, first, end in read:
        by_epoch[epoch][(shard, record)].append((first, end))
    assert set(by_epoch[0]) == set(lengths), "every document is read in epoch 0"
    for epoch, pieces in by_epoch.items():
        for key, spans in pieces.items():
            spans.sort()
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"epoch {epoch}: {key} read twice: {spans}"
            if epoch == 0:
                covered = [spans[0][0], *(x for a, b in zip(spans, spans[1:]) for x in (a[1], b[0])), spans[-1][1]]
                assert covered[0] == 0 and covered[-1] == lengths[key], (key, spans, lengths[key])
                assert all(a == b for a, b in zip(covered[1::2], covered[2::2])), (key, spans)
    return {epoch: sum(e - f for spans in pieces.values() for f, e in spans) for epoch, pieces in by_epoch.items()}


def _batches_for(docs, tokenizer, world_size, passes):
    tokens = sum(len(tokenizer.encode(t)) for t in docs.values())
    return -(-passes * tokens // (world_size * BATCH * (INPUT_LENGTH + 4)))


# (world size, workers) of each stretch; the first stretch's batches per rank as a fraction of an epoch
LAYOUTS = {
    "2 ranks straight": [(2, 0)],
    "2 ranks -> 1 rank": [(2, 0), (1, 0)],
    "1 rank -> 2 ranks": [(1, 0), (2, 0)],
    "workers 0 -> 2 -> 1": [(1, 0), (1, 2), (1, 1)],
    "2 ranks x 2 workers -> 3 ranks": [(2, 2), (3, 0)],
}


# one file: every reader keeps records g mod G of it; six files: whole files per reader; a shuffle
# buffer of 8 chunks leaves blocks half handed out at the checkpoint
@pytest.mark.parametrize("files, shuffle_buffer", [("one_file", 0), ("six_files", 8)])
@pytest.mark.parametrize("change", list(LAYOUTS))
def test_every_token_once_per_epoch_across_a_change_of_layout(corpus, t5_tokenizer, tmp_path, change, files,
                                                              shuffle_buffer):
    paths, docs = corpus[files]
    stretches = LAYOUTS[change]
    read, states = [], None
    for k, (world_size, num_workers) in enumerate(stretches):
        loaders = _loaders(paths, t5_tokenizer, world_size, num_workers, shuffle_buffer)
        if states is not None:
            for loader in loaders:
                loader.load_rank_states(states)
        last = k == len(stretches) - 1
        # an odd number of batches mid-epoch (a worker's turn, a shuffle block half handed out), then
        # enough for every reader to finish epoch 0
        batches = _batches_for(docs, t5_tokenizer, world_size, 3) if last else 3 + 2 * k
        _train(loaders, batches, read)
        states = _checkpoint(loaders, tmp_path)
    tokens = _audit(read, docs, t5_tokenizer)
    assert tokens[0] == sum(len(t5_tokenizer.encode(t)) for t in docs.values())


def test_a_redealt_position_resumes_exactly_on_its_new_layout(corpus, t5_tokenizer, tmp_path):
    """2 ranks -> 1 rank with 2 workers, then a checkpoint on that layout: resuming it gives the very
    next batches (the re-dealt state is an ordinary state of the new layout)."""
    paths, _ = corpus["six_files"]
    two = _loaders(paths, t5_tokenizer, 2, 0, 8)
    _train(two, 3, [])
    states = _checkpoint(two, tmp_path)

    (one,) = _loaders(paths, t5_tokenizer, 1, 2, 8)
    one.load_rank_states(states)
    assert one.state_dict()["readers"][0]["drains"], "the old readers' open blocks are drained first"
    head, tail = [], []
    _train([one], 5, head)  # inside those drains
    again = _checkpoint([one], tmp_path)
    (one,) = _loaders(paths, t5_tokenizer, 1, 2, 8)
    one.load_rank_states(again)
    _train([one], 12, tail)

    (straight,) = _loaders(paths, t5_tokenizer, 1, 2, 8)
    straight.load_rank_states(states)
    expected = []
    _train([straight], 5 + 12, expected)
    assert head + tail == expected


def test_a_state_from_several_ranks_needs_all_of_them(corpus, t5_tokenizer):
    paths, _ = corpus["one_file"]
    two = _loaders(paths, t5_tokenizer, 2, 0, 0)
    _train(two, 1, [])
    (one,) = _loaders(paths, t5_tokenizer, 1, 0, 0)
    with pytest.raises(T5ForgeError, match="saved by 2 ranks: re-dealing it needs every rank's state"):
        one.load_state_dict(two[0].state_dict())
