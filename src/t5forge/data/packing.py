"""Padding-free fine-tuning batches: the examples of a micro-batch laid end to end in a few rows.

A padded batch is as wide as its longest example: with SNI's Tk-Instruct prompts (a few hundred
to 1,024 tokens) and short answers most of its cells are padding, and every one of them costs the
same matmul work as a real token. Packing puts several examples in one row, up to a capacity of
`source_capacity` encoder tokens and `target_capacity` target tokens, and numbers them with segment
ids (1, 2, ... within a row; 0 = padding at the row's end). The model keeps attention inside each
example (model/t5.py, `encoder_segment_ids` / `decoder_segment_ids`), so the summed loss equals the
padded batch's; only the layout changes, never which examples or tokens are trained on.

Rows are filled first-fit in order of decreasing source length (ties by position): deterministic,
and close to the optimum for bin packing. The loader's default capacity is the micro-batch's
longest example, so a packed row is never wider than the padded batch: with a dense block-diagonal
mask (eager, sdpa on GPU), whose cost per row grows with width^2, longer rows can cost more than
they save. Where attention skips the pairs between examples, longer rows pay off: sdpa on CPU
attends example by example (model/fast/spans.py), so `t5forge finetune` then packs each micro-batch
into one row (train/finetune.py, pack_capacity); FlexAttention skips the masked blocks, so
finetune.pack_source_len can ask for wide rows there.
"""

from __future__ import annotations

from typing import Sequence


def assign_rows(lengths: Sequence[tuple[int, int]], source_capacity: int, target_capacity: int) -> list[list[int]]:
    """Example indices of each row, in row order and, within a row, in placement order."""
    for i, (s, t) in enumerate(lengths):
        if s > source_capacity or t > target_capacity:
            raise ValueError(
                f"example {i} ({s} source, {t} target tokens) exceeds the row capacity "
                f"({source_capacity} source, {target_capacity} target tokens)"
            )
    rows: list[list[int]] = []
    used: list[list[int]] = []  # [source, target] tokens taken in each row
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i][0], i)):
        s, t = lengths[i]
        k = next((k for k, (s_used, t_used) in enumerate(used)
                  if s_used + s <= source_capacity and t_used + t <= target_capacity), None)
        if k is None:
            k = len(rows)
            rows.append([])
            used.append([0, 0])
        rows[k].append(i)
        used[k][0] += s
        used[k][1] += t
    return rows


def pack_seq2seq(source_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]], *, source_capacity: int,
                 target_capacity: int, pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """dict(input_ids, encoder_segment_ids, labels, decoder_segment_ids) of packed rows, as LongTensors.

    The tensors are as wide as the fullest row (rounded up to `pad_to_multiple_of`), not the capacity.
    """
    import torch

    if len(source_ids) != len(target_ids) or not source_ids:
        raise ValueError("pack_seq2seq needs one target per source and at least one example")
    rows = assign_rows([(len(s), len(t)) for s, t in zip(source_ids, target_ids)], source_capacity, target_capacity)
    width_s = max(sum(len(source_ids[i]) for i in row) for row in rows)
    width_t = max(sum(len(target_ids[i]) for i in row) for row in rows)
    if pad_to_multiple_of:
        width_s = -(-width_s // pad_to_multiple_of) * pad_to_multiple_of
        width_t = -(-width_t // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width_s), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width_t), -100, dtype=torch.long)
    encoder_segment_ids = torch.zeros((len(rows), width_s), dtype=torch.long)
    decoder_segment_ids = torch.zeros((len(rows), width_t), dtype=torch.long)
    for r, row in enumerate(rows):
        s_at = t_at = 0
        for segment, i in enumerate(row, start=1):
            src, tgt = source_ids[i], target_ids[i]
            input_ids[r, s_at:s_at + len(src)] = torch.tensor(src, dtype=torch.long)
            encoder_segment_ids[r, s_at:s_at + len(src)] = segment
            labels[r, t_at:t_at + len(tgt)] = torch.tensor(tgt, dtype=torch.long)
            decoder_segment_ids[r, t_at:t_at + len(tgt)] = segment
            s_at, t_at = s_at + len(src), t_at + len(tgt)
    return {"input_ids": input_ids, "encoder_segment_ids": encoder_segment_ids, "labels": labels,
            "decoder_segment_ids": decoder_segment_ids}
