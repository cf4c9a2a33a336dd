"""fast.apply, the converter: which modules it swaps (exactly the plain classes it knows), what it
leaves plain and says so, that names and values of the parameters do not move, and that a
converted model trains like the plain one (loss and every gradient) and still generates."""

import copy
import logging

import pytest
import torch
from fast_cases import TOL, assert_converted_equals_plain, padded_batch, plain_and_converted, summed_nll, tiny_config

from t5forge.model import fast
from t5forge.model.fast.attention import FastAttention
from t5forge.model.fast.feed_forward import FastFeedForward
from t5forge.model.fast.loss import FastTokenNLL
from t5forge.model.fast.norm import FastRMSNorm
from t5forge.model.fast.stack import FastBlock, FastStack
from t5forge.model.config import T5Config
from t5forge.model.loss import TokenNLL
from t5forge.model.t5 import T5, Attention, FeedForward, RMSNorm


class SquaredReLUFeedForward(FeedForward):  # a research variant: a subclass, so no twin knows it
    def forward(self, x):
        return self.wo(self.dropout(torch.relu(self.wi(x)).square()))


class Scaled(torch.nn.Module):  # a module no twin knows at all
    def __init__(self, inner):
        super().__init__()
        self.inner, self.scale = inner, torch.nn.Parameter(torch.ones(()))

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs) * self.scale


def test_swaps_exactly_the_known_classes_and_keeps_every_parameter(caplog):
    torch.manual_seed(0)
    model = T5(tiny_config())
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    with caplog.at_level(logging.INFO, logger="t5forge.model.fast"):
        converted, loss, report = fast.apply(model, TokenNLL(), device="cpu")
    assert converted is model and type(loss) is FastTokenNLL
    after = dict(model.named_parameters())
    assert list(after) == list(before)  # same names, same order
    for name, (param, value) in before.items():
        assert after[name] is param and torch.equal(param, value), name  # same objects, same values
    assert type(model.encoder) is type(model.decoder) is FastStack
    kinds = {type(m) for m in model.modules()}
    assert not kinds & {RMSNorm, Attention, FeedForward}  # nothing plain left that has a twin
    assert report.swapped == {"RMSNorm": 2 * 2 + 3 * 3 + 2, "Attention": 2 + 3 * 2, "FeedForward": 5,
                              "PreNormBlock": 5, "Stack": 2, "TokenNLL": 1}
    assert not report.left_plain and report.fused_residual == report.bias_forms == ["encoder", "decoder"]
    assert caplog.text.count("speed twins: swapped") == 1


def test_a_subclass_and_an_unknown_module_stay_plain_and_are_reported(caplog):
    torch.manual_seed(0)
    plain = T5(tiny_config(feed_forward_proj="relu"))
    block = plain.decoder.blocks[1]
    block.ff = SquaredReLUFeedForward(plain.config)
    plain.encoder.blocks[0].attn = Scaled(plain.encoder.blocks[0].attn)
    model = copy.deepcopy(plain)
    with caplog.at_level(logging.INFO, logger="t5forge.model.fast"):
        _, loss, report = fast.apply(model, TokenNLL(), device="cpu")
    assert type(model.decoder.blocks[1].ff) is SquaredReLUFeedForward  # exact-type rule: left as it is
    assert type(model.decoder.blocks[0].ff) is FastFeedForward
    assert type(model.encoder.blocks[0].attn) is Scaled and type(model.encoder.blocks[0].attn.inner) is FastAttention
    assert report.left_plain == {"SquaredReLUFeedForward (subclass of FeedForward)": 1, "Scaled (no twin)": 1}
    assert "SquaredReLUFeedForward (subclass of FeedForward) x1" in caplog.text
    # The encoder's attention is not all twins: its bias stays dense; the blocks still fuse the residual.
    assert report.bias_forms == ["decoder"] and report.fused_residual == ["encoder", "decoder"]
    assert_converted_equals_plain(model, loss, plain)


def test_eager_attention_stays_plain_and_applying_twice_changes_nothing():
    torch.manual_seed(0)
    model = T5(tiny_config(attention_backend="eager"))
    _, _, report = fast.apply(model, None, device="cpu")
    assert all(type(m) is Attention for m in model.modules() if isinstance(m, Attention))
    assert report.left_plain == {"Attention (attention_backend=eager)": 8} and report.bias_forms == []
    _, _, again = fast.apply(model, None, device="cpu")
    assert not again.swapped and again.left_plain == report.left_plain


@pytest.mark.parametrize("overrides", [
    {},  # v1.1: gated-gelu, untied
    {"feed_forward_proj": "relu", "tie_word_embeddings": True},  # v1.0
    {"feed_forward_proj": "gated-silu", "num_heads": 3, "d_kv": 12, "num_decoder_layers": 1},
    {"attention_backend": "eager"},
])
def test_converted_model_trains_like_the_plain_one(overrides):
    plain, model, loss = plain_and_converted(tiny_config(**overrides))
    batch = padded_batch()
    for m in (plain, model):
        m.train()
    assert_converted_equals_plain(model, loss, plain, batch)
    with torch.no_grad():  # evaluation: the no-grad paths
        torch.testing.assert_close(summed_nll(model, loss, batch), summed_nll(plain, TokenNLL(), batch), **TOL)
        hidden = model(**batch).hidden
        torch.testing.assert_close(model.logits(hidden), plain.logits(plain(**batch).hidden), **TOL)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_converted_model_generates_the_plain_tokens(num_beams):
    plain, model, _ = plain_and_converted(tiny_config())
    batch = padded_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    want = plain.generate(ids, mask, max_new_tokens=5, num_beams=num_beams)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=5, num_beams=num_beams), want)


def test_twins_keep_the_plain_classes_for_isinstance_and_state_dict():
    plain, model, _ = plain_and_converted(tiny_config())
    for twin, base in ((FastRMSNorm, RMSNorm), (FastAttention, Attention), (FastFeedForward, FeedForward)):
        assert issubclass(twin, base)
    assert issubclass(FastBlock, type(plain.encoder.blocks[0]))
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())  # a converted model's checkpoint loads into the plain one


def test_converted_bf16_autocast_training_gradients_close_to_fp32():
    # The bf16 training path (fused projections, chunked CE in bf16, RMSNorm twin) against fp32.
    plain, model, loss = plain_and_converted(T5Config.from_name("tiny", vocab_size=300, dropout_rate=0.0))
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(2, 300, (3, 11), generator=g), "labels": torch.randint(2, 300, (3, 5), generator=g)}
    summed_nll(model, loss, batch).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        summed_nll(model, loss, batch).backward()
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32, name
        # bf16 rounding alone moves the worst element by ~5% of the largest (seeds 0-3: 3.8-5.3%,
        # with or without the fused projections); a wrong gradient would be off by ~100%.
        scale = ref[name].abs().max()
        assert (p.grad - ref[name]).abs().max() <= 0.1 * scale, name
        assert (p.grad - ref[name]).norm() <= 0.05 * ref[name].norm(), name


def test_a_registered_research_component_runs_plain_and_the_log_says_so(caplog):
    # model/feed_forwards.py's squared ReLU, chosen by name: no twin knows it, so it stays as it is.
    torch.manual_seed(0)
    plain = T5(tiny_config(feed_forward="squared_relu"))
    model = copy.deepcopy(plain)
    with caplog.at_level(logging.INFO, logger="t5forge.model.fast"):
        _, loss, report = fast.apply(model, TokenNLL(), device="cpu")
    kind = type(plain.decoder.blocks[0].ff)
    assert kind is not FeedForward and all(type(b.ff) is kind for b in model.encoder.blocks)
    assert report.left_plain == {f"{kind.__name__} (subclass of FeedForward)": 5}
    assert f"left plain {kind.__name__} (subclass of FeedForward) x5" in caplog.text
    assert_converted_equals_plain(model, loss, plain)
