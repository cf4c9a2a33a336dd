"""torch.compile of the converted model (model.compile=true, the GPU recipe) trains like eager: the
twins' custom autograd functions (chunked cross-entropy, RMSNorm, CPU attention) must trace, and so
must the blocks under activation checkpointing (model/activation_checkpointing.py). One compile of a
one-layer model and its loss twin on CPU per case."""

import pytest
import torch

from t5forge.model import activation_checkpointing, fast
from t5forge.model.config import T5Config
from t5forge.model.loss import TokenNLL
from t5forge.model.t5 import T5

# torch's own modules, imported by the compiler, warn about their deprecated APIs.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_compiled_training_step_matches_eager(checkpointing):
    torch.manual_seed(0)
    # One layer per stack: the compile time grows with the unrolled layers, the traced code does not.
    model = T5(T5Config.from_name("tiny", vocab_size=300, dropout_rate=0.0, num_layers=1)).train()
    model, loss_fn, _ = fast.apply(model, TokenNLL(), device="cpu", compiled=True)
    activation_checkpointing.apply(model, checkpointing)
    ids, labels = torch.randint(2, 300, (3, 11)), torch.randint(2, 300, (3, 5))
    labels[0, 3:] = -100

    def step(ids, labels):
        return loss_fn(*model.output_projection(model(ids, labels=labels).hidden), labels)

    loss = torch.compile(step)(ids, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = step(ids, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    for name, p in model.named_parameters():
        scale = p.grad.abs().max()
        assert (grads[name] - p.grad).abs().max() <= 1e-4 * scale + 1e-6, name
