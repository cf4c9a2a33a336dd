"""Greedy and beam-search decoding for `T5`, with an incremental key/value cache.

The encoder runs once; each decoder step feeds only the newest token: self-attention keys/values
are appended to a preallocated cache, cross-attention keys/values are projected once from the
encoder output. Results are token-for-token those of transformers' `generate(do_sample=False,
num_beams=k, max_new_tokens=n)` with default settings: greedy pads finished rows; beam search is
HF's vectorised algorithm (keep 2k candidates per step, length_penalty=1.0 divides the summed
log-probability by the generated length, early_stopping=False stops a batch item once its best
running beam cannot beat its worst finished one at the current length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_NEG = -1.0e9  # HF's "impossible" score; kept identical so ties and orderings agree


class LayerCache:
    """Keys/values of one decoder layer: self-attention grows per step, cross-attention is fixed.

    A component whose self-attention needs more than its keys/values from earlier steps keeps it in
    `state` (name -> tensor with the batch first, e.g. Primer's convolution inputs, model/primer.py)
    and stores the keys/values it computed itself with `append_self_kv`; `KVCache.reorder` reorders
    `state` with the keys/values, so beam search carries it too."""

    def __init__(self, parent: "KVCache"):
        self.parent = parent
        self.k = self.v = None  # (B, H, max_len, D), allocated on first use (dtype of the projections)
        self.cross = None  # (k, v): (B, H, S, D)
        self.state: dict[str, torch.Tensor] = {}  # a component's own per-row state, batch first

    def self_kv(self, attn, h, rotation=None):  # h: (B, L, C) normed inputs of the new positions
        # rotation (RoPE) of the new positions: the keys are stored turned to their absolute positions
        return self.append_self_kv(*attn.project_kv(h, rotation))

    def append_self_kv(self, k, v):  # k, v: (B, H, L, D) of the new positions -> all so far (B, H, end, D)
        if self.k is None:
            B, H, _, D = k.shape
            self.k = k.new_zeros(B, H, self.parent.max_len, D)
            self.v = v.new_zeros(B, H, self.parent.max_len, D)
        start, end = self.parent.length, self.parent.length + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def cross_kv(self, attn, enc):  # enc: (B, S, C)
        if self.cross is None:
            self.cross = attn.project_kv(enc)
        return self.cross


class KVCache:
    def __init__(self, num_layers: int, max_len: int):
        self.max_len, self.length = max_len, 0
        self.layers = [LayerCache(self) for _ in range(num_layers)]

    def advance(self, n: int):
        self.length += n

    def reorder(self, index):  # (B,) rows to keep, e.g. the parent beam of every new beam
        for layer in self.layers:
            if layer.k is not None:
                layer.k, layer.v = layer.k.index_select(0, index), layer.v.index_select(0, index)
            layer.state = {name: t.index_select(0, index) for name, t in layer.state.items()}
            # Cross-attention k/v need no reordering: beams of one example share the same encoder output.


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 128, num_beams: int = 1):
    """Decoder ids (B, N) without the start token; rows that end early are padded with pad_token_id.

    As transformers does, a missing attention_mask is inferred from the pad tokens in input_ids.
    The model is put in eval mode for the call (no dropout) and restored afterwards.
    """
    if num_beams < 1 or max_new_tokens < 0:
        raise ValueError(f"need num_beams >= 1 and max_new_tokens >= 0, got {num_beams}, {max_new_tokens}")
    cfg = model.config
    if attention_mask is None:
        attention_mask = (input_ids != cfg.pad_token_id).long()
    if max_new_tokens == 0:
        return input_ids.new_zeros(input_ids.size(0), 0)
    was_training = model.training
    model.eval()
    try:
        enc = model.encode(input_ids, attention_mask)  # (B, S, C)
        if num_beams == 1:
            return _greedy(model, enc, attention_mask, max_new_tokens)
        return _beam_search(model, enc, attention_mask, max_new_tokens, num_beams)
    finally:
        model.train(was_training)


def _greedy(model, enc, enc_mask, max_new_tokens):
    cfg = model.config
    B = enc.size(0)
    cache = KVCache(cfg.num_decoder_layers, max_new_tokens)
    token = torch.full((B, 1), cfg.decoder_start_token_id, dtype=torch.long, device=enc.device)
    finished = torch.zeros(B, dtype=torch.bool, device=enc.device)
    out = []
    for _ in range(max_new_tokens):
        logits = model.decode(token, enc, enc_mask, cache=cache)[:, -1].float()  # (B, V)
        next_token = logits.argmax(-1).masked_fill(finished, cfg.pad_token_id)  # (B,)
        out.append(next_token)
        finished |= next_token == cfg.eos_token_id
        if finished.all():
            break
        token = next_token[:, None]
    return torch.stack(out, dim=1)


def _gather(t, index):  # t: (B, M, ...), index: (B, K) -> (B, K, ...)
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


def _beam_search(model, enc, enc_mask, max_new_tokens, num_beams, length_penalty: float = 1.0):
    cfg = model.config
    B, K, N, device = enc.size(0), num_beams, max_new_tokens, enc.device
    n_cand = 2 * K  # candidates kept per step: enough that K can go on even if K of them just ended
    enc = enc.repeat_interleave(K, dim=0)  # (B*K, S, C): beams of one example are adjacent
    enc_mask = enc_mask.repeat_interleave(K, dim=0)
    cache = KVCache(cfg.num_decoder_layers, N)

    # Running beams. Only beam 0 starts alive, so the first step does not pick the same token K times.
    run_tokens = torch.full((B, K, N), cfg.pad_token_id, dtype=torch.long, device=device)
    run_scores = torch.zeros(B, K, device=device)  # summed log-probs
    run_scores[:, 1:] = _NEG
    # Finished hypotheses: the best K so far, scored by summed log-prob / length ** length_penalty.
    fin_tokens = run_tokens.clone()
    fin_scores = torch.full((B, K), _NEG, device=device)
    fin_lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)  # slot holds a real hypothesis
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)  # can running beams still win?
    top_k_mask = torch.arange(n_cand, device=device) < K  # only the top K candidates may finish
    batch_offset = torch.arange(B, device=device)[:, None] * K

    token = torch.full((B * K, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
    for t in range(N):
        logits = model.decode(token, enc, enc_mask, cache=cache)[:, -1].float()  # (B*K, V)
        V = logits.size(-1)
        log_probs = F.log_softmax(logits, dim=-1).view(B, K, V) + run_scores[:, :, None]
        cand_scores, cand_index = torch.topk(log_probs.view(B, K * V), n_cand)  # (B, 2K)
        cand_beam, cand_token = cand_index // V, cand_index % V
        cand_tokens = _gather(run_tokens, cand_beam)  # (B, 2K, N)
        cand_tokens[:, :, t] = cand_token
        ends = (cand_token == cfg.eos_token_id) | (t + 1 == N)  # (B, 2K) EOS or length limit

        # The K best candidates that did not end keep running.
        alive_scores = cand_scores + ends.float() * _NEG
        keep = torch.topk(alive_scores, K)[1]  # (B, K)
        run_tokens, run_scores = _gather(cand_tokens, keep), _gather(alive_scores, keep)
        parent = _gather(cand_beam, keep)

        # Candidates among the top K that ended join the finished pool if they beat its worst.
        just_finished = ends & top_k_mask
        new_scores = cand_scores / ((t + 1) ** length_penalty)
        new_scores = new_scores + (~improvable).float() * _NEG + (~just_finished).float() * _NEG
        merged = torch.topk(torch.cat([fin_scores, new_scores], dim=1), K)[1]
        fin_tokens = _gather(torch.cat([fin_tokens, cand_tokens], dim=1), merged)
        fin_scores = _gather(torch.cat([fin_scores, new_scores], dim=1), merged)
        fin_lengths = _gather(torch.cat([fin_lengths, torch.full_like(cand_beam, t + 1)], dim=1), merged)
        is_finished = _gather(torch.cat([is_finished, just_finished], dim=1), merged)

        # early_stopping=False: a batch item is done once its best running beam, scored at the
        # current length, cannot beat its worst finished hypothesis (with all K slots filled).
        best_running = run_scores[:, :1] / ((t + 1) ** length_penalty)
        worst_finished = torch.where(is_finished, fin_scores.min(dim=1, keepdim=True)[0], _NEG)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        if not improvable.any() or ends.all():
            break
        cache.reorder((parent + batch_offset).view(-1))
        token = run_tokens[:, :, t].reshape(B * K, 1)

    best_tokens, best_length = fin_tokens[:, 0], fin_lengths[:, 0]  # (B, N), (B,)
    return best_tokens[:, : int(best_length.max())]
