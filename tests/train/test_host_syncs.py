"""A training step without host reads: counted with a TorchDispatchMode on CPU, where the
device-agnostic path (host_reads=False, AdamWScale's foreach implementation) is the one CUDA takes."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from t5forge.model.config import T5Config
from t5forge.model.t5 import T5
from t5forge.optim.adamw_scale import AdamWScale
from t5forge.train.loop import clip_gradients, count_targets, train_step

HOST_READS = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero"}


class CountHostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def batches():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(3, 100, (2, 6), generator=g)
    labels[0, 3:] = -100
    return [{"input_ids": torch.randint(3, 100, (2, 12), generator=g), "labels": labels}]


def test_the_counter_sees_a_host_read():
    with CountHostReads() as mode:
        float(torch.ones(3).sum())
    assert mode.reads


def test_train_step_without_host_reads():
    torch.manual_seed(0)
    model = T5(T5Config.from_name("tiny", vocab_size=128, dropout_rate=0.0))
    opt = AdamWScale(model.parameters(), lr=1e-2, implementation="foreach")
    data = batches()
    n = count_targets(data)  # host batches: counted before they reach the device
    before = [p.detach().clone() for p in model.parameters()]
    # grad_clip=1e-3: the norm is over the limit, so clipping runs too.
    with CountHostReads() as mode:
        for _ in range(2):
            loss, targets, norm, finite, _ = train_step(model, opt, data, 1e-2, grad_clip=1e-3,
                                                     device=torch.device("cpu"), local_targets=n, host_reads=False)
    assert mode.reads == []
    assert bool(finite) and targets == n
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_optimizer_and_clip_have_no_host_reads():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(8, 4), (4,), (3, 3)]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = AdamWScale(params, lr=1e-2, weight_decay=0.1, implementation="foreach")
    with CountHostReads() as mode:
        clip_gradients(params, 0.5, host_reads=False)
        opt.step()
        opt.step()
    assert mode.reads == []


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_masked_steps_equal_the_loop_without_the_skipped_steps(wd):
    # Steps 1 and 3 are skipped with NaN gradients (found_inf = 1), on the device: the result is the
    # reference loop run on the applied steps only, step counts (bias correction) included.
    torch.manual_seed(0)
    shapes, dtypes = [(16, 8), (8,), (4, 4)], [torch.float32, torch.float32, torch.bfloat16]
    ref = [torch.nn.Parameter(torch.randn(s).to(d)) for s, d in zip(shapes, dtypes)]
    got = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt_ref = AdamWScale(ref, lr=1e-2, weight_decay=wd, implementation="loop")
    opt = AdamWScale(got, lr=1e-2, weight_decay=wd, implementation="foreach")
    for i in range(5):
        skip = i in (0, 2)
        grads = [torch.randn(p.shape).to(p.dtype) for p in ref]
        for a, b, g in zip(ref, got, grads):
            a.grad, b.grad = g.clone(), (torch.full_like(g, float("nan")) if skip else g.clone())
        with CountHostReads() as mode:
            opt.step(found_inf=torch.tensor(1.0 if skip else 0.0))
        assert mode.reads == []
        if not skip:
            opt_ref.step()
    for a, b in zip(ref, got):
        tol = {"rtol": 1e-5, "atol": 1e-6} if a.dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        torch.testing.assert_close(b.float(), a.float(), **tol)
    assert [float(opt.state[p]["step"]) for p in got] == [3.0] * 3
    # A checkpoint of it loads into an optimizer that continues unmasked.
    again = AdamWScale(got, lr=1e-2, weight_decay=wd)
    again.load_state_dict(opt.state_dict())
    for a, b in zip(ref, got):
        g = torch.randn(a.shape).to(a.dtype)
        a.grad, b.grad = g.clone(), g.clone()
    opt_ref.step()
    again.step()
    for a, b in zip(ref, got):
        tol = {"rtol": 1e-5, "atol": 1e-6} if a.dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        torch.testing.assert_close(b.float(), a.float(), **tol)
