"""NormFormer, the block component "normformer" (model/normformer.py): the block against its formula
written out by hand, its initialisation, the feed-forwards it refuses, gradients, cached generation
against a full recompute, the speed converter leaving it plain with equal results, the export
refusal, and a `t5forge pretrain` run with model.block=normformer that loads back."""

import copy
import json
import logging

import pytest
import torch
from fast_cases import TOL, assert_converted_equals_plain, padded_batch, summed_nll, tiny_config
from recompute import cached_and_recomputed

from t5forge.cli import main
from t5forge.errors import T5ForgeError
from t5forge.model import components, fast
from t5forge.model.config import T5Config
from t5forge.model.feed_forwards import squared_relu
from t5forge.model.generation import KVCache
from t5forge.model.hf import export_hf
from t5forge.model.load import load_model
from t5forge.model.loss import TokenNLL
from t5forge.model.normformer import NormFormerAttention, NormFormerBlock, NormFormerFeedForward
from t5forge.model.t5 import T5, Attention, FeedForward

EXTRAS = ("head_scale", "post_attn_norm.weight", "post_cross_norm.weight", "mid_norm.weight")


def config(**overrides) -> T5Config:
    return tiny_config(block="normformer", **overrides)


def perturb_extras(model: torch.nn.Module, seed: int = 3) -> None:
    """NormFormer's parameters away from their initial ones, so that a test sees them act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(EXTRAS):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


def rms(x, weight, eps):  # the norm written out
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def attention_by_hand(attn, x, bias, context=None):
    """softmax(q k^T + bias) v per head, head h times gamma_h, then o; from attn's weights."""
    B, Q, _ = x.shape
    context = x if context is None else context
    H, D = attn.n_heads, attn.d_kv
    q = (x @ attn.q.weight.T).view(B, Q, H, D).transpose(1, 2)
    k = (context @ attn.k.weight.T).view(B, -1, H, D).transpose(1, 2)
    v = (context @ attn.v.weight.T).view(B, -1, H, D).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) + (0 if bias is None else bias)
    heads = torch.softmax(scores, -1) @ v  # (B, H, Q, D)
    heads = heads * attn.head_scale.view(1, H, 1, 1)
    return heads.transpose(1, 2).reshape(B, Q, H * D) @ attn.o.weight.T


def ff_by_hand(ff, x, act):
    if ff.gated:
        h = act(x @ ff.wi_0.weight.T) * (x @ ff.wi_1.weight.T)
    else:
        h = act(x @ ff.wi.weight.T)
    return rms(h, ff.mid_norm.weight, ff.mid_norm.eps) @ ff.wo.weight.T


@pytest.mark.parametrize("is_decoder", [False, True])
@pytest.mark.parametrize("feed_forward, proj, act", [
    ("dense", "gated-gelu", lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
    ("dense", "relu", torch.relu),
    ("squared_relu", "relu", lambda x: torch.relu(x) ** 2),
])
def test_the_block_equals_its_formula(is_decoder, feed_forward, proj, act):
    cfg = config(feed_forward=feed_forward, feed_forward_proj=proj)
    torch.manual_seed(0)
    block = NormFormerBlock(cfg, is_decoder).eval()
    perturb_extras(block)
    for norm in (block.attn_norm, block.ff_norm) + ((block.cross_norm,) if is_decoder else ()):
        with torch.no_grad():
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape))
    assert type(block.attn) is NormFormerAttention and type(block.ff) is NormFormerFeedForward
    x, enc = torch.randn(2, 5, cfg.d_model), torch.randn(2, 7, cfg.d_model)
    self_bias = torch.randn(1, cfg.num_heads, 5, 5)
    cross_bias = torch.zeros(2, 1, 5, 7).masked_fill(torch.rand(2, 1, 1, 7) < 0.3, -1e9)
    eps = cfg.layer_norm_epsilon
    with torch.no_grad():
        want = x + rms(attention_by_hand(block.attn, rms(x, block.attn_norm.weight, eps), self_bias),
                       block.post_attn_norm.weight, eps)
        if is_decoder:
            y = attention_by_hand(block.cross_attn, rms(want, block.cross_norm.weight, eps), cross_bias, enc)
            want = want + rms(y, block.post_cross_norm.weight, eps)
        want = want + ff_by_hand(block.ff, rms(want, block.ff_norm.weight, eps), act)
        got = block(x, self_bias, enc if is_decoder else None, cross_bias if is_decoder else None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_head_scale_scales_each_head_before_o():
    # gamma_h = 0 removes exactly head h's contribution: o applied to the other heads alone.
    torch.manual_seed(0)
    cfg = config()
    attn = NormFormerAttention(cfg).eval()
    x = torch.randn(2, 4, cfg.d_model)
    with torch.no_grad():
        heads = attn.heads(x, None)  # (B, H, Q, D)
        attn.head_scale.copy_(torch.tensor([0.0, 1.0]))
        keep_second = torch.cat([torch.zeros_like(heads[:, :1]), heads[:, 1:]], 1).transpose(1, 2).reshape(2, 4, -1)
        torch.testing.assert_close(attn(x, None), attn.o(keep_second))
        attn.head_scale.fill_(1.0)
        torch.testing.assert_close(attn(x, None), Attention.forward(attn, x, None))  # ones: plain attention


def test_t5_init_sets_the_extras_to_ones_and_still_draws_t5s_weights():
    torch.manual_seed(0)
    model = T5(config())
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    model.init_weights()
    extras = {n: p for n, p in model.named_parameters() if n.endswith(EXTRAS)}
    # per encoder block: head scale, 2 norms; per decoder block: 2 head scales, 3 norms
    assert len(extras) == 2 * 3 + 3 * 5
    assert all(torch.equal(p, torch.ones_like(p)) for p in extras.values())
    c = model.config
    for block in [*model.encoder.blocks, *model.decoder.blocks]:
        for attn in [block.attn] + ([block.cross_attn] if block.is_decoder else []):
            assert (attn.q.weight != 3.0).all() and (attn.o.weight != 3.0).all()  # T5's rule ran on them
            assert 0.5 < attn.q.weight.std() / (c.d_model * c.d_kv) ** -0.5 < 2
        assert (block.ff.wo.weight != 3.0).all()
        assert torch.equal(block.attn_norm.weight, torch.ones(c.d_model))


def test_a_model_has_pre_norm_t5s_parameters_plus_normformers():
    plain, norm = T5(tiny_config()), T5(config())
    shapes = {n: p.shape for n, p in norm.named_parameters()}
    t5s = {n: s for n, s in shapes.items() if not n.endswith(EXTRAS)}
    assert t5s == {n: p.shape for n, p in plain.named_parameters()}
    assert shapes["encoder.blocks.0.attn.head_scale"] == (2,)
    assert shapes["decoder.blocks.1.ff.mid_norm.weight"] == (48,)
    assert shapes["decoder.blocks.0.post_cross_norm.weight"] == (32,)
    assert all(type(b) is NormFormerBlock for b in [*norm.encoder.blocks, *norm.decoder.blocks])


def test_squared_relu_keeps_its_activation_inside_the_normformer_feed_forward():
    block = NormFormerBlock(config(feed_forward="squared_relu", feed_forward_proj="relu"), False)
    assert block.ff.activation == "squared_relu" and block.ff.act is squared_relu
    assert NormFormerBlock(config(feed_forward_proj="relu"), False).ff.activation == "relu"


class OtherFeedForward(FeedForward):  # a research feed-forward the mid norm does not know
    pass


def test_another_feed_forward_is_refused_when_the_model_is_built(monkeypatch):
    monkeypatch.setitem(components.FEED_FORWARDS, "other", OtherFeedForward)
    cfg = config(feed_forward="other")
    with pytest.raises(T5ForgeError, match=r"model.block='normformer' .* model.feed_forward='other' "
                                           r"\(OtherFeedForward\) cannot take it: set model.feed_forward"):
        T5(cfg)


def test_gradients_reach_every_parameter_and_match_finite_differences():
    torch.manual_seed(0)
    model = T5(config())
    perturb_extras(model)
    batch = padded_batch()
    summed_nll(model, TokenNLL(), batch).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.endswith(EXTRAS):
            assert p.grad.abs().max() > 0, name
    # finite differences through one decoder block, the new parameters among the inputs
    block = NormFormerBlock(config(), True).double().eval()
    perturb_extras(block)
    names = ["attn.head_scale", "cross_attn.head_scale", "post_attn_norm.weight", "post_cross_norm.weight",
             "ff.mid_norm.weight"]
    params = dict(block.named_parameters())

    def f(x, enc, *extras):
        return torch.func.functional_call(block, {**params, **dict(zip(names, extras))}, (x, None, enc))

    x, enc = torch.randn(2, 3, 32, dtype=torch.float64), torch.randn(2, 4, 32, dtype=torch.float64)
    inputs = [x, enc] + [params[n].detach().clone() for n in names]
    # RMSNorm takes its mean square in fp32 even for float64 inputs, so the differences use a step of
    # 1e-3 (fp32 rounding over a 1e-6 step would swamp them) and tolerances to match.
    assert torch.autograd.gradcheck(f, [t.requires_grad_() for t in inputs], eps=1e-3, atol=1e-3, rtol=1e-3)


def test_cached_generation_equals_a_full_recompute():
    torch.manual_seed(0)
    model = T5(config()).eval()
    perturb_extras(model)
    generated, want, ids, mask = cached_and_recomputed(model)
    assert torch.equal(generated, want)
    # and the logits themselves, step by step with the cache against the whole sequence at once
    dec = torch.randint(2, 96, (3, 6))
    with torch.no_grad():
        enc = model.encode(ids, mask)
        full = model.decode(dec, enc, mask)
        cache = KVCache(model.config.num_decoder_layers, dec.shape[1])
        steps = [model.decode(dec[:, t:t + 1], enc, mask, cache=cache) for t in range(dec.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)


@pytest.mark.parametrize("overrides", [
    {},  # gated-gelu
    {"feed_forward_proj": "relu", "tie_word_embeddings": True},
    {"feed_forward": "squared_relu", "feed_forward_proj": "relu"},
])
def test_the_converter_leaves_it_plain_and_the_converted_model_trains_like_the_plain_one(overrides, caplog):
    torch.manual_seed(0)
    plain = T5(config(**overrides)).train()
    perturb_extras(plain)
    model = copy.deepcopy(plain)
    with caplog.at_level(logging.INFO, logger="t5forge.model.fast"):
        _, loss, report = fast.apply(model, TokenNLL(), device="cpu")
    assert report.left_plain == {"NormFormerBlock (subclass of PreNormBlock)": 5,
                                 "NormFormerAttention (subclass of Attention)": 2 + 3 * 2,
                                 "NormFormerFeedForward (subclass of FeedForward)": 5}
    assert ("left plain NormFormerAttention (subclass of Attention) x8, "
            "NormFormerBlock (subclass of PreNormBlock) x5, "
            "NormFormerFeedForward (subclass of FeedForward) x5") in caplog.text
    # Its norms are plain RMSNorms, swapped for the twin: 4 per encoder block, 6 per decoder block, 2 final.
    assert report.swapped["RMSNorm"] == 2 * 4 + 3 * 6 + 2 and "Attention" not in report.swapped
    assert report.fused_residual == report.bias_forms == []  # the stacks run the plain loop and dense bias
    # Each gradient within 1e-5 of its tensor's largest, as for every twin; the head scales' within
    # 5e-5: the norm right after attention makes the loss invariant to scaling all heads together, so
    # sum_h gamma_h dL/dgamma_h = 0 and their gradient is a difference of nearly equal terms, in which
    # the twin norm's rounding (another summation order) shows several times larger.
    assert_converted_equals_plain(model, loss, plain, rel_by_suffix={"head_scale": 5e-5})


def test_export_refuses_it(tmp_path):
    model = T5(config())
    refusal = r"cannot export to HF T5: model\.block='normformer' has no HF T5 equivalent"
    with pytest.raises(T5ForgeError, match=refusal):
        export_hf(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_pretrain_run_with_normformer_trains_and_loads_back(tmp_path, tiny_pretrain_args):
    out = tmp_path / "run"
    assert main(tiny_pretrain_args(out, "model.block=normformer")) == 0
    saved = json.loads(next((out / "checkpoints").glob("step-*/model_config.json")).read_text())
    assert saved["block"] == "normformer"
    model, _ = load_model(out)
    assert all(type(b) is NormFormerBlock for b in [*model.encoder.blocks, *model.decoder.blocks])
    # the new parameters were trained and saved: no longer all ones
    scales = [p for n, p in model.named_parameters() if n.endswith("head_scale")]
    assert scales and any(not torch.equal(p, torch.ones_like(p)) for p in scales)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert losses[-1] < losses[0]
