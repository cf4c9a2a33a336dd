"""The T5 encoder-decoder (v1.0 and v1.1), the plain math, numerically equal to HF's T5.

    ids -> shared embedding -> dropout -> N x block -> final norm -> dropout -> hidden states
    block (pre-norm):  x = x + drop(attn(norm(x)))
                       x = x + drop(cross_attn(norm(x), encoder output))     decoder only
                       x = x + drop(ff(norm(x)))

- RMSNorm without bias or mean subtraction, variance in fp32 (HF's T5LayerNorm).
- No biases in any linear layer; attention scores are NOT scaled by 1/sqrt(d_kv) (T5 folds that
  scale into the initialisation of q).
- Relative position bias: one learned table (num_buckets x heads) per stack, read at the bucket of
  every (key - query) distance, shared by all layers; bidirectional buckets in the encoder, causal
  in the decoder. Computed once per stack forward and folded together with the padding / causal /
  packed-row mask (model/masks.py) into one additive bias (UMT5's table per layer:
  model/per_layer_bias.py). Another position scheme may rotate
  self-attention's q and k instead (RoPE, model/positions.py): the stack asks it once per forward
  (`Stack.rotation`) and hands the rotation to every block.
- Feed-forward: relu (v1.0) or a gated activation (v1.1: gelu, tanh approximation).
- Tied embeddings (v1.0) rescale the decoder output by d_model**-0.5 before the shared projection;
  untied (v1.1) have their own lm_head.

The model returns hidden states and the auxiliary losses its modules produced; the token loss lives
in model/loss.py. Components are chosen by name (model/components.py). The speed paths are twins
of these classes, swapped in after the model is built (model/fast/); this file is the reference.
Parameter names are t5forge's own (model/hf.py maps them to HF's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from t5forge.model.components import component
from t5forge.model.config import T5Config
from t5forge.model.masks import additive_bias, compute_dtype, keep_mask
from t5forge.model.outputs import Seq2SeqOutput, collect_aux_losses

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # HF's gelu_new, what gated-gelu means
    "silu": F.silu,
}


def build(kind: str, config: T5Config, *args) -> nn.Module:
    """The component `config.<kind>` names (e.g. config.feed_forward = "dense"), from its registry."""
    return component(kind, getattr(config, kind))(config, *args)


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), the mean in fp32 even for half inputs."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        y = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return self.weight * y


class Attention(nn.Module):
    """softmax(q k^T + bias) v over heads; self-attention, or cross-attention over `context`."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.n_heads, self.d_kv, self.dropout = config.num_heads, config.d_kv, config.dropout_rate
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def split_heads(self, x):  # (B, L, H*D) -> (B, H, L, D)
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.d_kv).transpose(1, 2)

    def project_kv(self, x, rotation=None):  # (B, K, C) -> k, v: (B, H, K, D); the generation cache calls this
        k, v = self.split_heads(self.k(x)), self.split_heads(self.v(x))
        return (k if rotation is None else rotation(k)), v

    def forward(self, x, bias, context=None, kv=None, rotation=None):
        # x: (B, Q, C); bias: (B or 1, H or 1, Q, K) additive, or None; kv: (k, v) from a cache, keys
        # already rotated; rotation: the position scheme's turn of q and k (RoPE), self-attention only
        B, Q, _ = x.shape
        q = self.split_heads(self.q(x))  # (B, H, Q, D)
        if rotation is not None:
            q = rotation(q)
        k, v = kv if kv is not None else self.project_kv(x if context is None else context, rotation)  # (B, H, K, D)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=1.0)  # (B, H, Q, D)
        return self.o(y.transpose(1, 2).reshape(B, Q, self.n_heads * self.d_kv))


class FeedForward(nn.Module):
    """"dense": wo(act(wi x)), or gated wo(act(wi_0 x) * wi_1 x) for feed_forward_proj "gated-*"."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.gated, self.activation = config.is_gated, config.activation
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)  # activated branch
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)  # linear branch
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = ACTIVATIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x):  # (B, L, C) -> (B, L, C)
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))  # (B, L, F)
        return self.wo(self.dropout(h))


class T5RelativeBias(nn.Module):
    """"t5_bias": a learned (num_buckets, H) table read at the bucket of each key - query distance."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        # randn as nn.Embedding's default (T5.init_weights redraws it): a seed gives the same model as before
        self.weight = nn.Parameter(torch.randn(config.relative_attention_num_buckets, config.num_heads))
        self.bidirectional = not is_decoder
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance

    def buckets(self, q_len: int, k_len: int, offset: int = 0):  # -> (Q, K) long
        """Mesh TensorFlow's bucketing of (key - query) distances: exact for small ones, log-spaced
        up to max_distance, everything beyond in the last bucket. Causal buckets see only the past."""
        q_pos = torch.arange(q_len, device=self.weight.device)[:, None] + offset
        relative = torch.arange(k_len, device=self.weight.device)[None, :] - q_pos
        n, buckets = self.num_buckets, 0
        if self.bidirectional:
            n //= 2
            buckets = (relative > 0).long() * n  # the future gets the upper half
            distance = relative.abs()
        else:
            distance = -relative.clamp(max=0)
        exact = n // 2
        # log(0) = -inf at distance 0 is discarded by the where below.
        log_bucket = exact + (torch.log(distance.float() / exact) / math.log(self.max_distance / exact)
                              * (n - exact)).long()
        return buckets + torch.where(distance < exact, distance, log_bucket.clamp(max=n - 1))

    def forward(self, q_len: int, k_len: int, offset: int = 0):  # -> (1, H, Q, K) fp32
        bias = F.embedding(self.buckets(q_len, k_len, offset), self.weight)  # (Q, K, H)
        return bias.permute(2, 0, 1).float().contiguous()[None]  # contiguous: every layer adds it


class PreNormBlock(nn.Module):
    """"pre_norm": self-attention, cross-attention (decoder only), feed-forward, each a residual."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.attn_norm, self.attn = RMSNorm(config.d_model, eps), Attention(config)
        if is_decoder:
            self.cross_norm, self.cross_attn = RMSNorm(config.d_model, eps), Attention(config)
        self.ff_norm, self.ff = RMSNorm(config.d_model, eps), build("feed_forward", config)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.is_decoder = is_decoder

    def forward(self, x, self_bias, enc=None, cross_bias=None, cache=None, rotation=None):
        # x: (B, L, C); enc: (B, S, C) encoder output; cache: a generation.LayerCache when decoding;
        # rotation: the stack's, for self-attention (cross-attention has no position)
        h = self.attn_norm(x)
        kv = cache.self_kv(self.attn, h, rotation) if cache is not None else None
        x = x + self.dropout(self.attn(h, self_bias, kv=kv, rotation=rotation))
        if self.is_decoder:
            kv = cache.cross_kv(self.cross_attn, enc) if cache is not None else None
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), cross_bias, context=enc, kv=kv))
        return x + self.dropout(self.ff(self.ff_norm(x)))


def layer_bias(self_bias, i: int):
    """Layer i's self-attention bias: the stack's one bias, or its i-th (a table per layer)."""
    return self_bias[i] if isinstance(self_bias, list) else self_bias


class Stack(nn.Module):
    """The encoder (bidirectional; encoder kind "stack") or the decoder (causal, cross-attending)."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        self.config, self.is_decoder = config, is_decoder
        self.position = build("position", config, is_decoder)
        n_layers = config.num_decoder_layers if is_decoder else config.num_layers
        # for_layer: a sparse feed-forward sits in every moe_every-th layer only (model/moe.py)
        self.blocks = nn.ModuleList([build("block", config.for_layer(i), is_decoder) for i in range(n_layers)])
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def attention_biases(self, x, mask, enc, enc_mask, offset, segments, enc_segments):
        """(self-attention bias, cross-attention bias or None): additive, (B or 1, H or 1, Q, K),
        built once for all layers (the self-attention's: a list of one per layer when the position
        scheme has one table per layer; `layer_bias`). Packed rows (segments) replace the padding masks."""
        L, dtype = x.shape[1], compute_dtype(x)
        keep = keep_mask(L, offset + L, x.device, mask, causal=self.is_decoder, query_offset=offset,
                         query_segments=segments, key_segments=segments)
        position = self.position(L, offset + L, offset)
        if isinstance(position, list):  # a table per layer (t5_bias_per_layer, UMT5): one bias per layer
            self_bias = [additive_bias(p, keep, dtype) for p in position]
        else:
            self_bias = additive_bias(position, keep, dtype)
        if not self.is_decoder:
            return self_bias, None
        keep = keep_mask(L, enc.shape[1], x.device, enc_mask, query_segments=segments, key_segments=enc_segments)
        return self_bias, additive_bias(None, keep, dtype)

    def rotation(self, length: int, offset: int = 0):
        """The position scheme's rotation of self-attention's q and k at positions [offset, offset +
        length) (RoPE, model/positions.py), or None for a scheme that only adds a bias."""
        rotation = getattr(self.position, "rotation", None)
        return rotation(length, offset) if rotation is not None else None

    def forward(self, x, mask=None, enc=None, enc_mask=None, cache=None, segments=None, enc_segments=None):
        # x: (B, L, C) embedded tokens; mask: (B, L) 1 = token; enc: (B, S, C) and enc_mask: (B, S),
        # decoder only; cache: generation.KVCache when decoding. Packed rows give segments (B, L) /
        # enc_segments (B, S), each token's example number (0 = padding), instead of masks.
        offset = cache.length if cache is not None else 0
        self_bias, cross_bias = self.attention_biases(x, mask, enc, enc_mask, offset, segments, enc_segments)
        rotation = self.rotation(x.shape[1], offset)
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            layer = cache.layers[i] if cache is not None else None
            x = block(x, layer_bias(self_bias, i), enc, cross_bias, cache=layer, rotation=rotation)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.dropout(self.final_norm(x))  # (B, L, C)


class T5(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = build("encoder", config, False)
        self.decoder = Stack(config, is_decoder=True)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """transformers' T5 `_init_weights` (Mesh TensorFlow's); a component's own `init_weights()`,
        where it has one, initialises it instead."""
        c = self.config
        nn.init.normal_(self.shared.weight, std=1.0)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=1.0)
        for module in self.modules():
            if module is not self and hasattr(module, "init_weights"):
                module.init_weights()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Attention):
                nn.init.normal_(module.q.weight, std=(c.d_model * c.d_kv) ** -0.5)  # the 1/sqrt(d_kv) lives here
                nn.init.normal_(module.k.weight, std=c.d_model**-0.5)
                nn.init.normal_(module.v.weight, std=c.d_model**-0.5)
                nn.init.normal_(module.o.weight, std=(c.num_heads * c.d_kv) ** -0.5)
            elif isinstance(module, FeedForward):
                for layer in (getattr(module, n) for n in ("wi", "wi_0", "wi_1") if hasattr(module, n)):
                    nn.init.normal_(layer.weight, std=c.d_model**-0.5)
                nn.init.normal_(module.wo.weight, std=c.d_ff**-0.5)
            elif isinstance(module, T5RelativeBias):
                nn.init.normal_(module.weight, std=c.d_model**-0.5)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.shared.weight.numel() + (self.lm_head.weight.numel() if self.lm_head is not None else 0)
        return n

    def encode(self, input_ids, attention_mask=None):  # (B, S) -> (B, S, C)
        return self.encoder(self.shared(input_ids), attention_mask)

    def decode(self, decoder_input_ids, enc, attention_mask=None, decoder_attention_mask=None, cache=None):
        """Decoder logits (B, T, V) for decoder inputs (B, T) given encoder states (B, S, C)."""
        return self.logits(self.decoder(self.shared(decoder_input_ids), decoder_attention_mask, enc, attention_mask,
                                        cache=cache))

    def output_projection(self, hidden):  # (B, T, C) -> (input, weight) of the output matmul
        if self.lm_head is None:  # tied: Mesh TensorFlow rescales before reusing the input embedding
            return hidden * self.config.d_model**-0.5, self.shared.weight
        return hidden, self.lm_head.weight

    def logits(self, hidden):  # (B, T, C) -> (B, T, V)
        return F.linear(*self.output_projection(hidden))

    def shift_right(self, labels, segments=None):  # (B, T) -> (B, T): start token, labels[:-1], -100 -> pad
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        if segments is not None:  # packed rows: every example's targets begin with the start token
            first = torch.ones_like(segments, dtype=torch.bool)
            first[:, 1:] = segments[:, 1:] != segments[:, :-1]
            shifted = shifted.masked_fill(first, self.config.decoder_start_token_id)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(
        self,
        input_ids,  # (B, S)
        attention_mask=None,  # (B, S), 1 = token, 0 = padding
        decoder_input_ids=None,  # (B, T); default: labels shifted right
        decoder_attention_mask=None,  # (B, T)
        labels=None,  # (B, T), -100 = ignored; used here only to make decoder_input_ids
        encoder_segment_ids=None,  # (B, S) packed rows: example number of each token, 0 = padding
        decoder_segment_ids=None,  # (B, T) the same numbers for the targets
    ) -> Seq2SeqOutput:
        """Decoder hidden states of a batch (the loss: model/loss.py). A padded batch has one example
        per row, its padding in the masks; a packed batch (data/packing.py) several, told apart by
        segment ids instead: attention stays within an example, each example's targets start with the
        start token, and the relative positions need nothing else (an example is contiguous)."""
        packed = encoder_segment_ids is not None or decoder_segment_ids is not None
        if packed and (encoder_segment_ids is None or decoder_segment_ids is None
                       or attention_mask is not None or decoder_attention_mask is not None):
            raise ValueError("a packed batch gives encoder_segment_ids and decoder_segment_ids, and no attention masks")
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5.forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels, decoder_segment_ids)
        enc = self.encoder(self.shared(input_ids), attention_mask, segments=encoder_segment_ids)  # (B, S, C)
        hidden = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask, enc, attention_mask,
                              segments=decoder_segment_ids, enc_segments=encoder_segment_ids)  # (B, T, C)
        return Seq2SeqOutput(hidden, enc, collect_aux_losses(self))

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 128, num_beams: int = 1):
        """Greedy (num_beams=1) or beam-search decoder ids (B, N), without the start token, padded with
        pad_token_id after EOS; transformers' generate(do_sample=False)."""
        from t5forge.model.generation import generate

        return generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, num_beams=num_beams)
