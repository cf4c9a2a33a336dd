"""Plain models and their converted copies (model/fast/) on the same weights, and the batches and
comparisons the twin tests share (imported by tests/model/test_fast_*.py)."""

import copy

import torch

from t5forge.model import fast
from t5forge.model.config import T5Config
from t5forge.model.loss import TokenNLL
from t5forge.model.t5 import T5

TOL = {"rtol": 1e-5, "atol": 1e-5}


def tiny_config(**overrides) -> T5Config:
    base = dict(vocab_size=96, d_model=32, d_ff=48, num_heads=2, d_kv=16, num_layers=2, num_decoder_layers=3,
                dropout_rate=0.0, feed_forward_proj="gated-gelu")
    return T5Config(**{**base, **overrides})


def plain_and_converted(config: T5Config, seed: int = 0, elementwise: bool = False):
    """(plain T5, its deep copy with the twins swapped in, the twins' TokenNLL) on equal weights."""
    torch.manual_seed(seed)
    plain = T5(config)
    model, loss, _ = fast.apply(copy.deepcopy(plain), TokenNLL(), device="cpu", elementwise=elementwise)
    return plain, model, loss


def padded_batch(vocab: int = 96, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = torch.randint(2, vocab, (3, 6), generator=g)
    labels[2, 4:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def summed_nll(model, loss, batch) -> torch.Tensor:
    """The training step's token loss: the model's hidden states through `loss` (TokenNLL or its twin)."""
    return loss(*model.output_projection(model(**batch).hidden), batch["labels"])


def assert_same_gradients(model, reference, rel: float = 1e-5, rel_by_suffix: dict | None = None):
    """Every parameter's gradient within rel x that tensor's largest reference gradient (float
    rounding: the twins sum in another order); `rel_by_suffix` gives parameters whose name ends so
    their own bound."""
    grads = dict(model.named_parameters())
    assert set(grads) == {n for n, _ in reference.named_parameters()}
    for name, p in reference.named_parameters():
        got = grads[name].grad
        assert got is not None, name
        bound = next((r for end, r in (rel_by_suffix or {}).items() if name.endswith(end)), rel)
        assert (got - p.grad).abs().max() <= bound * max(p.grad.abs().max(), 1e-3), name


def assert_converted_equals_plain(model, loss, plain, batch=None, **bounds):
    """The converted model's training loss (through its `loss`) and every gradient equal the plain
    model's on `batch` (default padded_batch()); `bounds` go to assert_same_gradients."""
    batch = padded_batch() if batch is None else batch
    ref = summed_nll(plain, TokenNLL(), batch)
    ref.backward()
    out = summed_nll(model, loss, batch)
    out.backward()
    torch.testing.assert_close(out, ref, **TOL)
    assert_same_gradients(model, plain, **bounds)


def grads_of(out, inputs, seed: int = 1):
    """Gradients of `out` against a fixed random upstream gradient, for each of `inputs`."""
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=g).to(out.dtype)
    return torch.autograd.grad(out, inputs, upstream, retain_graph=True, allow_unused=True)


def autograd_kinds(t: torch.Tensor, contains: str = "Attention") -> set[str]:
    """The names of the autograd nodes behind `t` that contain `contains` (which kernels ran)."""
    seen, todo, kinds = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        kinds.add(type(fn).__name__)
        todo += [nxt for nxt, _ in fn.next_functions]
    return {k for k in kinds if contains in k}


def assert_close_scaled(got, want, rel: float = 1e-5):
    """Each pair of gradients equal within rel x the reference's largest element (the model tests'
    rule: float rounding of sums in another order scales with the tensor)."""
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), i
        if b is not None:
            assert (a - b).abs().max() <= rel * max(b.abs().max(), 1e-3), i
