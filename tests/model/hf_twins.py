"""Tiny HF T5 / mT5 / UMT5 reference models and t5forge twins with the same weights (imported by the
model tests).

transformers is the reference (T5, MT5 or UMT5ForConditionalGeneration, as the config's model_type
says); every model is built from a config with random init (nothing is downloaded). transformers >= 5 always ties lm_head to the embedding at init, so an untied (v1.1)
reference gets its own random lm_head after construction.
"""

import pytest
import torch

from t5forge.model.config import T5Config
from t5forge.model.hf import hf_to_t5forge_state_dict
from t5forge.model.t5 import T5

# Small but not degenerate: 8 buckets with max_distance 20 exercise the log-spaced buckets.
BASE = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
            relative_attention_num_buckets=8, relative_attention_max_distance=20)
CONFIGS = {
    "v1_1-gated-gelu-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "v1_0-relu-tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "kv-heads-ne-d_model": dict(feed_forward_proj="gated-silu", tie_word_embeddings=True, d_kv=12, num_heads=3),
    "deeper-decoder": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3),
    "shallower-decoder": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_layers=3,
                              num_decoder_layers=2),
    # mT5: v1.1's math under MT5ForConditionalGeneration (its vocabulary's 250,112 rows: test_model_families.py)
    "mt5": dict(model_type="mt5", feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # UMT5: a relative-bias table in every layer; 3 encoder / 2 decoder layers tell the tables apart
    "umt5": dict(model_type="umt5", position="t5_bias_per_layer", feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False, num_layers=3, num_decoder_layers=2),
    "umt5-tied-relu": dict(model_type="umt5", position="t5_bias_per_layer", feed_forward_proj="relu",
                           tie_word_embeddings=True),
}
# transformers 5.23 sizes its generation cache by the encoder depth, so a deeper decoder fails with
# use_cache=True there; the reference then decodes without a cache.
HF_NEEDS_NO_CACHE = {"deeper-decoder"}


def t5forge_config(name, **extra) -> T5Config:
    return T5Config(**{**BASE, **CONFIGS[name], **extra})


# model_type -> (transformers config class, model class)
HF_CLASSES = {"t5": ("T5Config", "T5ForConditionalGeneration"), "mt5": ("MT5Config", "MT5ForConditionalGeneration"),
              "umt5": ("UMT5Config", "UMT5ForConditionalGeneration")}


def hf_classes(model_type: str):
    transformers = pytest.importorskip("transformers")
    return tuple(getattr(transformers, name) for name in HF_CLASSES[model_type])


def hf_reference(config: T5Config, seed: int = 0):
    """A random transformers T5/MT5/UMT5ForConditionalGeneration (eager attention) for `config`."""
    config_class, model_class = hf_classes(config.model_type)
    torch.manual_seed(seed)
    hf_config = config_class(**config.to_hf_dict())
    hf_config._attn_implementation = "eager"
    hf = model_class(hf_config)
    if not config.tie_word_embeddings:
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model))
    return hf.eval()


def twin(hf, config: T5Config, backend: str = "eager", converted: bool = False) -> T5:
    """t5forge's T5 with `hf`'s weights; converted: with the speed twins swapped in (model/fast/)."""
    model = T5(config.replace(attention_backend=backend))
    model.load_state_dict(hf_to_t5forge_state_dict(hf.state_dict(), config))
    if converted:
        from t5forge.model import fast

        fast.apply(model, None, device="cpu")
    return model.eval()


# The model variants every parity test runs: the plain model (the reference path) and the model with
# its speed twins swapped in (model/fast/), attention plain ("eager") or the twins' kernels ("sdpa").
VARIANTS = {"plain": ("sdpa", False), "fast-eager": ("eager", True), "fast-sdpa": ("sdpa", True)}


def variant_twin(hf, config: T5Config, variant: str) -> T5:
    backend, converted = VARIANTS[variant]
    return twin(hf, config, backend, converted=converted)


def padded_batch(vocab_size: int, seed: int = 1):
    """Right-padded inputs of different lengths and labels with -100 tails, as a collator makes them."""
    g = torch.Generator().manual_seed(seed)
    B, S, T = 4, 27, 19
    input_ids = torch.randint(2, vocab_size, (B, S), generator=g)
    attention_mask = torch.ones(B, S, dtype=torch.long)
    for row, length in enumerate([27, 20, 5, 13]):
        attention_mask[row, length:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = torch.randint(2, vocab_size, (B, T), generator=g)
    for row, length in enumerate([19, 12, 3, 16]):
        labels[row, length:] = -100
    return input_ids, attention_mask, labels


def generation_batch(vocab_size: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    B, S = 6, 15
    input_ids = torch.randint(2, vocab_size, (B, S), generator=g)
    attention_mask = torch.ones(B, S, dtype=torch.long)
    for row, length in enumerate([15, 9, 4, 12, 7, 15]):
        attention_mask[row, length:] = 0
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def make_eos_likely(hf, config: T5Config, input_ids, attention_mask, use_cache=True):
    """Random tiny models rarely say EOS. Give EOS the output row of the token greedy decoding picks
    most (slightly scaled up), so some sequences end early and others run to the length limit."""
    first = hf.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=10,
                        use_cache=use_cache)[:, 1:]
    counts = torch.bincount(first.flatten(), minlength=3)
    counts[:2] = 0  # not pad, not EOS itself
    favourite = int(counts.argmax())
    out = hf.shared.weight if config.tie_word_embeddings else hf.lm_head.weight
    with torch.no_grad():
        out[config.eos_token_id] = out[favourite] * 1.01


def pad_after_eos(hf_sequences, eos_id: int = 1, pad_id: int = 0):
    """HF output minus its start token, with everything after the first EOS set to pad (HF's beam
    search fills with EOS there; t5forge's contract is pad)."""
    seq = hf_sequences[:, 1:].clone()
    after = (seq == eos_id).long().cumsum(1) - (seq == eos_id).long() > 0
    return seq.masked_fill(after, pad_id)
