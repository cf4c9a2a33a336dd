"""The resumable pre-training loader: text -> tokens -> 568-token chunks -> span-corrupted batches.

The objective (`corruption`) is T5's span corruption (data/span_corruption.py) or UL2's mixture of
denoisers (data/ul2.py); see data/reader_stream.py for how a reader picks each chunk's denoiser.

Each reader (one per data-parallel rank x dataloader worker) walks its own slice of the source;
what a reader does, and its state, are data/reader_stream.py's. The loader's state is its readers'
states plus the layout they belong to (world size, workers, batch size) and the files it refers to
(path, size, mtime); a resume over changed files is refused unless allowed.

Resuming on the same layout continues every reader exactly (bit for bit). Resuming on another
world size or `data.num_workers` re-deals the position over the new readers (data/redeal.py): the
epoch goes on and every token of every document is still read exactly once per epoch; the
batches themselves differ from those of a run that never changed. A changed micro-batch size
alone keeps every reader's position (a reader's state counts chunks, not batches).

With workers, every batch travels with its reader's position. torch's DataLoader takes batches
round-robin from its workers, so after n batches the next one comes from reader n mod W; a resumed
loader rotates which worker plays which reader so that the very next batch is the same one.
Workers die with their parent process, also when it is killed with SIGKILL.

Training readers loop over epochs forever (shard order reshuffled per epoch); held-out readers
(`split="validation"`) make one pass from the start every time, so evaluation sees a fixed set.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from t5forge.config import check_value
from t5forge.data.reader_stream import ReaderStream, initial_state, plain
from t5forge.data.sources import TextSource, fingerprint_difference
from t5forge.data.span_corruption import SpanCorruption
from t5forge.errors import T5ForgeError
from t5forge.stop_signals import ignore_stop_signals

STATE_VERSION = 3  # 3: drains, pending pieces and block ends (data/redeal.py); 2 still resumes on its own layout
REDEAL_VERSIONS = (3,)
MODEL_KEYS = ("input_ids", "attention_mask", "labels")  # what a batch hands the model


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
                yield local, _tensors(arrays, self.keys), plain(stream.state)
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


def _tensors(arrays: dict, keys) -> dict:
    """The batch's arrays named in `keys` as tensors; "spans" (an audit's lists) as they are."""
    return {k: v if k == "spans" else torch.from_numpy(v) for k, v in arrays.items() if k in keys}


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
        # Audit: each batch also carries "spans", per row the (epoch, shard, record, first token,
        # end token) pieces of documents it holds (reader_stream.ReaderStream); not for training.
        self.record_spans = False

    def _streams(self, states: dict) -> dict:
        readers = self._local_readers
        streams = {}
        for local in range(readers):
            stream = ReaderStream(
                self.source, self.tokenizer, self.corruption, self.batch_size, self.seed,
                reader=self.rank * readers + local, num_readers=self.world_size * readers, train=self.train,
                shuffle_buffer=self.shuffle_buffer, spans=self.record_spans,
            )
            if local in states:
                stream.state = {**initial_state(), **plain(states[local])}  # version 2: no drains, pieces
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
                    self._states[0] = plain(streams[0].state)
                    self._consumed += 1
                yield _tensors(arrays, self._keys())
        else:
            dataset = _WorkerDataset(streams, self.num_workers, rotation=consumed % self.num_workers,
                                     keys=self._keys())
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

    def _keys(self) -> tuple:
        return MODEL_KEYS + tuple(self.extra_keys) + (("spans",) if self.record_spans else ())

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "consumed": self._consumed,
            "readers": {int(k): plain(v) for k, v in self._states.items()},
            "layout": self._layout(),
            "source": self.source.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """This rank's state of a checkpoint; a single process's state also resumes on another layout."""
        layout = self._check(state)
        if (layout["world_size"], layout["num_workers"]) != (self.world_size, self.num_workers):
            if layout["world_size"] != 1:
                raise T5ForgeError(
                    f"the data position was saved by {layout['world_size']} ranks: re-dealing it needs every "
                    "rank's state (PretrainLoader.load_rank_states, as a resumed run does)"
                )
            self.load_rank_states([state])
            return
        self._note_batch_change(layout)
        self._consumed = int(state["consumed"])
        self._states = {int(k): plain(v) for k, v in state["readers"].items()}

    def load_rank_states(self, states: list[dict]) -> None:
        """Every rank's state of a checkpoint (rank r's at index r): this rank's position, exactly when
        the world size and data.num_workers are unchanged, re-dealt (data/redeal.py) when not."""
        from t5forge.data.redeal import redeal

        layouts = [self._check(state) for state in states]
        old = layouts[0]
        if (len(states), old["num_workers"]) == (self.world_size, self.num_workers):
            self.load_state_dict(states[self.rank])
            return
        if any(state["version"] not in REDEAL_VERSIONS for state in states):
            raise T5ForgeError(
                f"the checkpoint's data position (format version {states[0]['version']}) was written by an older "
                f"t5forge and can only resume on its own layout: {len(states)} rank(s) with "
                f"data.num_workers={old['num_workers']}"
            )
        readers_per_rank = max(old["num_workers"], 1)
        saved = [plain(state["readers"].get(local, initial_state())) for state in states
                 for local in range(readers_per_rank)]
        new = redeal(saved, self.world_size * self._local_readers, self.source.num_shards, self.seed)
        mine = new[self.rank * self._local_readers:(self.rank + 1) * self._local_readers]
        self._states = dict(enumerate(mine))
        self._consumed = 0  # the re-dealt readers all start at a batch boundary: no worker rotation to keep
        if self.rank == 0:
            logging.getLogger(__name__).info(
                "resuming a %d-rank run (data.num_workers=%d) on %d rank(s) (data.num_workers=%d): data position "
                "re-dealt from %d to %d readers (%d unfinished shuffle blocks, %d pieces of the source left before "
                "epoch %d); every document is still read once per epoch, in another order than without the change",
                len(states), old["num_workers"], self.world_size, self.num_workers, len(saved), len(new),
                sum(len(s["drains"]) for s in new), sum(len(s["pending"]) for s in new), new[0]["epoch"])

    def _check(self, state: dict) -> dict:
        """The saved layout, once what no layout change can carry over is checked."""
        if not isinstance(state, dict) or "layout" not in state:
            raise T5ForgeError("the checkpoint's data.pt holds no pre-training loader state (was it written by "
                               "`t5forge finetune`?); start a new run, or pre-train from it with "
                               "model.checkpoint_path=CHECKPOINT")
        if state.get("version") not in (2, STATE_VERSION):
            raise T5ForgeError(
                f"the checkpoint's data position has format version {state.get('version')} and this t5forge reads "
                f"versions 2 and {STATE_VERSION}; resume it with the t5forge that wrote it, or start a new run"
            )
        layout, now = state["layout"], self._layout()
        keys = {"raw_length": "text tokens per example (from data.input_length)", "seed": "seed",
                "shuffle_buffer": "data.shuffle_buffer"}
        changed = [f"{key} {layout[name]} -> {now[name]}" for name, key in keys.items() if layout[name] != now[name]]
        if layout.get("objective") != now.get("objective"):
            raise T5ForgeError(
                f"cannot resume the data position: the objective changed since the checkpoint ({layout.get('objective')} "
                f"-> {now.get('objective')}); resume with the checkpoint's data.objective and data.ul2_denoisers"
            )
        if changed:
            raise T5ForgeError(
                f"cannot resume the data position: {', '.join(changed)} since the checkpoint; a position counts "
                "chunks of that many tokens, cut and shuffled by that seed and buffer: resume with the "
                "checkpoint's data.input_length, seed and data.shuffle_buffer (its config.yaml)"
            )
        changed = fingerprint_difference(state["source"], self.source.fingerprint()) if "source" in state else ""
        if changed and not self.allow_changed_files:
            raise T5ForgeError(
                f"the training data changed since the checkpoint ({changed}): its saved position would re-read or "
                "skip data; restore the files, or continue from the saved position anyway with "
                "data.allow_changed_files=true"
            )
        if changed:
            logging.getLogger(__name__).warning("training data changed since the checkpoint (%s); continuing "
                                                "from the saved position (data.allow_changed_files=true)", changed)
        return layout

    def _note_batch_change(self, layout: dict) -> None:
        if layout["batch_size"] != self.batch_size and self.rank == 0:
            logging.getLogger(__name__).info(
                "data position: micro-batches of %d sequences per rank, %d before the checkpoint; every reader "
                "goes on from the same chunk", self.batch_size, layout["batch_size"])

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
