"""The Hourglass encoder, the encoder component "hourglass" (model/hourglass.py): pooling and
upsampling against their definitions, the encoder against its formula written out with the plain
stack's blocks, the output's length, padding masked, fewer FLOPs than the plain stack, gradients,
cached generation against a full recompute, the speed converter leaving the stack plain with equal
results, the refusals (packed rows, export, too few layers), and a `t5forge pretrain` run with
model.encoder=hourglass that loads back."""

import copy
import json

import pytest
import torch
from fast_cases import TOL, assert_converted_equals_plain, padded_batch, summed_nll, tiny_config
from recompute import cached_and_recomputed

from t5forge.cli import main
from t5forge.errors import T5ForgeError
from t5forge.model import fast
from t5forge.model.config import T5Config
from t5forge.model.flops import training_flops
from t5forge.model.hf import export_hf
from t5forge.model.hourglass import HourglassStack, shorten, upsample
from t5forge.model.load import load_model
from t5forge.model.loss import TokenNLL
from t5forge.model.masks import additive_bias, keep_mask
from t5forge.model.t5 import T5, Stack


def config(**overrides) -> T5Config:
    return tiny_config(**{"encoder": "hourglass", "num_layers": 3, **overrides})


def test_shorten_averages_real_tokens_only_and_pads_to_a_multiple_of_k():
    x = torch.arange(2 * 7 * 1, dtype=torch.float32).view(2, 7, 1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]])
    pooled, short_mask = shorten(x, mask, 2)  # groups of tokens (0, 1) (2, 3) (4, 5) (6, pad)
    want = torch.tensor([[0.5, 2.5, 4.5, 6.0], [7.5, 9.0, 0.0, 0.0]])  # row 1: (9, padding) -> 9; all padding -> 0
    torch.testing.assert_close(pooled[..., 0], want)
    assert short_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    pooled, short_mask = shorten(x, None, 3)  # (0, 1, 2) (3, 4, 5) (6, pad, pad): the pad is not averaged
    torch.testing.assert_close(pooled[0, :, 0], torch.tensor([1.0, 4.0, 6.0]))
    assert short_mask.tolist() == [[1, 1, 1], [1, 1, 1]]
    pooled, short_mask = shorten(x[:, :6], None, 3)  # divisible, no mask: a plain mean, no mask
    torch.testing.assert_close(pooled[0, :, 0], torch.tensor([1.0, 4.0]))
    assert short_mask is None


def test_upsample_repeats_each_vector_k_times_and_cuts_to_the_length():
    s = torch.tensor([[[1.0], [2.0], [3.0]]])
    assert upsample(s, 3, 7)[0, :, 0].tolist() == [1, 1, 1, 2, 2, 2, 3]
    assert upsample(s, 2, 6)[0, :, 0].tolist() == [1, 1, 2, 2, 3, 3]


def encoder_by_hand(stack: HourglassStack, x, mask):
    """The encoder's formula with the plain stack's blocks, pooling by loops over groups of k."""
    cfg, k = stack.config, stack.factor
    B, S, C = x.shape
    mask = torch.ones(B, S, dtype=torch.long) if mask is None else mask

    def bias(length, keep):
        return additive_bias(stack.position(length, length), keep_mask(length, length, x.device, keep), x.dtype)

    n_short = cfg.num_layers - stack.pre - stack.post
    for block in stack.blocks[:stack.pre]:
        x = block(x, bias(S, mask), rotation=stack.rotation(S))
    groups = [range(g, min(g + k, S)) for g in range(0, S, k)]
    short, short_mask = torch.zeros(B, len(groups), C), torch.zeros(B, len(groups), dtype=torch.long)
    for b in range(B):
        for j, group in enumerate(groups):
            real = [i for i in group if mask[b, i]]
            if real:
                short[b, j], short_mask[b, j] = x[b, real].mean(0), 1
    for block in stack.blocks[stack.pre:stack.pre + n_short]:
        short = block(short, bias(len(groups), short_mask), rotation=stack.rotation(len(groups)))  # 0..n-1
    x = x + torch.stack([short[:, i // k] for i in range(S)], 1)
    for block in stack.blocks[stack.pre + n_short:]:
        x = block(x, bias(S, mask), rotation=stack.rotation(S))
    return stack.final_norm(x)


@pytest.mark.parametrize("k, pre, post, S, position", [(2, 1, 1, 8, "t5_bias"), (2, 1, 1, 11, "t5_bias"),
                                                       (3, 1, 1, 11, "t5_bias"), (4, 0, 2, 9, "t5_bias"),
                                                       (3, 1, 1, 11, "rope")])
def test_the_encoder_equals_its_formula_and_keeps_the_input_length(k, pre, post, S, position):
    cfg = config(hourglass_factor=k, hourglass_pre=pre, hourglass_post=post, position=position)
    torch.manual_seed(0)
    model = T5(cfg).eval()
    assert type(model.encoder) is HourglassStack and type(model.decoder) is Stack
    ids = torch.randint(2, 96, (3, S))
    mask = torch.ones_like(ids)
    mask[1, S - 4:] = 0
    mask[2, 0] = 0  # padding at the front too
    with torch.no_grad():
        for m in (mask, None):
            got = model.encode(ids, m)
            assert got.shape == (3, S, cfg.d_model)
            torch.testing.assert_close(got, encoder_by_hand(model.encoder, model.shared(ids), m), **TOL)


@pytest.mark.parametrize("k", [2, 3])
def test_padding_is_masked_changing_a_padding_id_changes_no_real_output(k):
    torch.manual_seed(0)
    model = T5(config(hourglass_factor=k)).eval()
    ids = torch.randint(2, 96, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # tokens 6.. padding: with k=2 the group (6, 7) and with k=3 (6, 7, 8) are all padding,
    mask[1, 4] = 0  # a padding token inside a group shared with real tokens
    other = ids.clone()
    other[0, 6:] = (ids[0, 6:] + 7) % 94 + 2
    other[1, 4] = (ids[1, 4] + 7) % 94 + 2
    with torch.no_grad():
        a, b = model.encode(ids, mask), model.encode(other, mask)
        real = mask.bool()
        torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-6)
        assert (a[~real] - b[~real]).abs().max() > 1e-3  # the padding's own outputs did change: ids reach them
        changed = ids.clone()
        changed[1, 5] = (ids[1, 5] + 7) % 94 + 2  # a real token in that shared group does change the others
        assert (model.encode(changed, mask)[1, 3] - a[1, 3]).abs().max() > 1e-4


def test_shortening_costs_fewer_flops_than_the_plain_stack():
    hourglass = config(num_layers=4)
    stack, shallow = hourglass.replace(encoder="stack"), hourglass.replace(encoder="stack", num_layers=2,
                                                                         num_decoder_layers=3)
    flops = {name: training_flops(c, 1, 64, 16) for name, c in
             [("hourglass", hourglass), ("stack", stack), ("shallow", shallow)]}
    assert flops["hourglass"] < flops["stack"]
    # The two middle blocks cost something, and at most half what they cost at full length (their
    # matmuls see half the tokens, their attention scores a quarter of the pairs); the decoder and the
    # cross-attention cost the same in all three.
    full, shortened = flops["stack"] - flops["shallow"], flops["hourglass"] - flops["shallow"]
    assert 0 < shortened <= full / 2


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = T5(config(hourglass_factor=3)).train()
    summed_nll(model, TokenNLL(), padded_batch()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.startswith("encoder."):
            assert p.grad.abs().max() > 0, name


def test_gradients_match_finite_differences():
    torch.manual_seed(0)
    # The masks' additive bias has no float64 form (model/masks.py fills fp32's minimum), so the whole
    # stack is checked unmasked at a length divisible by k, and the padding-aware pooling on its own.
    stack = HourglassStack(config(d_model=8, d_ff=8, d_kv=4, hourglass_factor=2)).double().eval()
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    # RMSNorm takes its mean square in fp32 even for float64 inputs: a step of 1e-3 and tolerances to match
    assert torch.autograd.gradcheck(lambda t: stack(t), [x], eps=1e-3, atol=1e-3, rtol=1e-3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: shorten(t, mask, 2)[0], [x])


def test_cached_generation_equals_a_full_recompute():
    torch.manual_seed(0)
    model = T5(config()).eval()
    generated, want, ids, mask = cached_and_recomputed(model)
    assert want.shape[1] > 1
    assert torch.equal(generated, want)


@pytest.mark.parametrize("overrides", [{}, {"feed_forward_proj": "relu", "tie_word_embeddings": True,
                                            "hourglass_factor": 3}])
def test_the_converter_leaves_the_stack_plain_and_the_converted_model_trains_like_the_plain_one(overrides):
    torch.manual_seed(0)
    plain = T5(config(**overrides)).train()
    model = copy.deepcopy(plain)
    _, loss, report = fast.apply(model, TokenNLL(), device="cpu")
    assert report.left_plain == {"HourglassStack (subclass of Stack)": 1}
    assert report.swapped["PreNormBlock"] == 3 + 3 and report.swapped["Stack"] == 1  # the decoder
    assert report.fused_residual == report.bias_forms == ["decoder"]
    assert_converted_equals_plain(model, loss, plain)


def test_packed_rows_are_refused():
    model = T5(config())
    ids = torch.randint(2, 96, (1, 8))
    segments = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0]])
    with pytest.raises(T5ForgeError, match=r"hourglass encoder does not support packed rows; set finetune.pack=false"):
        model(ids, labels=ids[:, :4], encoder_segment_ids=segments, decoder_segment_ids=segments[:, :4])


def test_too_few_layers_and_a_factor_below_two_are_refused():
    with pytest.raises(T5ForgeError, match=r"num_layers=2, hourglass_pre=1, hourglass_post=1; raise num_layers"):
        tiny_config(encoder="hourglass", num_layers=2)
    with pytest.raises(T5ForgeError, match=r"hourglass_factor .* must be an integer >= 2, got 1"):
        config(hourglass_factor=1)
    with pytest.raises(T5ForgeError, match=r"hourglass_pre must be an integer >= 0, got -1"):
        config(hourglass_pre=-1)
    tiny_config(num_layers=2)  # the plain stack: the hourglass layer counts do not apply


def test_export_refuses_it(tmp_path):
    model = T5(config())
    with pytest.raises(T5ForgeError, match=r"cannot export to HF T5: model\.encoder='hourglass' has no HF T5"):
        export_hf(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_pretrain_run_with_hourglass_trains_and_loads_back(tmp_path, tiny_pretrain_args):
    out = tmp_path / "run"
    assert main(tiny_pretrain_args(out, "model.encoder=hourglass", "model.num_layers=3",
                                   "model.hourglass_factor=3")) == 0
    saved = json.loads(next((out / "checkpoints").glob("step-*/model_config.json")).read_text())
    assert (saved["encoder"], saved["hourglass_factor"], saved["num_layers"]) == ("hourglass", 3, 3)
    model, _ = load_model(out)
    assert type(model.encoder) is HourglassStack and model.encoder.factor == 3
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert losses[-1] < losses[0]
