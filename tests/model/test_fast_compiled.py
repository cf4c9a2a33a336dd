"""The twins' torch.compile'd elementwise stretches (fast/compiled.py: the norm, the residual add +
norm, the gating) against the plain model: one training step's loss and every gradient, the rule
that turns them on, eager evaluation, the fallback."""

import logging

import pytest
import torch
from fast_cases import summed_nll

from t5forge.config_files import load_config
from t5forge.distributed import World
from t5forge.model import fast
from t5forge.model.config import T5Config
from t5forge.model.fast import compiled as fused
from t5forge.model.loss import TokenNLL
from t5forge.model.t5 import T5
from t5forge.train.setup import training_model

# torch's own modules, imported by the compiler, warn about their deprecated APIs.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def tiny(feed_forward_proj="gated-gelu", elementwise=None):
    """The plain tiny T5 (elementwise None), or converted with the stretches compiled or not."""
    config = T5Config(vocab_size=96, d_model=32, d_ff=48, num_heads=2, d_kv=16, num_layers=2, num_decoder_layers=3,
                      dropout_rate=0.0, feed_forward_proj=feed_forward_proj)
    torch.manual_seed(0)
    model = T5(config)
    if elementwise is not None:
        fast.apply(model, None, device="cpu", elementwise=elementwise)
    return model


def step_loss(model, ids, mask, labels):  # the plain TokenNLL: the loss twin has its own tests (test_fast_loss)
    return summed_nll(model, TokenNLL(), {"input_ids": ids, "attention_mask": mask, "labels": labels})


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 96, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = torch.randint(2, 96, (3, 6), generator=g)
    labels[2, 4:] = -100
    return ids, mask, labels


@pytest.fixture
def any_size(monkeypatch):  # test-sized activations take the compiled stretches too
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "gated-silu", "relu"])
def test_compiled_stretches_give_the_eager_loss_and_gradients(feed_forward_proj, any_size):
    eager, compiled = tiny(feed_forward_proj), tiny(feed_forward_proj, elementwise=True)
    ids, mask, labels = batch()
    losses = []
    for model in (eager, compiled):
        loss = step_loss(model, ids, mask, labels)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():  # float rounding: fused loops sum in another order
        assert (grads[name].grad - p.grad).abs().max() <= 1e-5 * p.grad.abs().max(), name
    norm_grad = compiled.encoder.blocks[0].attn_norm.weight.grad
    assert norm_grad is not None and norm_grad.abs().sum() > 0


def test_compiled_stretches_under_bf16_autocast_are_as_accurate_as_eager(any_size):
    # bf16 rounds differently in the fused loops (the gating rounds once, not after GELU and again
    # after the product), so the check is against fp32: no further from it than eager bf16 is.
    reference, eager, compiled = tiny(), tiny(elementwise=False), tiny(elementwise=True)
    ids, mask, labels = batch()
    step_loss(reference, ids, mask, labels).backward()
    for model in (eager, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = step_loss(model, ids, mask, labels)
        loss.backward()

    def error(model):  # relative distance of all gradients from the fp32 ones
        got = torch.cat([p.grad.flatten() for p in model.parameters()])
        want = torch.cat([p.grad.flatten() for p in reference.parameters()])
        return float((got - want).norm() / want.norm())

    assert 0 < error(compiled) <= 1.5 * error(eager) + 1e-3, (error(compiled), error(eager))
    assert error(eager) < 0.05


def test_the_compiled_stretches_run_only_while_training_on_large_activations(monkeypatch, any_size):
    calls = []
    for name in ("compiled_rms_norm", "compiled_add_rms_norm", "compiled_gated"):
        original = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    model = tiny(elementwise=True)
    ids, mask, labels = batch()
    with torch.no_grad():  # evaluation and generation: eager, no compile per decoding step
        step_loss(model, ids, mask, labels)
        model.generate(ids, mask, max_new_tokens=3)
    assert calls == []
    step_loss(model, ids, mask, labels).backward()
    # per stack: one add+norm per sublayer and the final norm; the first norm has nothing to add yet
    assert calls.count("compiled_rms_norm") == 2
    assert calls.count("compiled_add_rms_norm") == (2 * 2 - 1 + 1) + (3 * 3 - 1 + 1)
    assert calls.count("compiled_gated") == 2 + 3
    calls.clear()
    monkeypatch.setattr(fused, "MIN_ELEMENTS", ids.numel() * model.config.d_ff + 1)  # above every activation
    step_loss(model, ids, mask, labels).backward()
    assert calls == []
    for module in model.modules():  # the twins' switch off: the eager twins, not the stretches
        if hasattr(module, "compiled"):
            module.compiled = False
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)
    step_loss(model, ids, mask, labels).backward()
    assert calls == []


def test_on_by_default_for_cpu_training_without_whole_model_compile():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fused.wanted(None, cpu, whole_model_compiled=False)
    assert not fused.wanted(None, cpu, whole_model_compiled=True)
    assert not fused.wanted(None, cuda, whole_model_compiled=False)
    assert not fused.wanted(False, cpu, whole_model_compiled=False)
    assert fused.wanted(True, cpu, whole_model_compiled=True)
    world = World()
    for overrides, expected in (([], True), (["model.compile_elementwise=false"], False)):
        model = tiny()
        trained, _ = training_model(model, load_config(["model.name=tiny", *overrides]), world, cpu)
        assert trained is model  # converted in place (no DDP, no torch.compile here)
        assert model.encoder.final_norm.compiled is expected and model.decoder.blocks[0].ff.compiled is expected


def test_small_runs_like_pt_cpu_stay_eager_and_say_so(caplog):
    # pt_cpu's residual stream is 16 x 128 x 128 = 262k elements: below MIN_ELEMENTS, so nothing is
    # compiled (its 1M-element gated activation would be, by the per-tensor rule alone) and its
    # first step pays no compile start-up; model.compile_elementwise=true still compiles.
    from t5forge.plan import make_plan, resolve_model_config

    cpu, world = torch.device("cpu"), World()
    for overrides, expected in (([], False), (["model.compile_elementwise=true"], True)):
        cfg = load_config(["task=pt_cpu", *overrides])
        plan = make_plan(cfg, tokenizer_ids=32100)
        model = T5(resolve_model_config(cfg, plan.vocab_size))
        with caplog.at_level(logging.INFO, logger="t5forge.train.setup"):
            training_model(model, cfg, world, cpu, plan)
        assert fast.enabled_in(model) is expected
    assert "the residual stream (262,144 elements a micro-batch) is below the 400,000" in caplog.text
    # nanoT5's t5-v1.1-small shape on CPU (8 x 512 x 512 per micro-batch) compiles them.
    assert fused.wanted(None, cpu, whole_model_compiled=False, stream_elements=8 * 512 * 512)
    assert not fused.wanted(None, cpu, whole_model_compiled=False, stream_elements=16 * 128 * 128)


def test_a_backend_that_fails_falls_back_to_eager_with_a_warning(caplog):
    stretch = fused.Compiled(fused.gated, backend="no-such-backend")
    gate, linear = torch.randn(4, 8), torch.randn(4, 8)
    with caplog.at_level(logging.WARNING, logger="t5forge.model.fast.compiled"):
        out = stretch(gate, linear, "gelu_new")
        again = stretch(gate, linear, "gelu_new")
    torch.testing.assert_close(out, fused.gated(gate, linear, "gelu_new"))
    torch.testing.assert_close(again, out)
    assert stretch.failed and "compiling gated failed" in caplog.text
    assert caplog.text.count("compiling gated failed") == 1  # said once, then eager quietly
