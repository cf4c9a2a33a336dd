"""The whole T5 encoder-decoder in one file (T5 v1.0 and v1.1 variants), numerically equal to HF's.

    ids -> shared embedding -> dropout -> N x [x + attn(norm(x)), (x + cross_attn(norm(x), enc)), x + ff(norm(x))]
        -> final norm -> dropout

- RMSNorm without bias or mean subtraction, variance accumulated in fp32 (as HF's T5LayerNorm).
- No biases in any linear layer; attention scores are not scaled by 1/sqrt(d_kv) (T5 folds the
  scale into the initialisation of q).
- Relative position bias: one learned table (num_buckets x heads) per stack, applied in every
  layer; bidirectional buckets in the encoder, causal in the decoder. It is computed ONCE per stack
  forward and folded together with the padding / causal mask (see model/attention.py).
- Feed-forward: relu (T5 v1.0) or gated activation (v1.1: gelu with the tanh approximation).
- Tied embeddings (v1.0) rescale the decoder output by d_model**-0.5 before the shared projection;
  untied (v1.1) use a separate lm_head.
- d_kv * num_heads need not equal d_model, and the decoder may be deeper or shallower than the encoder.

Parameter names are t5forge's own (see model/hf.py for the mapping to HF's names).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from t5forge.model import fused
from t5forge.model.attention import (
    attend, cheaper_as_spans, compute_dtype, make_attention_bias, segment_spans, use_spans,
)
from t5forge.model.config import T5Config
from t5forge.model.cross_entropy import linear_cross_entropy


class Seq2SeqOutput:
    """loss: scalar, mean or summed token cross-entropy over labels != -100 (or None);
    logits: (B, T, V); encoder_hidden_states: (B, S, C).

    When training (labels given, grad enabled) the loss comes from the chunked lm_head +
    cross-entropy (model/cross_entropy.py), which never holds the logits; `logits` is then computed
    the first time it is read."""

    def __init__(self, loss, logits=None, encoder_hidden_states=None, logits_fn=None):
        self.loss, self.encoder_hidden_states = loss, encoder_hidden_states
        self._logits, self._logits_fn = logits, logits_fn

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None and self._logits_fn is not None:
            self._logits, self._logits_fn = self._logits_fn(), None
        return self._logits


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), the mean in fp32 even for half inputs (HF's T5LayerNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.compiled = False  # T5.compile_elementwise: the torch.compile'd stretch (model/fused.py)

    def forward(self, x):
        if fused.use_compiled(x, self.compiled):
            return fused.compiled_rms_norm(x, self.weight, self.eps)
        return _RMSNormFunction.apply(x, self.weight, self.eps)

    def add_forward(self, x, delta):  # -> (x + delta, norm(x + delta)); delta None: (x, norm(x))
        if delta is None:
            return x, self(x)
        if fused.use_compiled(x, self.compiled):  # the residual add and the norm in one loop
            return fused.compiled_add_rms_norm(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its backward written out. The autograd graph of the formula reads and writes
    activation-sized tensors ~16 times per norm, this ~10 times: 1.5-2x faster per norm on CPU
    (F.rms_norm is no faster there in torch 2.13). dx = rstd * (g - xhat * mean(g * xhat)) with
    g = dy * weight, xhat = x * rstd; dweight = sum over rows of dy * xhat."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        sum_sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square_()
        rstd = sum_sq.div_(x.shape[-1]).add_(eps).rsqrt_()  # (..., 1) fp32
        y = x * rstd
        if weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(weight.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y.mul_(weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xhat = x * rstd  # fp32
        dweight = (dy * xhat).sum(dim=tuple(range(dy.dim() - 1)))
        g = (dy * weight).float()
        mean_gx = torch.linalg.vecdot(g, xhat).unsqueeze(-1).div_(x.shape[-1])
        dx = g.sub_(xhat.mul_(mean_gx)).mul_(rstd)
        return dx.to(x.dtype), dweight.to(weight.dtype), None


def fused_linear(x, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """The outputs of several bias-free Linears that read the same input. Under autocast, from one
    matmul over their stacked weights: the input is cast once instead of once per layer (a cast
    and its backward are a full pass over an activation each), and its gradient is summed inside
    the matmul instead of from separately rounded bf16 parts; 6% faster training steps at
    t5-v1.1-small in bf16 on CPU. Without autocast there is no cast to save, and the strided
    outputs and the gradients' concatenation made the fp32 step 3% slower: separate matmuls then.
    The parameters stay separate either way, as in the HF checkpoint."""
    if not torch.is_autocast_enabled(x.device.type):
        return tuple(layer(x) for layer in layers)
    weight = torch.cat([layer.weight for layer in layers])
    return F.linear(x, weight).split([layer.out_features for layer in layers], dim=-1)


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, else cross-attention over it."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.n_heads, self.d_kv = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.dropout = config.dropout_rate

    def split_heads(self, x):  # (B, L, H*D) -> (B, H, L, D)
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.d_kv).transpose(1, 2)

    def project_kv(self, x):  # (B, K, C) -> k, v: (B, H, K, D); the generation cache calls this
        k, v = fused_linear(x, self.k, self.v)
        return self.split_heads(k), self.split_heads(v)

    def forward(self, x, bias, context=None, kv=None):
        # x: (B, Q, C); bias: from make_attention_bias; kv: precomputed (k, v) from a cache
        B, Q, _ = x.shape
        if context is None and kv is None:  # self-attention: q, k and v from one matmul
            q, k, v = (self.split_heads(t) for t in fused_linear(x, self.q, self.k, self.v))
        else:
            q = self.split_heads(self.q(x))  # (B, H, Q, D)
            k, v = kv if kv is not None else self.project_kv(context)
        y = attend(q, k, v, bias, self.dropout if self.training else 0.0)  # (B, H, Q, D)
        return self.o(y.transpose(1, 2).reshape(B, Q, self.n_heads * self.d_kv))


class FeedForward(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.gated = config.is_gated
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)  # activated branch
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)  # linear branch
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.activation = config.activation
        self.act = fused.ACTIVATIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout_rate)
        self.compiled = False  # T5.compile_elementwise: the gating as one compiled loop (model/fused.py)

    def forward(self, x):  # (B, L, C) -> (B, L, C)
        if self.gated:
            gate, linear = fused_linear(x, self.wi_0, self.wi_1)
            if fused.use_compiled(gate, self.compiled):
                h = fused.compiled_gated(gate, linear, self.activation)
            else:
                h = self.act(gate) * linear  # (B, L, F)
        else:
            h = self.act(self.wi(x))
        return self.wo(self.dropout(h))


class Block(nn.Module):
    """Pre-norm block: self-attention, cross-attention (decoder only), feed-forward; each residual.

    A block takes and returns the residual stream as (x, delta): x plus the update its last sublayer
    made, not yet added. The add then happens inside the next norm, which reads the sum anyway
    (RMSNorm.add_forward), so that compiled it is one pass instead of two."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.attn_norm = RMSNorm(config.d_model, eps)
        self.attn = Attention(config)
        if is_decoder:
            self.cross_norm = RMSNorm(config.d_model, eps)
            self.cross_attn = Attention(config)
        self.ff_norm = RMSNorm(config.d_model, eps)
        self.ff = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.is_decoder = is_decoder

    def forward(self, x, delta, self_bias, enc=None, cross_bias=None, cache=None):
        # x, delta: the residual stream and its pending update (None: nothing pending);
        # cache: a generation.LayerCache (decoding step by step) or None (whole sequences)
        x, h = self.attn_norm.add_forward(x, delta)
        kv = cache.self_kv(self.attn, h) if cache is not None else None
        delta = self.dropout(self.attn(h, self_bias, kv=kv))
        if self.is_decoder:
            x, h = self.cross_norm.add_forward(x, delta)
            kv = cache.cross_kv(self.cross_attn, enc) if cache is not None else None
            delta = self.dropout(self.cross_attn(h, cross_bias, context=enc, kv=kv))
        x, h = self.ff_norm.add_forward(x, delta)
        return x, self.dropout(self.ff(h))


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """Mesh TensorFlow's bucketing of (key - query) distances: exact for small ones, log-spaced up
    to max_distance, everything beyond in the last bucket. Causal buckets only see the past."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).long() * num_buckets  # the future gets the upper half
        distance = relative_position.abs()
    else:
        distance = -relative_position.clamp(max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log(0) is -inf for distance 0; that value is discarded by the where below.
    log_bucket = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, log_bucket)


class Stack(nn.Module):
    """The encoder (bidirectional) or decoder (causal, with cross-attention) stack."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        self.config, self.is_decoder = config, is_decoder
        self.relative_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        n_layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.blocks = nn.ModuleList([Block(config, is_decoder) for _ in range(n_layers)])
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def buckets(self, q_len: int, k_len: int, offset: int = 0):  # -> (Q, K) bucket of every pair
        device = self.relative_bias.weight.device
        q_pos = torch.arange(q_len, device=device)[:, None] + offset
        k_pos = torch.arange(k_len, device=device)[None, :]
        return relative_position_bucket(
            k_pos - q_pos,
            bidirectional=not self.is_decoder,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )

    def position_bias(self, q_len: int, k_len: int, offset: int = 0):  # -> (1, H, Q, K), dense
        return self.relative_bias(self.buckets(q_len, k_len, offset)).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x, mask=None, enc=None, enc_mask=None, cache=None, segments=None, enc_segments=None):
        # x: (B, L, C) embedded tokens; mask: (B, L) padding mask of x; enc: (B, S, C) encoder
        # output and enc_mask: (B, S), decoder only; cache: generation.KVCache when decoding.
        # Packed rows instead of masks: segments (B, L) / enc_segments (B, S), example numbers, 0 = padding.
        _B, L, _ = x.shape
        backend, dtype = self.config.attention_backend, compute_dtype(x)
        offset = cache.length if cache is not None else 0
        if backend == "flex" and cache is not None:
            backend = "sdpa"  # one query per step: a block mask per step would cost more than it saves
        # One bias for all layers: relative positions + padding (+ causal) mask, computed once.
        # Packed rows on CPU: example by example (spans) where that costs less than a dense mask.
        by_example = segments is not None and use_spans(backend, x.device)
        spans = cheaper_as_spans(segment_spans(segments, segments), *segments.shape, L) if by_example else None
        if spans is not None:  # a bias as large as the longest example only
            n = max((q1 - q0 for _, q0, q1, _, _ in spans), default=1)
            self_bias = make_attention_bias(backend, n, n, self.relative_bias.weight, self.buckets(n, n),
                                            causal=self.is_decoder and n > 1, dtype=dtype, spans=spans)
        else:
            self_bias = make_attention_bias(
                backend, L, offset + L, self.relative_bias.weight, self.buckets(L, offset + L, offset), mask,
                causal=self.is_decoder and L > 1, query_offset=offset, dtype=dtype,
                query_segments=segments, key_segments=segments,
            )
        cross_bias = None
        if self.is_decoder:
            S = enc.shape[1]
            spans = cheaper_as_spans(segment_spans(segments, enc_segments), *segments.shape, S) if by_example else None
            if spans is not None:
                cross_bias = make_attention_bias(backend, L, S, dtype=dtype, spans=spans)
            else:
                cross_bias = make_attention_bias(backend, L, S, key_padding_mask=enc_mask, dtype=dtype,
                                                 query_segments=segments, key_segments=enc_segments)
        x, delta = self.dropout(x), None
        for i, block in enumerate(self.blocks):
            x, delta = block(x, delta, self_bias, enc, cross_bias, cache=cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.advance(L)
        return self.dropout(self.final_norm.add_forward(x, delta)[1])


class T5(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, is_decoder=False)
        self.decoder = Stack(config, is_decoder=True)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Same distributions as transformers' T5 `_init_weights` (Mesh TensorFlow's init)."""
        c = self.config
        nn.init.normal_(self.shared.weight, std=1.0)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=1.0)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Attention):
                nn.init.normal_(module.q.weight, std=(c.d_model * c.d_kv) ** -0.5)  # the 1/sqrt(d_kv) lives here
                nn.init.normal_(module.k.weight, std=c.d_model**-0.5)
                nn.init.normal_(module.v.weight, std=c.d_model**-0.5)
                nn.init.normal_(module.o.weight, std=(c.num_heads * c.d_kv) ** -0.5)
            elif isinstance(module, FeedForward):
                for name in ("wi", "wi_0", "wi_1"):
                    if hasattr(module, name):
                        nn.init.normal_(getattr(module, name).weight, std=c.d_model**-0.5)
                nn.init.normal_(module.wo.weight, std=c.d_ff**-0.5)
            elif isinstance(module, Stack):
                nn.init.normal_(module.relative_bias.weight, std=c.d_model**-0.5)

    def compile_elementwise(self, enabled: bool = True) -> T5:
        """Run the residual adds, norms and gated activations as torch.compile'd loops while training
        on CPU (model/fused.py); off by default. A runtime switch, not part of the architecture."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, FeedForward)):
                module.compiled = enabled
        return self

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.shared.weight.numel() + (self.lm_head.weight.numel() if self.lm_head is not None else 0)
        return n

    # ------------------------------------------------------------------ building blocks
    def encode(self, input_ids, attention_mask=None):  # (B, S) -> (B, S, C)
        return self.encoder(self.shared(input_ids), attention_mask)

    def decode(self, decoder_input_ids, enc, attention_mask=None, decoder_attention_mask=None, cache=None):
        """Decoder logits (B, T, V) for decoder inputs (B, T) given encoder states (B, S, C)."""
        x = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask, enc, attention_mask, cache=cache)
        return F.linear(*self.output_projection(x))

    def _embed_pair(self, input_ids, decoder_input_ids):  # (B, S), (B, T) -> (B, S, C), (B, T, C)
        # One lookup for both stacks: its backward then builds one dense (V, C) gradient of the
        # shared embedding instead of two that are then added (each 64 MB at t5-v1.1-small).
        ids = torch.cat([input_ids.reshape(-1), decoder_input_ids.reshape(-1)])
        src, tgt = self.shared(ids).split([input_ids.numel(), decoder_input_ids.numel()])
        return src.view(*input_ids.shape, -1), tgt.view(*decoder_input_ids.shape, -1)

    def output_projection(self, x):  # decoder states (B, T, C) -> (input, weight) of the output matmul
        if self.lm_head is None:
            # Tied embeddings: Mesh TensorFlow rescales before reusing the input embedding as output.
            return x * self.config.d_model**-0.5, self.shared.weight
        return x, self.lm_head.weight

    def shift_right(self, labels, segments=None):  # (B, T) -> (B, T): start token, labels[:-1], -100 -> pad
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        if segments is not None:  # packed rows: every example's targets begin with the start token
            first = torch.ones_like(segments, dtype=torch.bool)
            first[:, 1:] = segments[:, 1:] != segments[:, :-1]
            shifted = shifted.masked_fill(first, self.config.decoder_start_token_id)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    # ------------------------------------------------------------------ training / scoring
    def forward(
        self,
        input_ids,  # (B, S)
        attention_mask=None,  # (B, S), 1 = token, 0 = padding
        decoder_input_ids=None,  # (B, T); default: labels shifted right
        decoder_attention_mask=None,  # (B, T)
        labels=None,  # (B, T), -100 = ignored
        loss_reduction: str = "mean",
        encoder_segment_ids=None,  # (B, S) packed rows: example number of each token, 0 = padding
        decoder_segment_ids=None,  # (B, T) the same numbers for the targets
    ) -> Seq2SeqOutput:
        """Loss (and logits) of a batch. A padded batch has one example per row, its padding in the
        masks. A packed batch (data/packing.py) has several examples per row, told apart by segment
        ids instead of masks: attention stays within an example (encoder and decoder self-attention,
        and cross-attention to the example's own source), and each example's targets start with the
        start token. The relative position buckets need nothing else: an example's tokens are
        contiguous, so the distance between two of its tokens is the same in the row as on its own."""
        packed = encoder_segment_ids is not None or decoder_segment_ids is not None
        if packed and (encoder_segment_ids is None or decoder_segment_ids is None
                       or attention_mask is not None or decoder_attention_mask is not None):
            raise ValueError("a packed batch gives encoder_segment_ids and decoder_segment_ids, and no attention masks")
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5.forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels, decoder_segment_ids)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        src, tgt = self._embed_pair(input_ids, decoder_input_ids)
        enc = self.encoder(src, attention_mask, segments=encoder_segment_ids)
        x = self.decoder(tgt, decoder_attention_mask, enc, attention_mask,
                         segments=decoder_segment_ids, enc_segments=encoder_segment_ids)
        h, weight = self.output_projection(x)  # (B, T, C), (V, C)
        if labels is not None and torch.is_grad_enabled():
            # Training: lm_head + cross-entropy chunk by chunk, never holding the (B, T, V) logits.
            loss = linear_cross_entropy(h, weight, labels, loss_reduction, compute_dtype=compute_dtype(h))
            return Seq2SeqOutput(loss, encoder_hidden_states=enc, logits_fn=lambda: F.linear(h, weight))
        logits = F.linear(h, weight)
        loss = None
        if labels is not None:
            # fp32 cross-entropy even when the logits are bf16 (autocast would upcast it anyway).
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), labels.reshape(-1),
                ignore_index=-100, reduction=loss_reduction,
            )
        return Seq2SeqOutput(loss, logits=logits, encoder_hidden_states=enc)

    # ------------------------------------------------------------------ inference
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 128, num_beams: int = 1):
        """Greedy (num_beams=1) or beam search decoder ids (B, N), without the start token, padded
        with pad_token_id after EOS. Matches transformers' generate(do_sample=False)."""
        from t5forge.model.generation import generate

        return generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, num_beams=num_beams)
