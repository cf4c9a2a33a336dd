"""The resumable pre-training loader: text -> tokens -> 568-token chunks -> span-corrupted batches.

Each reader (one per data-parallel rank x dataloader worker) walks its own slice of the source
(see `sources.reader_slice`), tokenizes documents, appends EOS to each, cuts the token stream into
raw chunks and corrupts whole batches at once (`span_corruption`). A reader's position is a few
numbers -- epoch, shard, record, the tokens read but not yet used, batches made -- and its noise
masks come from an RNG keyed by (seed, reader, batch number), so the position alone restores it.

With workers, every batch travels with its reader's position. torch's DataLoader takes batches
round-robin from its workers, so after n batches the next one comes from reader n mod W; a resumed
loader rotates which worker plays which reader so that the very next batch is the same one.

Training readers loop over epochs forever (shard order reshuffled per epoch); held-out readers
(`split="validation"`) make one pass from the start every time, so evaluation sees a fixed set.
"""

from __future__ import annotations

import numpy as np
import torch

from t5forge.data.sources import TextSource, reader_slice
from t5forge.data.span_corruption import SpanCorruption
from t5forge.errors import T5ForgeError
from t5forge.train.stop_signals import ignore_stop_signals

DOCS_PER_ENCODE = 16  # documents tokenized per call: amortises the call, keeps the read-ahead small
STATE_VERSION = 1


class ReaderStream:
    """One reader's batches, as numpy arrays, with a state that resumes at the next batch."""

    def __init__(self, source, tokenizer, corruption, batch_size, seed, reader, num_readers, train):
        self.source, self.tokenizer, self.corruption = source, tokenizer, corruption
        self.batch_size, self.seed, self.train = batch_size, seed, train
        self.reader, self.num_readers = reader, num_readers
        self.slice = reader_slice(source.num_shards, reader, num_readers)
        self.state = {"epoch": 0, "shard_pos": 0, "record": 0, "pending": [], "batches": 0}

    def shard_order(self, epoch: int) -> list[int]:
        shards = list(self.slice.shards)
        if self.train:
            # same permutation for every reader, as the slices are disjoint anyway
            np.random.default_rng([self.seed, epoch]).shuffle(shards)
        return shards

    def _documents(self):
        """(text, position after it) for each of my documents from the saved position on; a text of
        None marks a shard boundary, which is a position too."""
        st = self.state
        epoch, shard_pos, record = st["epoch"], st["shard_pos"], st["record"]
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

    def __iter__(self):
        raw_length, st = self.corruption.raw_length, self.state
        pending = np.asarray(st["pending"], dtype=np.int64)
        chunks: list[np.ndarray] = []
        texts, position = [], None
        documents = self._documents()
        while True:
            # fill: tokenize a few documents at a time
            try:
                text, position = next(documents)
                if text is not None:
                    texts.append(text)
                if len(texts) < DOCS_PER_ENCODE and text is not None:
                    continue
            except StopIteration:
                documents = None
            if texts:
                ids = self.tokenizer.encode_batch(texts, add_eos=True)
                pending = np.concatenate([pending, *[np.asarray(t, dtype=np.int64) for t in ids]])
                texts = []
            # cut: whole raw chunks; a batch is complete when it has batch_size of them
            while len(pending) >= raw_length and len(chunks) < self.batch_size:
                chunks.append(pending[:raw_length])
                pending = pending[raw_length:]
                if len(chunks) == self.batch_size:
                    # held-out readers get their own masks, not copies of the training readers' first ones
                    rng = np.random.default_rng([self.seed, self.reader, st["batches"], int(self.train)])
                    inputs, targets = self.corruption(np.stack(chunks), rng)
                    chunks = []
                    epoch, shard_pos, record = position
                    st.update(epoch=epoch, shard_pos=shard_pos, record=record, batches=st["batches"] + 1)
                    st["pending"] = pending.tolist()
                    yield inputs, targets
            if documents is None:
                return  # held-out data ends; an incomplete last batch is dropped (fixed shapes)


class _WorkerDataset(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker: yields (reader, batch, reader state after it)."""

    def __init__(self, streams: dict, num_workers: int, rotation: int):
        self.streams, self.num_workers, self.rotation = streams, num_workers, rotation

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
            for inputs, targets in stream:
                batch = {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(targets)}
                yield local, batch, _copy_state(stream.state)
        except T5ForgeError as err:
            # handed to the main process as a value: a worker's exception would arrive wrapped in a traceback
            yield local, None, str(err)


def _copy_state(state: dict) -> dict:
    return {**state, "pending": list(state["pending"])}


class PretrainLoader:
    """Iterable of dict(input_ids=LongTensor[B, input_length], labels=LongTensor[B, target_length]).

    Training: each `iter()` continues from the current position (use one iterator at a time);
    held-out: each `iter()` starts over, so evaluation sees the same batches every time.
    """

    def __init__(self, *, source, tokenizer, corruption, batch_size, seed, rank, world_size, num_workers,
                 train, pin_memory=False):
        self.source, self.tokenizer, self.corruption = source, tokenizer, corruption
        self.batch_size, self.seed, self.train = batch_size, seed, train
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.pin_memory = pin_memory
        self.input_length, self.target_length = corruption.input_length, corruption.target_length
        self.raw_length = corruption.raw_length
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
            for inputs, targets in streams[0]:
                produced += 1
                if record:
                    self._states[0] = _copy_state(streams[0].state)
                    self._consumed += 1
                yield {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(targets)}
        else:
            dataset = _WorkerDataset(streams, self.num_workers, rotation=consumed % self.num_workers)
            # Its own generator: a DataLoader otherwise draws its workers' base seed from the global
            # torch RNG when iteration starts, which would shift the model's dropout stream by one
            # draw at a different step in a resumed run than in an uninterrupted one.
            generator = torch.Generator().manual_seed(self.seed)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                prefetch_factor=2, generator=generator,
                # A stop signal sent to the whole process group (Ctrl-C, SLURM's SIGTERM) is the main
                # process's to handle (finish the step, save); workers dying first would break that.
                worker_init_fn=ignore_stop_signals,
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
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise T5ForgeError(f"data loader state has version {state.get('version')}, expected {STATE_VERSION}")
        if state["layout"] != self._layout():
            raise T5ForgeError(
                f"cannot resume the data position: it was saved with {state['layout']} and this run has "
                f"{self._layout()}; resume with the same data.num_workers, world size, batch size and input length"
            )
        self._consumed = int(state["consumed"])
        self._states = {int(k): _copy_state(v) for k, v in state["readers"].items()}

    def _layout(self) -> dict:
        return {
            "rank": self.rank, "world_size": self.world_size, "num_workers": self.num_workers,
            "batch_size": self.batch_size, "raw_length": self.raw_length, "seed": self.seed,
        }


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
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    on_decode_error: str = "raise",
    pin_memory: bool = False,
) -> PretrainLoader:
    """Span-corruption batches from local `files` (if any) or the Hub `dataset`; see the module docstring."""
    from t5forge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer)
    if batch_size < 1:
        raise T5ForgeError(f"batch size must be at least 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise T5ForgeError(f"rank {rank} is not in [0, world_size={world_size})")
    if num_workers < 0:
        raise T5ForgeError(f"data.num_workers must be >= 0, got {num_workers}")
    corruption = SpanCorruption(
        vocab_size=tokenizer.vocab_size, num_sentinels=tokenizer.num_sentinels, eos_id=tokenizer.eos_id,
        input_length=input_length, noise_density=noise_density, mean_noise_span_length=mean_noise_span_length,
    )
    source = TextSource(
        dataset=dataset, dataset_config=dataset_config, files=files, split=split, text_field=text_field,
        on_decode_error=on_decode_error,
    )
    return PretrainLoader(
        source=source, tokenizer=tokenizer, corruption=corruption, batch_size=batch_size, seed=seed, rank=rank,
        world_size=world_size, num_workers=num_workers, train=split == "train", pin_memory=pin_memory,
    )
