"""DDP on two gloo processes through the run's own wiring (train/setup.py training_model, loop.train_step):
activation checkpointing full / selective takes bit-identical steps to none (dropout on), and the
twins' compiled CPU elementwise stretches (model/fast/compiled.py), on activations above their size
threshold, train like eager DDP -- with activation checkpointing as well."""

import collections

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from t5forge.config_files import load_config
from t5forge.distributed import World
from t5forge.model.config import T5Config
from t5forge.model.fast import compiled as fused
from t5forge.model.t5 import T5
from t5forge.optim.build import build_optimizer
from t5forge.train.loop import train_step
from t5forge.train.setup import training_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# (activation checkpointing, compiled elementwise stretches)
ARMS = [("none", False), ("full", False), ("selective", False), ("none", True), ("full", True)]
STEPS = 2
# The encoder's residual stream, 4 x 400 x 256 = 409,600 elements a rank, and its gated activation
# (4 x 400 x 512) are above fused.MIN_ELEMENTS (400k), so the stretches run compiled there.
B, S, T = 4, 400, 16
CONFIG = dict(vocab_size=128, d_model=256, d_ff=512, num_heads=4, d_kv=64, num_layers=2, dropout_rate=0.1,
              feed_forward_proj="gated-gelu")


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    ids = torch.randint(2, 128, (B, S), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 300:] = 0
    labels = torch.randint(2, 128, (B, T), generator=g)
    labels[2, 10:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _worker(rank, world_size, init_file, out_file):
    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1  # compile in this process: no worker pool in a forked child
    calls = collections.Counter()
    call = fused.Compiled.__call__

    def counted(self, *args):  # which compiled stretches this process runs
        calls[self.fn.__name__] += 1
        return call(self, *args)

    fused.Compiled.__call__ = counted
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    world, cpu = World(rank=rank, local_rank=rank, world_size=world_size), torch.device("cpu")
    results = {}
    try:
        for mode, elementwise in ARMS:
            cfg = load_config(["model.name=tiny", f"model.activation_checkpointing={mode}",
                               f"model.compile_elementwise={str(elementwise).lower()}", "model.compile=false"])
            torch.manual_seed(0)  # identical replicas
            model = T5(T5Config(**CONFIG)).train()
            training, loss_fn = training_model(model, cfg, world, cpu)
            assert isinstance(training, torch.nn.parallel.DistributedDataParallel)
            optimizer = build_optimizer(model, cfg.optim)
            torch.manual_seed(100 + rank)  # dropout differs by rank
            losses = []
            for step in range(STEPS):
                out = train_step(training, optimizer, [_batch(rank, step)], 1e-3, grad_clip=1.0, device=cpu,
                                 world=world, loss_fn=loss_fn)
                losses.append(out.loss_sum)
            results[(mode, elementwise)] = {"losses": torch.stack(losses),
                                            "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        failed = [c.fn.__name__ for c in (fused.compiled_rms_norm, fused.compiled_add_rms_norm, fused.compiled_gated)
                  if c.failed]
        torch.save({"results": results, "calls": dict(calls), "failed": failed}, out_file)


def test_ddp_checkpointing_and_compiled_stretches_equal_eager_ddp(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # import torch._dynamo once, before the fork
    out = tmp_path / "results.pt"
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, start_method="fork")
    saved = torch.load(out, weights_only=False)
    results = saved["results"]
    # the compiled stretches ran (forward, with gradients) and none fell back to eager
    assert not saved["failed"]
    assert {"add_rms_norm", "gated"} <= set(saved["calls"]), saved["calls"]

    def same(a, b):
        assert torch.equal(results[a]["losses"], results[b]["losses"]), (a, b)
        for name, w in results[a]["weights"].items():
            assert torch.equal(w, results[b]["weights"][name]), (a, b, name)

    same(("full", False), ("none", False))
    same(("selective", False), ("none", False))
    same(("full", True), ("none", True))
    eager, compiled = results[("none", False)], results[("none", True)]
    torch.testing.assert_close(compiled["losses"], eager["losses"], rtol=1e-5, atol=1e-4)
    for name, w in compiled["weights"].items():
        torch.testing.assert_close(w, eager["weights"][name], rtol=1e-4, atol=1e-5, msg=name)
