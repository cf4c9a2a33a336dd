"""The attention twin (fast/attention.py) against the plain Attention and the reference formula:
the CPU training kernel `_BiasedAttention` (bias with its gradient), torch's SDPA without a bias
gradient or with dropout, the module itself (self- and cross-attention, cached keys / values), and
FlexAttention, the "flex" form (score_mod reading the bias table by bucket; CPU forward, GPU backward)."""

import pytest
import torch
import torch.nn.functional as F
from fast_cases import TOL, autograd_kinds, grads_of, tiny_config
from hf_twins import generation_batch, hf_reference, padded_batch, t5forge_config, twin

from t5forge.errors import T5ForgeError
from t5forge.model import fast
from t5forge.model.fast.attention import AttentionBias, FastAttention, _BiasedAttention, attend
from t5forge.model.fast.flex import flex_attention, flex_bias
from t5forge.model.loss import TokenNLL, seq2seq_loss
from t5forge.model.t5 import T5, Attention

# On CPU torch runs FlexAttention unfused and says so; that is the point of these CPU tests.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def reference(q, k, v, bias=None):  # softmax(q k^T + bias) v, no 1/sqrt(D) (T5), fp32 softmax
    scores = q @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


def qkv_and_bias(B=3, H=2, Q=7, K=9, D=4, per_row_bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g, requires_grad=True) for n in (Q, K, K))
    bias = torch.randn(B if per_row_bias else 1, H, Q, K, generator=g, requires_grad=True)
    return q, k, v, bias


@pytest.mark.parametrize("per_row_bias", [False, True])
def test_cpu_training_kernel_equals_the_formula_forward_and_backward(per_row_bias):
    q, k, v, bias = qkv_and_bias(per_row_bias=per_row_bias)
    ref = reference(q, k, v, bias)
    out = attend(q, k, v, AttentionBias("sdpa", dense=bias))
    assert type(out.grad_fn).__name__ == "_BiasedAttentionBackward"  # the kernel under test did run
    torch.testing.assert_close(out, ref, **TOL)
    for got, want in zip(grads_of(out, (q, k, v, bias)), grads_of(ref, (q, k, v, bias))):
        torch.testing.assert_close(got, want, **TOL)


def test_cpu_training_kernel_handles_masked_positions_and_non_contiguous_inputs():
    # Heads split from (B, L, H*D) are strided views, as in the model; masked keys get finfo.min.
    B, L, H, D = 2, 6, 3, 4
    x = torch.randn(B, L, H * D, requires_grad=True)
    heads = x.view(B, L, H, D).transpose(1, 2)
    table = torch.randn(1, H, L, L, requires_grad=True)
    bias = table.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    out = _BiasedAttention.apply(heads, heads, heads, bias)
    ref = reference(heads, heads, heads, bias)
    torch.testing.assert_close(out, ref, **TOL)
    got, want = grads_of(out, (x, table)), grads_of(ref, (x, table))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    assert got[1].triu(1).abs().sum() == 0 and got[1].tril().abs().sum() > 0  # masked: no gradient


def test_sdpa_takes_torch_kernels_without_a_bias_gradient_or_with_dropout():
    q, k, v, bias = qkv_and_bias()
    with torch.no_grad():  # inference: torch's fused SDPA kernel with the float mask
        out = attend(q, k, v, AttentionBias("sdpa", dense=bias))
        torch.testing.assert_close(out, reference(q, k, v, bias), **TOL)
    dropped = attend(q, k, v, AttentionBias("sdpa", dense=bias), dropout_p=0.5)  # SDPA does the dropout
    assert type(dropped.grad_fn).__name__ != "_BiasedAttentionBackward"
    dropped.sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def attention_pair():
    torch.manual_seed(0)
    config = tiny_config(num_heads=3, d_kv=8)
    plain = Attention(config)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.3)
    twin = Attention(config)
    twin.load_state_dict(plain.state_dict())
    twin.__class__ = FastAttention
    return plain, twin


def test_attention_twin_equals_the_plain_module_self_and_cross():
    # (bf16 autocast: test_fast_feed_forward's fused_linear test and the whole converted model's, test_fast_converter)
    plain, twin = attention_pair()
    g = torch.Generator().manual_seed(2)
    x, enc = torch.randn(2, 5, 32, generator=g, requires_grad=True), torch.randn(2, 7, 32, generator=g)
    self_bias = torch.randn(1, 3, 5, 5, generator=g).requires_grad_()  # a learned bias: the CPU kernel
    cross_bias = torch.zeros(2, 1, 1, 7)
    cross_bias[1, ..., 4:] = torch.finfo(torch.float32).min  # the second row's source is 4 tokens long
    for bias, context in ((self_bias, None), (cross_bias, enc), (None, enc)):
        ref = plain(x, bias, context=context)
        out = twin(x, AttentionBias("sdpa", dense=bias), context=context)
        if bias is self_bias:
            assert autograd_kinds(out) == {"_BiasedAttentionBackward"}
        torch.testing.assert_close(out, ref, **TOL)
        extra = [bias] if bias is not None and bias.requires_grad else []
        got = grads_of(out, [x, *twin.parameters(), *extra])
        want = grads_of(ref, [x, *plain.parameters(), *extra])
        for a, w in zip(got, want):
            assert (a is None) == (w is None)
            if w is not None:
                torch.testing.assert_close(a, w, **TOL)


def test_attention_twin_takes_a_plain_dense_bias_and_cached_keys():
    plain, twin = attention_pair()
    x, enc = torch.randn(2, 1, 32), torch.randn(2, 7, 32)
    with torch.no_grad():
        kv = twin.project_kv(enc)
        for a, b in zip(kv, plain.project_kv(enc)):
            torch.testing.assert_close(a, b, **TOL)
        bias = torch.randn(1, 3, 1, 7)
        torch.testing.assert_close(twin(x, bias, kv=kv), plain(x, bias, kv=kv), **TOL)  # a dense tensor, as a plain stack gives


def test_converted_model_training_step_matches_hf_loss_and_gradients():
    # The training path (the CPU bias kernel, the fused residual, the chunked lm_head/cross-entropy) against transformers.
    config = t5forge_config("v1_1-gated-gelu-untied")
    hf = hf_reference(config).train()
    model = twin(hf, config, "sdpa").train()
    _, loss_fn, _ = fast.apply(model, TokenNLL(), device="cpu")
    input_ids, attention_mask, labels = padded_batch(config.vocab_size)
    ref = hf(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    ref.backward()
    loss = seq2seq_loss(model, "mean", loss_fn, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    loss.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    hf_grads = dict(hf.named_parameters())
    pairs = {"encoder.position.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             "decoder.position.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             "encoder.blocks.1.attn.q.weight": "encoder.block.1.layer.0.SelfAttention.q.weight",
             "encoder.blocks.0.attn_norm.weight": "encoder.block.0.layer.0.layer_norm.weight",
             "lm_head.weight": "lm_head.weight", "shared.weight": "shared.weight"}
    ours = dict(model.named_parameters())
    for mine, theirs in pairs.items():
        want = hf_grads[theirs].grad
        assert (ours[mine].grad - want).abs().max() <= 1e-5 * want.abs().max(), mine


# ------------------------------------------------------------------ FlexAttention
def test_flex_forward_on_cpu_equals_the_plain_model_with_padding_and_causal_mask():
    config = t5forge_config("deeper-decoder")
    hf = hf_reference(config)
    plain, flex = twin(hf, config, "eager"), twin(hf, config, "flex", converted=True)
    assert flex.encoder.bias_forms and flex.decoder.bias_forms
    input_ids, attention_mask, labels = padded_batch(config.vocab_size)
    kwargs = {"decoder_input_ids": plain.shift_right(labels),
              "decoder_attention_mask": torch.ones_like(labels).masked_fill(labels == -100, 0)}
    with torch.no_grad():
        ref = plain(input_ids, attention_mask, **kwargs)
        out = flex(input_ids, attention_mask, **kwargs)
    torch.testing.assert_close(out.encoder_hidden_states, ref.encoder_hidden_states, **TOL)
    torch.testing.assert_close(out.hidden, ref.hidden, **TOL)


def test_flex_bias_is_a_score_mod_and_block_mask_not_a_dense_tensor():
    table, buckets = torch.randn(8, 2), torch.randint(0, 8, (5, 5))
    score_mod, block_mask = flex_bias(5, 5, table, buckets)
    assert score_mod is not None and block_mask is None
    _, block_mask = flex_bias(5, 5, table, buckets, torch.ones(3, 5, dtype=torch.long), causal=True)
    assert block_mask is not None
    score_mod, block_mask = flex_bias(5, 7, key_padding_mask=torch.ones(3, 7))
    assert score_mod is None and block_mask is not None


def test_flex_generation_matches_the_plain_model():
    config = t5forge_config("v1_0-relu-tied")
    hf = hf_reference(config)
    input_ids, attention_mask = generation_batch(config.vocab_size)
    ref = twin(hf, config, "eager").generate(input_ids, attention_mask, max_new_tokens=6)
    out = twin(hf, config, "flex", converted=True).generate(input_ids, attention_mask, max_new_tokens=6)
    assert torch.equal(out, ref)


def test_flex_refuses_cpu_training_and_dropout_with_one_clear_error():
    ids = torch.randint(2, 100, (2, 8))
    for rate, message in ((0.0, "only on a GPU"), (0.1, "no attention dropout")):
        model = T5(tiny_config(vocab_size=100, attention_backend="flex", dropout_rate=rate)).train()
        fast.apply(model, None, device="cpu")
        with pytest.raises(T5ForgeError, match=message):
            model(ids, labels=ids)


def _bucket_attention_problem(B, H, Q, D, dtype, seed):
    """q, k, v and a learned (32, H) bias table over random buckets, on CUDA, as T5's self-attention."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, H, Q, D, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(3))
    table = (torch.randn(32, H, device="cuda", generator=g) * 3).requires_grad_()
    buckets = torch.randint(0, 32, (Q, Q), device="cuda", generator=g)
    pad = torch.ones(B, Q, dtype=torch.bool, device="cuda")
    pad[0, Q // 2:] = False  # one padded row: the block mask is exercised too
    return q, k, v, table, buckets, pad


def _fp32_reference(q, k, v, table, buckets, pad):
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v, table)]
    bias = F.embedding(buckets, leaves[3]).permute(2, 0, 1)[None]
    bias = bias.masked_fill(~pad[:, None, None, :], torch.finfo(torch.float32).min)
    return reference(*leaves[:3], bias), leaves


def _rel_err(x, ref):
    return ((x.float() - ref).norm() / ref.norm()).item()


# Compiled FlexAttention needs head dims of at least 16; (B, H, Q, D) here compile, the last is
# T5-base's 12 heads of 64 at bf16. Its learned-bias backward has had wrong-gradient bugs upstream,
# so the table's gradient is checked against an fp32 reference along with the output.
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs CUDA")
@pytest.mark.parametrize("shape,dtype,tol", [((2, 4, 128, 16), torch.float32, 1e-4),
                                             ((2, 12, 256, 64), torch.bfloat16, 2e-2)])
def test_flex_bias_table_gradient_on_gpu_equals_fp32_reference(shape, dtype, tol):
    q, k, v, table, buckets, pad = _bucket_attention_problem(*shape, dtype, seed=0)
    ref, leaves = _fp32_reference(q, k, v, table, buckets, pad)
    score_mod, block_mask = flex_bias(shape[2], shape[2], table, buckets, key_padding_mask=pad)
    out = flex_attention(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)
    grad_out = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    got = torch.autograd.grad(out, (q, k, v, table), grad_out.to(dtype))
    want = torch.autograd.grad(ref, leaves, grad_out)
    assert _rel_err(out, ref) <= tol
    for name, a, b in zip("qkv", got[:3], want[:3]):
        assert _rel_err(a, b) <= tol, name
    assert _rel_err(got[3], want[3]) <= tol, "relative-bias table gradient"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs CUDA")
def test_flex_model_backward_on_gpu_equals_the_plain_model():
    # T5 at head dim 16 (compiled FlexAttention's smallest), fp32: loss and every gradient.
    from t5forge.model.config import T5Config

    torch.manual_seed(0)
    plain = T5(T5Config.from_name("tiny", vocab_size=300, d_kv=16, dropout_rate=0.0)).cuda().train()
    flex = T5(T5Config.from_name("tiny", vocab_size=300, d_kv=16, dropout_rate=0.0,
                                 attention_backend="flex")).cuda().train()
    flex.load_state_dict(plain.state_dict())
    _, loss_fn, _ = fast.apply(flex, TokenNLL(), device="cuda")
    ids = torch.randint(2, 300, (3, 32), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    labels = torch.randint(2, 300, (3, 16), device="cuda")
    labels[0, 10:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    losses = [seq2seq_loss(plain, **batch), seq2seq_loss(flex, "mean", loss_fn, **batch)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(plain.named_parameters(), flex.parameters()):
        assert (q.grad - p.grad).abs().max() <= 1e-4 * p.grad.abs().max(), name
