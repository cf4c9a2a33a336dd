"""One reader of the pre-training loader: documents -> tokens -> raw chunks -> shuffled blocks -> batches.

A reader (one per data-parallel rank x dataloader worker) walks its own slice of the source (see
`sources.reader_slice`), tokenizes documents, appends EOS to each, cuts the token stream into raw
chunks and corrupts whole batches at once (`span_corruption`).

What a reader reads, in order:
1. `drains`: the unfinished shuffle blocks of readers of an earlier layout (another world size or
   worker count), each replayed exactly as its own reader would have (data/redeal.py);
2. `pending`: explicit pieces of the source, `[epoch, shard, start record, modulus, remainder,
   first token]` (the records `i >= start` with `i % modulus == remainder`; the first document
   from token `first token` on), labelled with the epoch they belong to: the rest of an earlier
   layout's epochs, re-dealt;
3. its own slice, epoch after epoch from `epoch` on (the shard order reshuffled per epoch).
A run that never changes its layout has no drains and no pending pieces.

Example order: training readers shuffle chunks in blocks of `shuffle_buffer` consecutive chunks,
each block permuted by an RNG keyed by (seed, reader, block number); `shuffle_buffer=0` keeps the
corpus order. The objective (`corruption`) is T5's span corruption (data/span_corruption.py) or
UL2's mixture of denoisers (data/ul2.py). With a mixture, the n-th chunk a reader cuts is as long
as its denoiser needs, the denoiser drawn from an RNG keyed by (seed, reader, n): every block but a
held-out reader's last is full, so block b begins at chunk b x size and nothing more is saved.
nanoT5 streams examples through a 10,000-example reservoir instead, whose contents
would have to be saved to resume exactly; a block needs only where it began. Within a block the
order is uniformly random, and every chunk is handed out once per pass (a block that is longer
than the reader's share of the corpus spans two epochs). Held-out readers never shuffle.

A reader's state is a few integers, whatever the documents' sizes: where its current block begins
(the pending pieces left, epoch, shard, record of the document, token offset inside it), how many
chunks of the block it has handed out, where the block ends (`next`, what a re-deal hands on),
its block and batch counts. A resume re-reads and re-tokenizes the block from its start and
continues at the same chunk; the noise masks come from an RNG keyed by (seed, reader, batch
number), so the state alone restores them.
"""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np

from t5forge.data.sources import reader_slice
from t5forge.errors import T5ForgeError

DOCS_PER_ENCODE = 16  # documents tokenized per call: amortises the call, keeps the read-ahead small
CHOICES_PER_CALL = 256  # chunks whose denoisers are looked up at once


def initial_state() -> dict:
    return {"pending": [], "drains": [], "epoch": 0, "shard_pos": 0, "record": 0, "offset": 0, "block": 0,
            "index": 0, "next": None, "batches": 0}


def plain(obj):
    """A copy of a state made of Python ints, lists and dicts (numpy ints and tuples converted)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return None if obj is None else int(obj)


def shard_order(reader_slice, seed: int, epoch: int) -> list[int]:
    """A training reader's shards in epoch `epoch`: the same permutation for every reader, as the
    slices are disjoint anyway."""
    shards = list(reader_slice.shards)
    np.random.default_rng([seed, epoch]).shuffle(shards)
    return shards


def own_part(state: dict) -> dict:
    """The state of a reader's own stream (its pending pieces and slice), without drains or batch count."""
    return {k: state[k] for k in ("pending", "epoch", "shard_pos", "record", "offset", "block", "index", "next")}


class ReaderStream:
    """One reader's batches, as dicts of numpy arrays (the objective's `batch`), with a constant-size state that resumes at the next batch.

    `spans=True`: each batch also holds "spans", per row the (epoch, shard, record, first token, end token)
    pieces of documents it holds -- what an audit of "every token once per epoch" reads."""

    def __init__(self, source, tokenizer, corruption, batch_size, seed, reader, num_readers, train,
                 shuffle_buffer=0, spans=False):
        self.source, self.tokenizer, self.corruption = source, tokenizer, corruption
        self.batch_size, self.seed, self.train = batch_size, seed, train
        self.reader, self.num_readers = reader, num_readers
        self.shuffle_buffer = shuffle_buffer if train else 0  # held-out data: a fixed evaluation set
        self.slice = reader_slice(source.num_shards, reader, num_readers)
        self.spans = spans
        self.state = initial_state()

    def shard_order(self, epoch: int) -> list[int]:
        return shard_order(self.slice, self.seed, epoch) if self.train else list(self.slice.shards)

    def _documents(self, pending, position):
        """(text, its position, position after it, (epoch, shard, record)) for each document from a
        position on; a text of None marks a piece or shard boundary, which is a position too.

        A position is (p, epoch, shard_pos, record, offset): p < len(pending) is inside pending piece
        p (from `record` on), else inside my own slice at (epoch, shard_pos, record); `offset` is the
        first token of the document at `record` not read yet (a document's own position carries it,
        that of the document it resumes in, or its piece's first token)."""
        p, epoch, shard_pos, record, offset = position
        while p < len(pending):
            label, shard, _, modulus, remainder, _ = pending[p]
            index = record
            for text in self.source.texts(shard, start=record):
                index += 1
                if (index - 1) % modulus == remainder and text.strip():
                    skip = offset if index - 1 == record else 0
                    yield (text, (p, epoch, shard_pos, index - 1, skip), (p, epoch, shard_pos, index, 0),
                           (label, shard, index - 1))
            p += 1
            # the own slice starts at a shard's start
            record, offset = (pending[p][2], pending[p][5]) if p < len(pending) else (0, 0)
            yield None, None, (p, epoch, shard_pos, record, offset), None
        while True:
            full_pass, seen_text = (shard_pos, record) == (0, 0), False
            order = self.shard_order(epoch)
            while shard_pos < len(order):
                index, shard = record, order[shard_pos]
                for text in self.source.texts(shard, start=record):
                    index += 1
                    if self.slice.keeps(index - 1) and text.strip():
                        seen_text = True
                        skip = offset if index - 1 == record else 0
                        yield (text, (p, epoch, shard_pos, index - 1, skip), (p, epoch, shard_pos, index, 0),
                               (epoch, shard, index - 1))
                shard_pos, record, offset = shard_pos + 1, 0, 0
                yield None, None, (p, epoch, shard_pos, 0, 0), None
            if not self.train:
                return
            if full_pass and not seen_text:
                raise T5ForgeError(
                    f"reader {self.reader} of {self.num_readers} found no text in a whole pass over "
                    f"{self.source!r}: the corpus is empty, or has fewer documents than world_size x num_workers"
                )
            epoch, shard_pos, record = epoch + 1, 0, 0

    def _chunks(self, pending, position, chunk=0):
        """(raw chunk, its denoiser, its spans, position where the following chunk begins), from a
        position on; `chunk`: the number of the first chunk (it picks the denoiser, and so the length).

        Token arrays are kept per document (a deque of (position, tokens, first unused, document)),
        so cutting a chunk costs the chunk, never the read-ahead: a huge document is tokenized once
        and sliced."""
        raw_lengths = self.corruption.raw_lengths
        choices = np.empty(0, dtype=np.int64)
        documents = self._documents(pending, position)
        at = position  # position before the next document read
        queue, queued = deque(), 0
        exhausted = False
        while True:
            if not len(choices):
                choices = self.corruption.denoisers_of(self.seed, self.reader, chunk, CHOICES_PER_CALL)
            denoiser, choices, chunk = int(choices[0]), choices[1:], chunk + 1
            raw_length = raw_lengths[denoiser]
            while queued < raw_length and not exhausted:
                texts, starts, names = [], [], []
                for text, start, after, name in documents:
                    if text is not None:
                        texts.append(text)
                        starts.append(start)
                        names.append(name)
                    at = after
                    if len(texts) >= DOCS_PER_ENCODE:
                        break
                else:
                    exhausted = True
                encoded = self.tokenizer.encode_batch(texts, add_eos=True) if texts else ()
                for start, name, ids in zip(starts, names, encoded):
                    tokens = np.asarray(ids, dtype=np.int64)
                    first = min(start[4], len(tokens))
                    queue.append([start[:4], tokens, first, name])
                    queued += len(tokens) - first
            if queued < raw_length:
                return  # held-out data ends; an incomplete last chunk is dropped (fixed shapes)
            parts, spans, need = [], [], raw_length
            while need:
                entry = queue[0]
                _, tokens, first, name = entry
                take = min(need, len(tokens) - first)
                parts.append(tokens[first : first + take])
                if self.spans:
                    spans.append((*name, first, first + take))
                entry[2] += take
                need -= take
                if entry[2] == len(tokens):
                    queue.popleft()
            queued -= raw_length
            following = (*queue[0][0], queue[0][2]) if queue else at
            yield np.concatenate(parts) if len(parts) > 1 else parts[0], denoiser, spans, following

    def _state_at(self, pending, position) -> dict:
        """The state fields naming a position: the pending pieces left (the first from the
        position's record and token offset on) and the own slice's place."""
        p, epoch, shard_pos, record, offset = position
        if p < len(pending):
            first = [*pending[p][:2], record, *pending[p][3:5], offset]
            return {"pending": [first, *map(list, pending[p + 1 :])], "epoch": epoch, "shard_pos": 0, "record": 0,
                    "offset": 0}
        return {"pending": [], "epoch": epoch, "shard_pos": shard_pos, "record": record, "offset": offset}

    def _own_blocks(self, state):
        """(chunk, denoiser, spans, own state after handing it out), from an own state (`own_part`) on.

        Training readers permute blocks of `shuffle_buffer` consecutive chunks with an RNG keyed by
        (seed, reader, block); the state records where the block began, so a resume re-reads that
        block and continues at the same index."""
        pending = tuple(tuple(piece) for piece in state["pending"])
        if pending:
            position = (0, state["epoch"], 0, pending[0][2], pending[0][5])
        else:
            position = (0, state["epoch"], state["shard_pos"], state["record"], state["offset"])
        block, index = state["block"], state["index"]
        size = max(self.shuffle_buffer, 1)
        chunks = self._chunks(pending, position, chunk=block * size)
        while True:
            taken = list(itertools.islice(chunks, size))
            if not taken:
                return
            following = taken[-1][3]
            order = np.arange(len(taken))
            if size > 1:
                np.random.default_rng([self.seed, self.reader, block, 2]).shuffle(order)
            for i in range(index, len(taken)):
                if i + 1 < len(taken):  # mid-block: resume re-reads the block; a re-deal hands on its end
                    after = {**self._state_at(pending, position), "block": block, "index": i + 1,
                             "next": self._state_at(pending, following)}
                else:
                    after = {**self._state_at(pending, following), "block": block + 1, "index": 0, "next": None}
                chunk, denoiser, spans, _ = taken[order[i]]
                yield chunk, denoiser, spans, after
            position, block, index = following, block + 1, 0

    def _blocks(self):
        """(chunk, denoiser, spans, state after handing it out, batch count aside): the drains first, each
        replayed to the end of its block by a stream of the reader it came from, then my own stream."""
        drains = list(self.state["drains"])
        own = own_part(self.state)
        while drains:
            item = drains[0]
            replay = ReaderStream(self.source, self.tokenizer, self.corruption, self.batch_size, self.seed,
                                  item["reader"], item["num_readers"], self.train, self.shuffle_buffer, self.spans)
            for chunk, denoiser, spans, after in replay._own_blocks(item["state"]):
                done = after["block"] != item["state"]["block"]
                drains = drains[1:] if done else [{**item, "state": after}, *drains[1:]]
                yield chunk, denoiser, spans, {**own, "drains": drains}
                if done:
                    break
            else:
                drains = drains[1:]
        for chunk, denoiser, spans, after in self._own_blocks(own):
            yield chunk, denoiser, spans, {**after, "drains": []}

    def __iter__(self):
        st = self.state
        batch, denoisers, spans = [], [], []
        for chunk, denoiser, chunk_spans, after in self._blocks():
            batch.append(chunk)
            denoisers.append(denoiser)
            spans.append(chunk_spans)
            if len(batch) == self.batch_size:
                # held-out readers get their own masks, not copies of the training readers' first ones
                rng = np.random.default_rng([self.seed, self.reader, st["batches"], int(self.train)])
                arrays = self.corruption.batch(batch, denoisers, rng)
                st.update(after, batches=st["batches"] + 1)
                if self.spans:
                    arrays["spans"] = spans
                yield arrays
                batch, denoisers, spans = [], [], []
