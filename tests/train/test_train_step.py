"""One optimizer step with gradient accumulation equals one big batch: the loss is normalised by
the target tokens of the whole step, not averaged per micro-batch (nanoT5's bias)."""

import torch

from t5forge.model.config import T5Config
from t5forge.model.loss import seq2seq_loss
from t5forge.model.t5 import T5
from t5forge.train.loop import train_step


def make_batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (4, 12), generator=g)
    labels = torch.randint(3, 100, (4, 6), generator=g)
    labels[0, 1:] = -100  # micro-batch 1 holds 1 + 5 target tokens,
    labels[1, 5:] = -100
    labels[2:, 2:] = -100  # micro-batch 2 holds 2 + 2: unequal, so the two normalisations differ
    return [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]


def step(batches, model):
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # params after = params before - grad
    loss_sum, n, *_ = train_step(model, opt, batches, 1.0, grad_clip=0.0, device=torch.device("cpu"))
    return {k: v.clone() for k, v in model.state_dict().items()}, float(loss_sum), float(n)


def test_accumulated_step_equals_one_big_batch():
    torch.manual_seed(0)
    base = T5(T5Config.from_name("tiny", vocab_size=128, dropout_rate=0.0))
    micro = make_batches()
    big = [{k: torch.cat([b[k] for b in micro]) for k in micro[0]}]

    after_micro, loss_micro, n_micro = step(micro, _copy(base))
    after_big, loss_big, n_big = step(big, _copy(base))
    assert n_micro == n_big == 10
    assert abs(loss_micro - loss_big) < 1e-4
    for k in after_big:
        torch.testing.assert_close(after_micro[k], after_big[k], rtol=1e-5, atol=1e-6)

    # The per-micro-batch mean (nanoT5) gives a different update on the same data.
    nano = _copy(base)
    for b in micro:
        (seq2seq_loss(nano, **b) / len(micro)).backward()
    with torch.no_grad():
        for p in nano.parameters():
            p -= p.grad
    diff = max((nano.state_dict()[k] - after_big[k]).abs().max().item() for k in after_big)
    assert diff > 1e-3


def _copy(model):
    clone = T5(model.config)
    clone.load_state_dict(model.state_dict())
    return clone


def test_clip_gradients_matches_torch_clip_grad_norm():
    from t5forge.train.loop import clip_gradients

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(50, 20, generator=g), torch.randn(7, generator=g)]  # total norm ~32
    for max_norm in (0.0, 1.0, 100.0):  # no limit, clipping, a limit above the norm
        ours, ref = ([torch.nn.Parameter(torch.zeros_like(x)) for x in grads] for _ in range(2))
        for a, b, x in zip(ours, ref, grads):
            a.grad, b.grad = x.clone(), x.clone()
        norm = clip_gradients(ours, max_norm)
        want = torch.nn.utils.clip_grad_norm_(ref, max_norm if max_norm > 0 else float("inf"))
        torch.testing.assert_close(norm, want)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0.0)
        assert (max_norm == 1.0) == (float(sum(p.grad.square().sum() for p in ours)) ** 0.5 < 1.01)
