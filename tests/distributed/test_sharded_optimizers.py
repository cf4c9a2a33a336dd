"""AdamWScale and Adafactor on FSDP2's sharded parameters (DTensor, Shard(0)) over two gloo ranks take
the same steps as one process on the whole tensors.

The parameters are uneven (7 rows over 2 ranks: 4 + 3) and rank 0's rows are 10x rank 1's, so a
statistic taken over one shard instead of the whole parameter (AdamWScale's and Adafactor's RMS(p),
Adafactor's column statistics and update RMS) changes the step far beyond the tolerance."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from t5forge.optim.adafactor import Adafactor
from t5forge.optim.adamw_scale import AdamWScale

STEPS = 3


def _tensors():
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(7, 5, generator=g)
    matrix[:4] *= 10.0  # rank 0's shard: rows 0-3
    experts = torch.randn(3, 4, 5, generator=g)
    experts[:2] *= 10.0
    vector = torch.randn(7, generator=g)
    grads = [[torch.randn(t.shape, generator=g) * (1 + s) for t in (matrix, experts, vector)] for s in range(STEPS)]
    return [matrix, experts, vector], grads


OPTIMIZERS = {
    "adamwscale-loop": lambda p: AdamWScale(p, lr=1e-2, weight_decay=0.1, implementation="loop"),
    "adamwscale-foreach": lambda p: AdamWScale(p, lr=1e-2, weight_decay=0.1, implementation="foreach"),
    "adamwscale-fused": lambda p: AdamWScale(p, lr=1e-2, weight_decay=0.1, implementation="fused"),
    "adamwscale-masked": lambda p: AdamWScale(p, lr=1e-2, weight_decay=0.1),  # stepped with found_inf
    "adafactor": lambda p: Adafactor(p, lr=1e-2),
    "adafactor-momentum": lambda p: Adafactor(p, lr=1e-2, beta1=0.9, weight_decay=0.1),
}


def _step(name, optimizer, step):
    if name == "adamwscale-masked":  # a skipped step (1.0) changes nothing; the others apply
        optimizer.step(found_inf=torch.tensor(1.0 if step == 1 else 0.0))
    else:
        optimizer.step()


def _worker(rank, world_size, init_file):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        full, grads = _tensors()
        shard = distribute_tensor(full[0], mesh, [Shard(0)]).to_local()
        # The data this test relies on: a shard's RMS is far from the parameter's.
        assert abs(shard.square().mean().sqrt() / full[0].square().mean().sqrt() - 1) > 0.2
        for name, make in OPTIMIZERS.items():
            plain = [torch.nn.Parameter(t.clone()) for t in full]
            sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
            opt_plain, opt_sharded = make(plain), make(sharded)
            for step in range(STEPS):
                for p, q, g in zip(plain, sharded, grads[step]):
                    p.grad = g.clone()
                    q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                _step(name, opt_plain, step)
                _step(name, opt_sharded, step)
            for p, q, t in zip(plain, sharded, full):
                assert not torch.allclose(p.detach(), t), name  # the steps moved the weights
                torch.testing.assert_close(q.detach().full_tensor(), p.detach(), rtol=1e-6, atol=1e-7,
                                           msg=lambda m: f"{name}: {m}")
    finally:
        dist.destroy_process_group()


def test_sharded_steps_equal_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_worker, args=(2, str(tmp_path / "init")), nprocs=2, start_method="fork")
