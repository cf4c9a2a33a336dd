"""The RMSNorm twin (fast/norm.py) against the plain RMSNorm: forward and backward (input and weight
gradients), fp32 and bf16 weights; `add_forward`, the fused residual's add + norm."""

import pytest
import torch
from fast_cases import TOL, grads_of

from t5forge.model.fast.norm import FastRMSNorm
from t5forge.model.t5 import RMSNorm


def norms(weight_dtype=torch.float32, dim=16):
    torch.manual_seed(0)
    plain = RMSNorm(dim, eps=1e-6).to(weight_dtype)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
    twin = RMSNorm(dim, eps=1e-6).to(weight_dtype)
    twin.load_state_dict(plain.state_dict())
    twin.__class__ = FastRMSNorm
    return plain, twin


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_twin_equals_the_plain_norm_forward_and_backward(weight_dtype):
    plain, twin = norms(weight_dtype)
    x = torch.randn(2, 5, 16, requires_grad=True)
    out = twin(x)
    assert type(out.grad_fn).__name__ == "_RMSNormFunctionBackward"  # the written-out backward ran
    ref = plain(x)
    assert out.dtype == ref.dtype == weight_dtype  # bf16 weights: bf16 output, as HF
    # bf16 weights: the reference in fp32 arithmetic (a bf16 reference would only add its own rounding).
    if weight_dtype == torch.bfloat16:
        ref_norm = RMSNorm(16, eps=1e-6)
        ref_norm.weight = torch.nn.Parameter(plain.weight.detach().float())
        ref, ref_params = ref_norm(x), (x, ref_norm.weight)
    else:
        ref_params = (x, plain.weight)
    tol = TOL if weight_dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    got, want = grads_of(out, (x, twin.weight)), grads_of(ref, ref_params)
    assert got[0].dtype == torch.float32 and got[1].dtype == weight_dtype
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), **tol)


def test_rmsnorm_twin_add_forward_is_the_residual_add_then_the_norm():
    plain, twin = norms()
    x, delta = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 16, requires_grad=True)
    total, normed = twin.add_forward(x, delta)
    ref_total = x + delta
    ref = plain(ref_total)
    torch.testing.assert_close(total, ref_total, rtol=0, atol=0)
    torch.testing.assert_close(normed, ref, **TOL)
    for g, w in zip(grads_of(total + normed, (x, delta, twin.weight)), grads_of(ref_total + ref, (x, delta, plain.weight))):
        torch.testing.assert_close(g, w, **TOL)
    same, normed = twin.add_forward(x, None)  # nothing pending: the stream as it is
    assert same is x
    torch.testing.assert_close(normed, plain(x), **TOL)

