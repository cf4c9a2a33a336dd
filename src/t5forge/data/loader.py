"""The resumable pre-training loader: text -> tokens -> 568-token chunks -> span-corrupted batches.

The objective (`corruption`) is T5's span corruption (data/span_corruption.py) or UL2's mixture of
denoisers (data/ul2.py). With a mixture, the n-th chunk a reader cuts is as long as its denoiser
needs, the denoiser drawn from an RNG keyed by (seed, reader, n): the chunk number follows from the
position below, so nothing more is saved to resume.

Each reader (one per data-parallel rank x dataloader worker) walks its own slice of the source
(see `sources.reader_slice`), tokenizes documents, appends EOS to each, cuts the token stream into
raw chunks and corrupts whole batches at once (`span_corruption`).

Example order: training readers shuffle chunks in blocks of `shuffle_buffer` consecutive chunks,
each block permuted by an RNG keyed by (seed, reader, block number); `shuffle_buffer=0` keeps the
corpus order. nanoT5 streams examples through a 10,000-example reservoir instead, whose contents
would have to be saved to resume exactly; a block needs only where it began. Within a block the
order is uniformly random, and every chunk is handed out once per pass (a block that is longer
than the reader's share of the corpus spans two epochs). Held-out readers never shuffle.

A reader's position is a few integers, whatever the documents' sizes: where its current block
begins (epoch, shard, record of the document, token offset inside it), how many chunks of the
block it has handed out, its block and batch counts. A resume re-reads and re-tokenizes the block
from its start and continues at the same chunk; the noise masks come from an RNG keyed by (seed,
reader, batch number), so the position alone restores them. The state also records the files it
refers to (path, size, mtime), and a resume over changed files is refused unless allowed.

With workers, every batch travels with its reader's position. torch's DataLoader takes batches
round-robin from its workers, so after n batches the next one comes from reader n mod W; a resumed
loader rotates which worker plays which reader so that the very next batch is the same one.
Workers die with their parent process, also when it is killed with SIGKILL.

Training readers loop over epochs forever (shard order reshuffled per epoch); held-out readers
(`split="validation"`) make one pass from the start every time, so evaluation sees a fixed set.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections import deque

import numpy as np
import torch

from t5forge.config import check_value
from t5forge.data.sources import TextSource, fingerprint_difference, reader_slice
from t5forge.data.span_corruption import SpanCorruption
from t5forge.errors import T5ForgeError
from t5forge.stop_signals import ignore_stop_signals

DOCS_PER_ENCODE = 16  # documents tokenized per call: amortises the call, keeps the read-ahead small
STATE_VERSION = 2
MODEL_KEYS = ("input_ids", "attention_mask", "labels")  # what a batch hands the model
CHOICES_PER_CALL = 256  # chunks whose denoisers are looked up at once


class ReaderStream:
    """One reader's batches, as numpy arrays, with a constant-size state that resumes at the next batch."""

    def __init__(self, source, tokenizer, corruption, batch_size, seed, reader, num_readers, train,
                 shuffle_buffer=0):
        self.source, self.tokenizer, self.corruption = source, tokenizer, corruption
        self.batch_size, self.seed, self.train = batch_size, seed, train
        self.reader, self.num_readers = reader, num_readers
        self.shuffle_buffer = shuffle_buffer if train else 0  # held-out data: a fixed evaluation set
        self.slice = reader_slice(source.num_shards, reader, num_readers)
        # (epoch, shard_pos, record, offset): where the current block's first chunk begins -- token
        # `offset` of the document read next from that position; index: chunks of the block handed out
        self.state = {"epoch": 0, "shard_pos": 0, "record": 0, "offset": 0, "block": 0, "index": 0, "batches": 0}

    def shard_order(self, epoch: int) -> list[int]:
        shards = list(self.slice.shards)
        if self.train:
            # same permutation for every reader, as the slices are disjoint anyway
            np.random.default_rng([self.seed, epoch]).shuffle(shards)
        return shards

    def _documents(self, epoch, shard_pos, record):
        """(text, position after it) for each of my documents from a position on; a text of None
        marks a shard boundary, which is a position too."""
        while True:
            full_pass, seen_text = (shard_pos, record) == (0, 0), False
            order = self.shard_order(epoch)
            while shard_pos < len(order):
                index = record
                for text in self.source.texts(order[shard_pos], start=record):
                    index += 1
                    if self.slice.keeps(index - 1) and text.strip():
                        seen_text = True
                        yield text, (epoch, shard_pos, index)
                shard_pos, record = shard_pos + 1, 0
                yield None, (epoch, shard_pos, 0)
            if not self.train:
                return
            if full_pass and not seen_text:
                raise T5ForgeError(
                    f"reader {self.reader} of {self.num_readers} found no text in a whole pass over "
                    f"{self.source!r}: the corpus is empty, or has fewer documents than world_size x num_workers"
                )
            epoch, shard_pos, record = epoch + 1, 0, 0

    def _chunks(self, epoch, shard_pos, record, offset, chunk=0):
        """(raw chunk, its denoiser, position where the following chunk begins), from a position on;
        `chunk`: the number of the first chunk (it picks the denoiser, and so the chunk's length).

        Token arrays are kept per document (a deque of (position, tokens, first unused)), so cutting a
        chunk costs the chunk, never the read-ahead: a huge document is tokenized once and sliced."""
        raw_lengths = self.corruption.raw_lengths
        choices = np.empty(0, dtype=np.int64)
        documents = self._documents(epoch, shard_pos, record)
        at = (epoch, shard_pos, record)  # position before the next document read
        queue, queued, skip = deque(), 0, offset
        exhausted = False
        while True:
            if not len(choices):
                choices = self.corruption.denoisers_of(self.seed, self.reader, chunk, CHOICES_PER_CALL)
            denoiser, choices, chunk = int(choices[0]), choices[1:], chunk + 1
            raw_length = raw_lengths[denoiser]
            while queued < raw_length and not exhausted:
                texts, starts = [], []
                for text, after in documents:
                    if text is not None:
                        texts.append(text)
                        starts.append(at)
                    at = after
                    if len(texts) >= DOCS_PER_ENCODE:
                        break
                else:
                    exhausted = True
                for start, ids in zip(starts, self.tokenizer.encode_batch(texts, add_eos=True) if texts else ()):
                    tokens = np.asarray(ids, dtype=np.int64)
                    first, skip = min(skip, len(tokens)), 0
                    queue.append([start, tokens, first])
                    queued += len(tokens) - first
            if queued < raw_length:
                return  # held-out data ends; an incomplete last chunk is dropped (fixed shapes)
            parts, need = [], raw_length
            while need:
                entry = queue[0]
                _, tokens, first = entry
                take = min(need, len(tokens) - first)
                parts.append(tokens[first : first + take])
                entry[2] += take
                need -= take
                if entry[2] == len(tokens):
                    queue.popleft()
            queued -= raw_length
            following = (*queue[0][0], queue[0][2]) if queue else (*at, 0)
            yield np.concatenate(parts) if len(parts) > 1 else parts[0], denoiser, following

    def _blocks(self):
        """(chunk, denoiser, state after handing it out). Training readers permute blocks of
        `shuffle_buffer` consecutive chunks with an RNG keyed by (seed, reader, block); the state
        records where the block began, so a resume re-reads that block and continues at the same
        index. Every block but a held-out reader's last is full, so block b begins at chunk b x size."""
        st = dict(self.state)
        position = (st["epoch"], st["shard_pos"], st["record"], st["offset"])
        block, index = st["block"], st["index"]
        size = max(self.shuffle_buffer, 1)
        chunks = self._chunks(*position, chunk=block * size)
        while True:
            taken = list(itertools.islice(chunks, size))
            if not taken:
                return
            following = taken[-1][2]
            order = np.arange(len(taken))
            if size > 1:
                np.random.default_rng([self.seed, self.reader, block, 2]).shuffle(order)
            for i in range(index, len(taken)):
                if size > 1:
                    done = (block, i + 1) if i + 1 < len(taken) else (block + 1, 0)
                    at = position if i + 1 < len(taken) else following
                else:
                    done, at = (block + 1, 0), taken[i][2]
                chunk, denoiser, _ = taken[order[i]]
                yield chunk, denoiser, (at, *done)
            position, block, index = following, block + 1, 0

    def __iter__(self):
        st = self.state
        batch, denoisers = [], []
        for chunk, denoiser, (position, block, index) in self._blocks():
            batch.append(chunk)
            denoisers.append(denoiser)
            if len(batch) == self.batch_size:
                # held-out readers get their own masks, not copies of the training readers' first ones
                rng = np.random.default_rng([self.seed, self.reader, st["batches"], int(self.train)])
                arrays = self.corruption.batch(batch, denoisers, rng)
                batch, denoisers = [], []
                epoch, shard_pos, record, offset = position
                st.update(epoch=epoch, shard_pos=shard_pos, record=record, offset=offset, block=block,
                          index=index, batches=st["batches"] + 1)
                yield arrays


def _tensors(arrays: dict, keys) -> dict:
    return {k: torch.from_numpy(v) for k, v in arrays.items() if k in keys}


class _WorkerDataset(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker: yields (reader, batch, reader state after it)."""

    def __init__(self, streams: dict, num_workers: int, rotation: int, keys=MODEL_KEYS):
        self.streams, self.num_workers, self.rotation, self.keys = streams, num_workers, rotation, keys

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None:
            import fsspec.asyn

            fsspec.asyn.reset_lock()  # a forked worker must not reuse the parent's fsspec event loop (Hub streaming)
        local = (worker + self.rotation) % self.num_workers
        stream = self.streams[local]
        stream.tokenizer.num_threads = 1  # one core per worker
        try:
            for arrays in stream:
                yield local, _tensors(arrays, self.keys), _copy_state(stream.state)
        except T5ForgeError as err:
            # handed to the main process as a value: a worker's exception would arrive wrapped in a traceback
            yield local, None, str(err)


def init_worker(parent_pid: int, worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn` of the pre-training loader."""
    die_with_parent(parent_pid)
    ignore_stop_signals()


def die_with_parent(parent_pid: int, worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: the kernel kills this worker with SIGKILL when its parent dies.

    A parent killed with SIGKILL (an OOM kill, `kill -9`) runs no clean-up, and its workers would
    otherwise live on, blocked writing batches into a pipe no one reads. Linux only; elsewhere
    torch's own watchdog (workers poll their parent every few seconds) remains.
    """
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect: nobody would kill us
        os._exit(1)


def _copy_state(state: dict) -> dict:
    return {k: int(v) for k, v in state.items()}


class PretrainLoader:
    """Iterable of dict(input_ids=LongTensor[B, input_length], labels=LongTensor[B, target_length]),
    with attention_mask=LongTensor[B, input_length] for UL2 (whose S-denoiser inputs are padded).
    `extra_keys=("denoiser",)` adds each example's denoiser index (`t5forge data preview`).

    Training: each `iter()` continues from the current position (use one iterator at a time);
    held-out: each `iter()` starts over, so evaluation sees the same batches every time.
    """

    def __init__(self, *, source, tokenizer, corruption, batch_size, seed, rank, world_size, num_workers,
                 train, pin_memory=False, allow_changed_files=False, shuffle_buffer=0):
        self.source, self.tokenizer, self.corruption = source, tokenizer, corruption
        self.batch_size, self.seed, self.train = batch_size, seed, train
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.pin_memory, self.allow_changed_files = pin_memory, allow_changed_files
        check_value("data.shuffle_buffer", shuffle_buffer)
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.input_length, self.target_length = corruption.input_length, corruption.target_length
        self.raw_length = max(corruption.raw_lengths)
        self.extra_keys = ()
        self._local_readers = max(num_workers, 1)
        self._consumed = 0  # batches handed out by this loader (training position)
        self._states = {}  # local reader -> state after its last batch handed out

    def _streams(self, states: dict) -> dict:
        readers = self._local_readers
        streams = {}
        for local in range(readers):
            stream = ReaderStream(
                self.source, self.tokenizer, self.corruption, self.batch_size, self.seed,
                reader=self.rank * readers + local, num_readers=self.world_size * readers, train=self.train,
                shuffle_buffer=self.shuffle_buffer,
            )
            if local in states:
                stream.state = _copy_state(states[local])
            streams[local] = stream
        return streams

    def __iter__(self):
        if not self.train:
            yield from self._iterate({}, consumed=0, record=False)
            return
        yield from self._iterate(self._states, consumed=self._consumed, record=True)

    def _iterate(self, states, consumed, record):
        streams = self._streams(states)
        produced = 0
        if self.num_workers == 0:
            for arrays in streams[0]:
                produced += 1
                if record:
                    self._states[0] = _copy_state(streams[0].state)
                    self._consumed += 1
                yield _tensors(arrays, MODEL_KEYS + tuple(self.extra_keys))
        else:
            dataset = _WorkerDataset(streams, self.num_workers, rotation=consumed % self.num_workers,
                                     keys=MODEL_KEYS + tuple(self.extra_keys))
            # Its own generator: a DataLoader otherwise draws its workers' base seed from the global
            # torch RNG when iteration starts, which would shift the model's dropout stream by one
            # draw at a different step in a resumed run than in an uninterrupted one.
            generator = torch.Generator().manual_seed(self.seed)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                prefetch_factor=2, generator=generator,
                # Workers die with the trainer (kill -9, OOM), and leave the stop signals sent to the
                # whole process group (Ctrl-C, scancel) to it, so it can finish its step and save.
                worker_init_fn=functools.partial(init_worker, os.getpid()),
            )
            for local, batch, state in loader:
                if batch is None:
                    raise T5ForgeError(state)
                produced += 1
                if record:
                    self._states[local] = state
                    self._consumed += 1
                yield batch
        if produced == 0:
            raise T5ForgeError(
                f"held-out data {self.source!r} is too small for one batch of {self.batch_size} x "
                f"{self.raw_length} tokens on rank {self.rank} of {self.world_size}; give more validation "
                "text or a smaller batch"
            )

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "consumed": self._consumed,
            "readers": {int(k): _copy_state(v) for k, v in self._states.items()},
            "layout": self._layout(),
            "source": self.source.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise T5ForgeError(
                f"the checkpoint's data position has format version {state.get('version')} and this t5forge reads "
                f"version {STATE_VERSION}; resume it with the t5forge that wrote it, or start a new run"
            )
        if state["layout"] != self._layout():
            raise T5ForgeError(
                f"cannot resume the data position: it was saved with {state['layout']} and this run has "
                f"{self._layout()}; resume with the same data.num_workers, data.shuffle_buffer, world size, batch size, "
                "input length and objective (data.objective, data.ul2_denoisers)"
            )
        changed = fingerprint_difference(state["source"], self.source.fingerprint()) if "source" in state else ""
        if changed and not self.allow_changed_files:
            raise T5ForgeError(
                f"the training data changed since the checkpoint ({changed}): its saved position would re-read or "
                "skip data; restore the files, or continue from the saved position anyway with "
                "data.allow_changed_files=true"
            )
        if changed:
            import logging

            logging.getLogger(__name__).warning("training data changed since the checkpoint (%s); continuing "
                                                "from the saved position (data.allow_changed_files=true)", changed)
        self._consumed = int(state["consumed"])
        self._states = {int(k): _copy_state(v) for k, v in state["readers"].items()}

    def _layout(self) -> dict:
        layout = {
            "rank": self.rank, "world_size": self.world_size, "num_workers": self.num_workers,
            "batch_size": self.batch_size, "raw_length": self.raw_length, "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
        }
        objective = self.corruption.layout()  # None for span corruption: its positions read as before
        if objective is not None:
            layout["objective"] = objective
        return layout


def build_pretrain_loader(
    *,
    tokenizer,
    dataset: str | None = "allenai/c4",
    dataset_config: str | None = "en",
    files=(),
    text_field: str = "text",
    split: str = "train",
    batch_size: int,
    input_length: int = 512,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    objective: str = "span_corruption",
    ul2_denoisers=(),
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    on_decode_error: str = "raise",
    skip_option: str | None = None,
    pin_memory: bool = False,
    allow_changed_files: bool = False,
    shuffle_buffer: int = 0,
) -> PretrainLoader:
    """Span-corruption (or, objective="ul2", UL2 mixture: `ul2_denoisers`, default the paper's) batches
    from local `files` (if any) or the Hub `dataset`; see the module docstring."""
    from t5forge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer)
    if batch_size < 1:
        raise T5ForgeError(f"batch size must be at least 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise T5ForgeError(f"rank {rank} is not in [0, world_size={world_size})")
    check_value("data.num_workers", num_workers)
    check_value("data.objective", objective)
    if objective == "ul2":
        from t5forge.data.ul2 import ALL_PARADIGM_TOKENS, DEFAULT_DENOISERS, build_mixture

        tokenizer = tokenizer.with_added_tokens(ALL_PARADIGM_TOKENS)  # the run's tokenizer has them already
        corruption = build_mixture(tokenizer, input_length, list(ul2_denoisers) or list(DEFAULT_DENOISERS))
    else:
        corruption = SpanCorruption(
            vocab_size=tokenizer.sentinel_end, num_sentinels=tokenizer.num_sentinels, eos_id=tokenizer.eos_id,
            input_length=input_length, noise_density=noise_density, mean_noise_span_length=mean_noise_span_length,
        )
    source = TextSource(
        dataset=dataset, dataset_config=dataset_config, files=files, split=split, text_field=text_field,
        on_decode_error=on_decode_error, skip_option=skip_option,
    )
    return PretrainLoader(
        source=source, tokenizer=tokenizer, corruption=corruption, batch_size=batch_size, seed=seed, rank=rank,
        world_size=world_size, num_workers=num_workers, train=split == "train", pin_memory=pin_memory,
        allow_changed_files=allow_changed_files, shuffle_buffer=shuffle_buffer,
    )
