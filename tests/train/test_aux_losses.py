"""The auxiliary-loss channel: a component's own loss term reaches the optimizer step and the log,
and held-out evaluation stays the pure token NLL."""

import json

import pytest
import torch
from torch import nn

from t5forge.cli import main
from t5forge.eval.loss import evaluate_loss
from t5forge.model import components
from t5forge.model.config import T5Config
from t5forge.model.load import load_model
from t5forge.model.loss import seq2seq_loss
from t5forge.model.outputs import AuxLoss
from t5forge.model.t5 import T5, FeedForward
from t5forge.train.loop import train_step

TARGET, WEIGHT = 3.0, 0.5


class PulledFeedForward(FeedForward):
    """T5's dense feed-forward plus a parameter that only its auxiliary loss reads: (pull - 3)^2."""

    def __init__(self, config):
        super().__init__(config)
        self.pull = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        self.aux_losses = {"pull": AuxLoss((self.pull - TARGET) ** 2, WEIGHT)}
        return super().forward(x)


@pytest.fixture
def pulled(monkeypatch):
    monkeypatch.setitem(components.FEED_FORWARDS, "pulled", PulledFeedForward)


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 128, (2, 12), generator=g),
             "labels": torch.randint(3, 128, (2, 5), generator=g)} for _ in range(n)]


def test_aux_loss_moves_its_parameter_and_not_the_token_loss(pulled):
    config = T5Config.from_name("tiny", vocab_size=128, dropout_rate=0.0, feed_forward="pulled")
    torch.manual_seed(0)
    model = T5(config)
    micro = batches()
    with torch.no_grad():
        nll_before = sum(float(seq2seq_loss(model, "sum", **b)) for b in micro)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss_sum, _, _, finite, aux = train_step(model, opt, micro, 1.0, grad_clip=0.0, device=torch.device("cpu"))
    assert bool(finite)
    # The step's NLL is the token loss alone; each of the 4 blocks' terms is (0 - 3)^2, summed by name.
    assert float(loss_sum) == pytest.approx(nll_before, rel=1e-6)
    assert set(aux) == {"pull"} and float(aux["pull"]) == pytest.approx(4 * TARGET**2)
    # d(weight * (p - 3)^2)/dp at p = 0 is -3 (averaged over the two micro-batches): SGD at lr 1 lands on 3.
    pulls = [m.pull.item() for m in model.modules() if isinstance(m, PulledFeedForward)]
    assert pulls == pytest.approx([TARGET] * 4)
    assert all(not getattr(m, "aux_losses", {}) for m in model.modules())  # each term counted once


def test_aux_loss_is_logged_and_eval_loss_stays_the_token_nll(pulled, tmp_path, tiny_pretrain_args):
    out = tmp_path / "run"
    assert main(tiny_pretrain_args(out, "model.feed_forward=pulled")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert all("aux_pull" in r for r in train)
    assert train[-1]["aux_pull"] < train[0]["aux_pull"]  # the optimizer pulls towards 3
    model, _ = load_model(out)
    assert all(abs(m.pull.item()) > 0 for m in model.modules() if isinstance(m, PulledFeedForward))

    # The logged eval_loss is the NLL of the same weights without the auxiliary module: a dense T5
    # holding them scores the held-out batches the same.
    last_eval = [r for r in records if r["kind"] == "eval"][-1]
    dense = T5(model.config.replace(feed_forward="dense"))
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(".pull")})
    held_out = _held_out_batches(out)
    for m in (model, dense):
        got = evaluate_loss(m, held_out, torch.device("cpu"))["eval_loss"]
        assert got == pytest.approx(last_eval["eval_loss"], rel=1e-5)


def _held_out_batches(run_dir):
    """The run's own held-out batches, as its evaluation read them (eval.steps of them)."""
    import itertools

    from t5forge.config_files import load_config
    from t5forge.plan import make_plan
    from t5forge.tokenizer import load_tokenizer
    from t5forge.distributed import World
    from t5forge.train.pretrain import build_loader

    cfg = load_config([f"config={run_dir / 'config.yaml'}"])
    loader = build_loader(cfg, make_plan(cfg), load_tokenizer(cfg.data.tokenizer), World(), "validation")
    return list(itertools.islice(iter(loader), cfg.eval.steps))
