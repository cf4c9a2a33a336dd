"""Primer's multi-dconv-head attention, the block component "primer" (model/primer.py): the
convolution against its formula and torch's grouped conv1d, its causality (block and whole decoder),
padding and packed rows not leaking through it, its identity init, gradients, cached generation
(greedy and beam) against a full recompute, the speed converter leaving it plain with equal results,
the export refusal, and a `t5forge pretrain` run with model.block=primer that loads back."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from fast_cases import TOL, assert_converted_equals_plain, padded_batch, summed_nll, tiny_config
from recompute import cached_and_recomputed

from t5forge.cli import main
from t5forge.errors import T5ForgeError
from t5forge.model import fast
from t5forge.model.config import T5Config
from t5forge.model.generation import KVCache
from t5forge.model.hf import export_hf
from t5forge.model.load import load_model
from t5forge.model.loss import TokenNLL
from t5forge.model.primer import CAUSAL_TAPS, SAME_TAPS, PrimerAttention, PrimerBlock, dconv
from t5forge.model.t5 import T5, PreNormBlock

CONVS = ("q_dconv", "k_dconv", "v_dconv")


def config(**overrides) -> T5Config:
    return tiny_config(block="primer", **overrides)


def perturb_convs(model: torch.nn.Module, seed: int = 3) -> None:
    """The conv weights away from the identity, so that a test sees them act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(CONVS):
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)


def no_masks(Q):
    return {j: torch.ones(1, Q, dtype=torch.bool) for j in (-2, -1, 1)}


@pytest.mark.parametrize("taps", [CAUSAL_TAPS, SAME_TAPS])
def test_the_conv_equals_its_formula_and_torchs_depthwise_conv1d(taps):
    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 4), torch.randn(4, 3)
    got = dconv(x, w, taps, no_masks(5))
    want = torch.zeros_like(x)  # written out: sum over taps of w[c, n] * x[t + taps[n], c], zero outside
    for t in range(5):
        for n, j in enumerate(taps):
            if 0 <= t + j < 5:
                want[:, t] += w[:, n] * x[:, t + j]
    torch.testing.assert_close(got, want)
    # torch's grouped conv (groups = channels), padded on the left (causal) or both sides ("same")
    pad = (2, 0) if taps == CAUSAL_TAPS else (1, 1)
    ref = F.conv1d(F.pad(x.transpose(1, 2), pad), w[:, None, :], groups=4).transpose(1, 2)
    torch.testing.assert_close(got, ref)
    # a masked neighbour counts as zero: only the tap reading t itself remains
    masks = {j: torch.zeros(1, 5, dtype=torch.bool) for j in (-2, -1, 1)}
    torch.testing.assert_close(dconv(x, w, taps, masks), x * w[:, taps.index(0)])


def test_the_decoder_block_is_causal_and_the_encoder_block_reads_one_ahead():
    torch.manual_seed(0)
    cfg = config()
    dec, enc_block = PrimerBlock(cfg, True).eval(), PrimerBlock(cfg, False).eval()
    perturb_convs(dec), perturb_convs(enc_block)
    x, enc = torch.randn(2, 6, cfg.d_model), torch.randn(2, 4, cfg.d_model)
    causal = torch.zeros(1, 1, 6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), -1e9)
    y = x.clone()
    y[:, 4] += torch.randn(2, cfg.d_model)  # change token 4
    with torch.no_grad():
        a, b = dec(x, causal, enc), dec(y, causal, enc)
        torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=0)
        assert (a[:, 4:] - b[:, 4:]).abs().amax() > 1e-3
        # the conv alone: with no attention bias at all (everything attends everywhere) the decoder's
        # q/k/v rows before 4 are still unchanged, the encoder's row 3 (t+1 = 4) is not
        attn, h = dec.attn, dec.attn_norm
        qa, qb = attn.q(h(x)), attn.q(h(y))
        ca = dconv(qa, attn.q_dconv, attn.taps, no_masks(6))
        cb = dconv(qb, attn.q_dconv, attn.taps, no_masks(6))
        torch.testing.assert_close(ca[:, :4], cb[:, :4], rtol=0, atol=0)
        e = enc_block.attn
        ea = dconv(e.q(h(x)), e.q_dconv, e.taps, no_masks(6))
        eb = dconv(e.q(h(y)), e.q_dconv, e.taps, no_masks(6))
        torch.testing.assert_close(ea[:, :3], eb[:, :3], rtol=0, atol=0)
        assert (ea[:, 3] - eb[:, 3]).abs().amax() > 1e-3


def test_a_whole_decoder_is_causal():
    torch.manual_seed(0)
    model = T5(config()).eval()
    perturb_convs(model)
    batch = padded_batch()
    dec = torch.randint(2, 96, (3, 7))
    changed = dec.clone()
    changed[:, 5] = (dec[:, 5] + 1) % 94 + 2
    with torch.no_grad():
        enc = model.encode(batch["input_ids"], batch["attention_mask"])
        a = model.decode(dec, enc, batch["attention_mask"])
        b = model.decode(changed, enc, batch["attention_mask"])
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
    assert (a[:, 5:] - b[:, 5:]).abs().amax() > 1e-4


def test_padding_does_not_leak_into_real_tokens_of_the_encoder():
    torch.manual_seed(0)
    model = T5(config()).eval()
    perturb_convs(model)
    ids = torch.randint(2, 96, (1, 8))
    mask = torch.ones_like(ids)
    mask[:, 5:] = 0
    other = ids.clone()
    other[:, 5:] = (ids[:, 5:] + 7) % 94 + 2  # other tokens under the padding
    with torch.no_grad():
        a, b = model.encode(ids, mask), model.encode(other, mask)
        alone = model.encode(ids[:, :5])
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
    torch.testing.assert_close(a[:, :5], alone, **TOL)


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_packed_rows_equal_their_examples_run_alone(stack):
    torch.manual_seed(0)
    model = T5(config()).eval()
    perturb_convs(model)
    C = model.config.d_model
    x = torch.randn(1, 8, C)
    segments = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 0]])
    enc = torch.randn(1, 5, C)
    enc_segments = torch.tensor([[1, 1, 2, 2, 2]])
    s = getattr(model, stack)
    with torch.no_grad():
        if stack == "encoder":
            packed = s(x, segments=segments)
            first, second = s(x[:, :4]), s(x[:, 4:7])
        else:
            packed = s(x, enc=enc, segments=segments, enc_segments=enc_segments)
            first, second = s(x[:, :4], enc=enc[:, :2]), s(x[:, 4:7], enc=enc[:, 2:])
    torch.testing.assert_close(packed[:, :4], first, **TOL)
    torch.testing.assert_close(packed[:, 4:7], second, **TOL)


def test_init_is_the_identity_so_a_fresh_model_is_the_pre_norm_one():
    torch.manual_seed(0)
    model = T5(config())
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    model.init_weights()
    convs = {n: p for n, p in model.named_parameters() if n.endswith(CONVS)}
    assert len(convs) == 3 * (2 + 3)  # self-attention only: one per block, none in cross-attention
    for name, p in convs.items():
        tap = 2 if name.startswith("decoder") else 1  # the one reading t itself
        want = torch.zeros(32, 3)
        want[:, tap] = 1
        assert torch.equal(p, want), name
    assert all((b.attn.q.weight != 3.0).all() for b in model.encoder.blocks)  # T5's rule still ran
    plain = T5(tiny_config())
    plain.load_state_dict({n: p for n, p in model.state_dict().items() if not n.endswith(CONVS)})
    batch = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(summed_nll(model, TokenNLL(), batch), summed_nll(plain, TokenNLL(), batch),
                                   **TOL)
    assert all(type(b) is PrimerBlock for b in [*model.encoder.blocks, *model.decoder.blocks])
    assert all(type(b.cross_attn) is not PrimerAttention for b in model.decoder.blocks)
    assert isinstance(model.encoder.blocks[0], PreNormBlock)


def test_gradients_reach_the_convs_and_match_finite_differences():
    torch.manual_seed(0)
    model = T5(config())
    perturb_convs(model)
    summed_nll(model, TokenNLL(), padded_batch()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.endswith(CONVS):
            assert p.grad.abs().max() > 0, name
    attn = PrimerAttention(config(), causal=True).double()
    params = dict(attn.named_parameters())

    def f(x, *convs):
        return torch.func.functional_call(attn, {**params, **dict(zip(CONVS, convs))}, (x, None))

    x = torch.randn(2, 4, 32, dtype=torch.float64)
    inputs = [x] + [torch.randn(32, 3, dtype=torch.float64) for _ in CONVS]
    assert torch.autograd.gradcheck(f, [t.requires_grad_() for t in inputs])


@pytest.mark.parametrize("position", ["t5_bias", "none"])
def test_cached_generation_equals_a_full_recompute(position):
    torch.manual_seed(0)
    model = T5(config(position=position)).eval()
    perturb_convs(model)
    generated, want, ids, mask = cached_and_recomputed(model)
    assert want.shape[1] == 8
    assert torch.equal(generated, want)
    dec = torch.randint(2, 96, (3, 6))
    with torch.no_grad():
        enc = model.encode(ids, mask)
        full = model.decode(dec, enc, mask)
        # one token a step, and a 3-token prefix then single tokens (the conv state across a chunk)
        cache = KVCache(model.config.num_decoder_layers, dec.shape[1])
        steps = [model.decode(dec[:, t:t + 1], enc, mask, cache=cache) for t in range(dec.shape[1])]
        cache = KVCache(model.config.num_decoder_layers, dec.shape[1])
        chunks = [model.decode(dec[:, :3], enc, mask, cache=cache)]
        chunks += [model.decode(dec[:, t:t + 1], enc, mask, cache=cache) for t in range(3, dec.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)
    torch.testing.assert_close(torch.cat(chunks, 1), full, **TOL)
    assert set(cache.layers[0].state) == {"primer_dconv"} and cache.layers[0].state["primer_dconv"].shape[1] == 2


def test_reordering_the_cache_reorders_the_conv_state():
    # Beam search reorders the cache rows after every step (KVCache.reorder); the conv state must
    # follow its row. Three steps, the rows permuted, three more: each row then continues the history
    # of the row it came from, as a full recompute of the permuted sequences says.
    torch.manual_seed(0)
    model = T5(config()).eval()
    perturb_convs(model)
    batch = padded_batch()
    ids, mask = batch["input_ids"][:1].expand(3, -1), batch["attention_mask"][:1].expand(3, -1)
    dec, perm = torch.randint(2, 96, (3, 6)), torch.tensor([2, 0, 1])
    with torch.no_grad():
        enc = model.encode(ids, mask)  # the same encoder output for every row, as for the beams of one example
        full = model.decode(dec[perm], enc, mask)
        cache = KVCache(model.config.num_decoder_layers, 6)
        for t in range(3):
            model.decode(dec[:, t:t + 1], enc, mask, cache=cache)
        cache.reorder(perm)
        after = [model.decode(dec[perm, t:t + 1], enc, mask, cache=cache) for t in range(3, 6)]
    torch.testing.assert_close(torch.cat(after, 1), full[:, 3:], **TOL)
    # and the beam search itself runs on the state
    assert model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=5, num_beams=3).shape[0] == 3


@pytest.mark.parametrize("overrides", [{}, {"feed_forward": "squared_relu", "feed_forward_proj": "relu"}])
def test_the_converter_leaves_it_plain_and_the_converted_model_trains_like_the_plain_one(overrides):
    torch.manual_seed(0)
    plain = T5(config(**overrides)).train()
    perturb_convs(plain)
    model = copy.deepcopy(plain)
    _, loss, report = fast.apply(model, TokenNLL(), device="cpu")
    assert report.left_plain["PrimerBlock (subclass of PreNormBlock)"] == 5
    assert report.left_plain["PrimerAttention (subclass of Attention)"] == 5
    assert report.fused_residual == report.bias_forms == []  # plain loop, dense bias (the conv reads it)
    assert_converted_equals_plain(model, loss, plain)


def test_export_refuses_it(tmp_path):
    model = T5(config())
    refusal = r"cannot export to HF T5: model\.block='primer' has no HF T5 equivalent"
    with pytest.raises(T5ForgeError, match=refusal):
        export_hf(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_pretrain_run_with_primer_trains_and_loads_back(tmp_path, tiny_pretrain_args):
    out = tmp_path / "run"
    assert main(tiny_pretrain_args(out, "model.block=primer", "model.feed_forward=squared_relu")) == 0
    saved = json.loads(next((out / "checkpoints").glob("step-*/model_config.json")).read_text())
    assert saved["block"] == "primer" and saved["feed_forward"] == "squared_relu"
    model, _ = load_model(out)
    assert all(type(b) is PrimerBlock for b in [*model.encoder.blocks, *model.decoder.blocks])
    convs = [p for n, p in model.named_parameters() if n.endswith(CONVS)]
    identity = [PrimerAttention(model.config, b.is_decoder).identity_taps(p.shape[0])
                for b in [*model.encoder.blocks, *model.decoder.blocks] for p in [b.attn.q_dconv] * 3]
    assert convs and any(not torch.equal(p, i) for p, i in zip(convs, identity))  # trained and saved
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert losses[-1] < losses[0]
