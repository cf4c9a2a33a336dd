"""Greedy decoding without the key/value cache: the reference the component tests hold cached
generation (model/generation.py) equal to, token for token."""

import torch
from fast_cases import padded_batch


def greedy_by_recompute(model, ids, mask, steps):
    """Greedy decoding with no cache: the whole prefix through the decoder at every step; rows that
    ended are padded, and decoding stops once every row has ended (as model.generate does)."""
    cfg = model.config
    with torch.no_grad():
        enc = model.encode(ids, mask)
        dec = torch.full((ids.size(0), 1), cfg.decoder_start_token_id)
        finished = torch.zeros(ids.size(0), dtype=torch.bool)
        out = []
        for _ in range(steps):
            nxt = model.decode(dec, enc, mask)[:, -1].argmax(-1).masked_fill(finished, cfg.pad_token_id)
            out.append(nxt)
            finished |= nxt == cfg.eos_token_id
            if finished.all():
                break
            dec = torch.cat([dec, nxt[:, None]], 1)
    return torch.stack(out, 1)


def cached_and_recomputed(model, steps=8):
    """(model.generate's greedy tokens, greedy_by_recompute's, ids, mask) on fast_cases' padded batch:
    what a component's cached-generation test holds equal."""
    batch = padded_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return model.generate(ids, mask, max_new_tokens=steps), greedy_by_recompute(model, ids, mask, steps), ids, mask
