"""Re-dealing the pre-training data position to another number of readers (ranks x workers).

The rule a re-deal keeps: every token of every document enters training exactly once per epoch.
A document split across a checkpoint goes on from the token where its last chunk ended; which
reader (and so which rank) reads it, and where it lands in a batch, may change.

A reader of the old layout (reader g of G) has, at the checkpoint:
- possibly an unfinished shuffle block (`index > 0`): some of its chunks handed out, in a
  permuted order. It becomes a *drain*: a new reader replays that block exactly as reader g would
  have (same documents, same cut, same permutation) and hands out the chunks not yet handed out;
- the rest of its stream after that block (`next`, or its position when no block is open): the
  pending pieces it still had, then the rest of its slice's current epoch, then its whole slice in
  every later epoch up to the common epoch E at which every old reader's slice has been started at
  most. These become pieces `[epoch, shard, start record, modulus, remainder, first token]`.
The pieces of all old readers are dealt round-robin over the new readers, epoch by epoch (older
epochs first); when an epoch has fewer pieces than new readers, its pieces are split by records
(modulus k x m) so every new reader gets some. From epoch E on, each new reader reads its own
slice of the new layout. Epochs are per reader, as they always were: a reader whose share is read
faster starts the next epoch earlier; each document is still read once in every epoch.

RNG streams of the model (dropout) are per rank and cannot be re-dealt; the run builder reseeds
them (train/checkpoint_parts.py, RNGStreams).
"""

from __future__ import annotations

from t5forge.data.reader_stream import initial_state, own_part, shard_order
from t5forge.data.sources import reader_slice


def rest_start(state: dict) -> dict:
    """Where a reader's stream goes on after its unfinished block (or now, when none is open)."""
    return state["next"] if state["index"] > 0 else own_part(state)


def _started(at: dict) -> bool:
    """Whether the own-slice epoch at `at` has begun (an epoch not begun goes to the new layout)."""
    return not at["pending"] and (at["shard_pos"], at["record"], at["offset"]) != (0, 0, 0)


def common_epoch(states: list[dict]) -> int:
    """The first epoch no old reader has begun its own slice of: the new layout's slices start there."""
    return max(rest_start(s)["epoch"] + _started(rest_start(s)) for s in states)


def rest_pieces(state: dict, reader: int, num_readers: int, num_shards: int, seed: int, until: int) -> list[list]:
    """The pieces of old reader `reader`'s stream after its unfinished block, up to epoch `until`."""
    at = rest_start(state)
    pieces = [list(piece) for piece in at["pending"]]
    mine = reader_slice(num_shards, reader, num_readers)
    for epoch in range(at["epoch"], until):
        first_epoch = epoch == at["epoch"]
        order = shard_order(mine, seed, epoch)[at["shard_pos"] if first_epoch else 0:]
        for k, shard in enumerate(order):
            first = first_epoch and k == 0
            pieces.append([epoch, shard, at["record"] if first else 0, mine.record_modulus, mine.record_offset,
                           at["offset"] if first else 0])
    return pieces


def split_piece(piece: list, k: int) -> list[list]:
    """Piece -> k pieces by records (modulus m -> k x m); the one holding the start document keeps
    its first-token offset (the start record is that document's own index)."""
    label, shard, start, modulus, remainder, first_token = piece
    holder = ((start - remainder) // modulus) % k
    return [[label, shard, start, modulus * k, remainder + j * modulus, first_token if j == holder else 0]
            for j in range(k)]


def deal_pieces(pieces: list[list], n: int) -> list[list[list]]:
    """Pieces -> n lists, epoch by epoch (older first), round-robin; split by records where an
    epoch has fewer pieces than readers."""
    out: list[list[list]] = [[] for _ in range(n)]
    turn = 0
    for label in sorted({piece[0] for piece in pieces}):
        group = [piece for piece in pieces if piece[0] == label]
        if len(group) < n:
            k = -(-n // len(group))
            group = [sub for piece in group for sub in split_piece(piece, k)]
        for piece in group:
            out[turn % n].append(piece)
            turn += 1
    return out


def redeal(states: list[dict], num_readers: int, num_shards: int, seed: int) -> list[dict]:
    """Reader states of the old layout (reader g's at index g) -> `num_readers` states of the new one."""
    old = len(states)
    until = common_epoch(states)
    drains, pieces = [], []
    for g, state in enumerate(states):
        drains += state["drains"]
        if state["index"] > 0:
            drains.append({"reader": g, "num_readers": old, "state": own_part(state)})
        pieces += rest_pieces(state, g, old, num_shards, seed, until)
    dealt = deal_pieces(pieces, num_readers)
    return [{**initial_state(), "pending": dealt[j], "drains": drains[j::num_readers], "epoch": until}
            for j in range(num_readers)]
