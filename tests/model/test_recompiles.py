"""A compiled (converted) model compiles once: nothing inside a traced region may mutate Python state (a
global written while tracing invalidates the graph's guards, and step 2 recompiles). Counted with
torch._dynamo's CompileCounter backend, which records each graph without running inductor."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from t5forge.model import fast
from t5forge.model.config import T5Config
from t5forge.model.fast.flex import flex_attention, flex_bias
from t5forge.model.loss import TokenNLL
from t5forge.model.t5 import T5

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, labels = torch.randint(2, 300, (3, 11), generator=g), torch.randint(2, 300, (3, 5), generator=g)
    labels[0, 3:] = -100
    return ids, labels


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_compiled_training_step_compiles_once_over_three_steps(backend):
    torch.manual_seed(0)
    model = T5(T5Config.from_name("tiny", vocab_size=300, dropout_rate=0.0, attention_backend=backend)).train()
    model, loss_fn, _ = fast.apply(model, TokenNLL(), device="cpu", compiled=True)
    counter = CompileCounter()
    step = torch.compile(model, backend=counter)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        ids, labels = batch(i)
        loss_fn(*model.output_projection(step(ids, labels=labels).hidden), labels).backward()  # as train_step
        opt.step()
        opt.zero_grad()
        if i == 0:
            graphs = counter.frame_count
    assert graphs >= 1
    assert counter.frame_count == graphs, "steps 2-3 recompiled"


def test_flex_model_forward_compiles_once():
    model = T5(T5Config.from_name("tiny", vocab_size=300, dropout_rate=0.0, attention_backend="flex")).eval()
    fast.apply(model, None, device="cpu", compiled=True)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for i in range(3):
            ids, labels = batch(i)
            compiled(ids, labels=labels)
            if i == 0:
                graphs = counter.frame_count
    assert counter.frame_count == graphs, "steps 2-3 recompiled"


def test_gpu_flex_entry_point_mutates_nothing_while_traced():
    # The CUDA branch of flex_attention is the one that caches a compiled kernel; traced (here on
    # CPU tensors, the device argument is only a constant) it must hand back the plain function.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 16, generator=g) for _ in range(3))
    table, buckets = torch.randn(32, 2, generator=g), torch.randint(0, 32, (16, 16), generator=g)

    def attend(q, k, v):
        score_mod, _ = flex_bias(16, 16, table, buckets)
        return flex_attention(torch.device("cuda"))(q, k, v, score_mod=score_mod, scale=1.0)

    counter = CompileCounter()
    fn = torch.compile(attend, backend=counter, fullgraph=True)
    for _ in range(3):
        fn(q, k, v)
    assert counter.frame_count == 1
