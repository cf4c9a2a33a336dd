"""torch.compile of the whole model (model.compile=true, the GPU recipe) trains like eager: the
custom autograd functions (chunked cross-entropy, RMSNorm, CPU attention) must trace. One compile
on CPU, ~30 s."""

import pytest
import torch

from t5forge.model.config import T5Config
from t5forge.model.t5 import T5

# torch's own modules, imported by the compiler, warn about their deprecated APIs.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    model = T5(T5Config.from_name("tiny", vocab_size=300, dropout_rate=0.0)).train()
    ids, labels = torch.randint(2, 300, (3, 11)), torch.randint(2, 300, (3, 5))
    labels[0, 3:] = -100
    compiled = torch.compile(model)
    loss = compiled(ids, labels=labels, loss_reduction="sum").loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(ids, labels=labels, loss_reduction="sum").loss
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    for name, p in model.named_parameters():
        scale = p.grad.abs().max()
        assert (grads[name] - p.grad).abs().max() <= 1e-4 * scale + 1e-6, name
