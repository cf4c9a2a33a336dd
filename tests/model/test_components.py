"""Components chosen by name (model/components.py): the registries, their errors, and the worked
example of docs/architecture.md, Primer's squared-ReLU feed-forward, from the class to a run."""

import json

import pytest
import torch
import torch.nn.functional as F

from t5forge.cli import main
from t5forge.config_files import load_config
from t5forge.errors import T5ForgeError
from t5forge.model.components import REGISTRIES
from t5forge.model.config import T5Config
from t5forge.model.feed_forwards import SquaredReLUFeedForward
from t5forge.model.load import load_model
from t5forge.model.t5 import T5

TINY = T5Config.from_name("tiny", dropout_rate=0.0)


@pytest.mark.parametrize("gated", [True, False])
def test_squared_relu_is_relu_squared_in_t5s_feed_forward(gated):
    config = TINY.replace(feed_forward="squared_relu", feed_forward_proj="gated-gelu" if gated else "relu")
    torch.manual_seed(0)
    ff = SquaredReLUFeedForward(config)
    x = torch.randn(2, 5, config.d_model, requires_grad=True)
    if gated:
        want = ff.wo(F.relu(ff.wi_0(x)) ** 2 * ff.wi_1(x))
    else:
        want = ff.wo(F.relu(ff.wi(x)) ** 2)
    torch.testing.assert_close(ff(x), want)


def test_a_model_with_the_component_has_dense_t5s_parameters():
    dense, squared = T5(TINY), T5(TINY.replace(feed_forward="squared_relu"))
    assert {n: p.shape for n, p in dense.named_parameters()} == {n: p.shape for n, p in squared.named_parameters()}
    assert all(type(b.ff) is SquaredReLUFeedForward for b in [*squared.encoder.blocks, *squared.decoder.blocks])


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_an_unknown_component_names_its_kind_and_the_known_ones(kind):
    with pytest.raises(T5ForgeError, match=rf"model.{kind} 'nope' is unknown; known: {', '.join(sorted(REGISTRIES[kind]))}"):
        TINY.replace(**{kind: "nope"})


def test_the_run_config_chooses_the_component(tmp_path, tiny_pretrain_args):
    with pytest.raises(T5ForgeError, match="model.feed_forward='nope': is unknown; known: dense, squared_relu, switch"):
        load_config(["task=pt_tiny", "model.feed_forward=nope"])
    out = tmp_path / "run"
    assert main(tiny_pretrain_args(out, "model.feed_forward=squared_relu")) == 0
    saved = json.loads(next((out / "checkpoints").glob("step-*/model_config.json")).read_text())
    assert saved["feed_forward"] == "squared_relu"
    model, _ = load_model(out)
    assert type(model.encoder.blocks[0].ff) is SquaredReLUFeedForward
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert losses[-1] < losses[0]
