"""The block and stack twins (fast/stack.py) against the plain PreNormBlock and Stack: the (x, delta)
fused residual gives the plain block's stream, forward and backward; a stack of plain blocks runs the
plain loop; a converted stack decodes step by step with a cache as the plain one does."""

import copy

import torch
from fast_cases import TOL, assert_close_scaled, grads_of, tiny_config

from t5forge.model import fast
from t5forge.model.fast.norm import FastRMSNorm
from t5forge.model.fast.stack import FastBlock
from t5forge.model.generation import KVCache
from t5forge.model.t5 import T5, PreNormBlock


def test_block_twin_pending_update_gives_the_plain_block_stream():
    torch.manual_seed(0)
    config = tiny_config()
    plain = T5(config).decoder.blocks[0]  # T5's init
    for norm in (plain.attn_norm, plain.cross_norm, plain.ff_norm):
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    twin = copy.deepcopy(plain)
    fast.apply(twin, None, device="cpu")
    assert type(twin) is FastBlock and type(twin.ff_norm) is FastRMSNorm
    g = torch.Generator().manual_seed(1)
    x, enc = torch.randn(2, 5, 32, generator=g, requires_grad=True), torch.randn(2, 7, 32, generator=g)
    self_bias = torch.randn(1, 2, 5, 5, generator=g)
    # Two blocks in a row: the first block's pending update is added inside the second's first norm.
    ref = plain(plain(x, self_bias, enc, None), self_bias, enc, None)
    stream, delta = twin.forward_pending(x, None, self_bias, enc, None)
    stream, delta = twin.forward_pending(stream, delta, self_bias, enc, None)
    out = stream + delta
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(twin(x, self_bias, enc, None), plain(x, self_bias, enc, None), **TOL)  # plain forward kept
    assert_close_scaled(grads_of(out, (x, *twin.parameters())), grads_of(ref, (x, *plain.parameters())))


class Doubled(PreNormBlock):  # a research block: a subclass, left plain by fast.apply
    def forward(self, x, self_bias, enc=None, cross_bias=None, cache=None, rotation=None):
        return super().forward(x, self_bias, enc, cross_bias, cache, rotation) * 0.5


def test_a_stack_with_a_plain_block_runs_the_plain_loop_and_the_dense_bias():
    torch.manual_seed(0)
    plain = T5(tiny_config())
    plain.decoder.blocks[1] = Doubled(plain.config, is_decoder=True)
    model = copy.deepcopy(plain)
    _, _, report = fast.apply(model, None, device="cpu")
    assert report.fused_residual == ["encoder"] and report.bias_forms == ["encoder"]
    ids, labels = torch.randint(2, 96, (2, 9)), torch.randint(2, 96, (2, 4))
    ref, out = plain(ids, labels=labels).hidden, model(ids, labels=labels).hidden
    torch.testing.assert_close(out, ref, **TOL)
    assert_close_scaled(grads_of(out, list(model.parameters())), grads_of(ref, list(plain.parameters())))


def test_converted_decoder_with_a_cache_equals_the_plain_decoder_step_by_step():
    torch.manual_seed(0)
    plain = T5(tiny_config()).eval()
    model = copy.deepcopy(plain)
    fast.apply(model, None, device="cpu")
    ids, dec = torch.randint(2, 96, (2, 9)), torch.randint(2, 96, (2, 4))
    with torch.no_grad():
        enc = plain.encode(ids)
        torch.testing.assert_close(model.encode(ids), enc, **TOL)
        full = plain.decode(dec, enc)
        cache = KVCache(model.config.num_decoder_layers, dec.shape[1])
        steps = [model.decode(dec[:, t:t + 1], enc, cache=cache) for t in range(dec.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)
