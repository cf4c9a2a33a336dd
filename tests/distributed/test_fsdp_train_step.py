"""The training step under FSDP2 (two gloo ranks, fp32): the same losses, gradient norms and weights as
one process stepping over the same global batch, with gradient accumulation (2 micro-steps per rank,
4 in the one process), gradient clipping and the speed twins; untied (v1.1) and tied (v1.0)
embeddings, the stack and the hourglass encoder, AdamWScale and Adafactor. The earlier micro-steps
keep their gathered weights (no reshard) and reduce nothing; bf16's policy trains finitely with fp32
weights. Activation checkpointing (full, selective) under FSDP2, through the run's own wiring
(train/setup.py training_model), takes bit-identical steps to none, dropout on."""

import copy

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from t5forge.config_files import load_config
from t5forge.distributed import World, is_fsdp, micro_step_sync, shard_fsdp
from t5forge.model import fast
from t5forge.model.activation_checkpointing import CheckpointedBlock
from t5forge.model.config import T5Config
from t5forge.model.loss import TokenNLL
from t5forge.model.t5 import T5
from t5forge.optim.adafactor import Adafactor
from t5forge.optim.adamw_scale import AdamWScale
from t5forge.optim.build import build_optimizer
from t5forge.train.loop import train_step
from t5forge.train.setup import autocast_for, training_model

STEPS, VOCAB = 3, 256
VARIANTS = {  # name -> (T5Config overrides, optimizer)
    "v1.1-adamwscale": ({}, lambda p: AdamWScale(p, lr=1e-2, weight_decay=0.01)),
    "tied-hourglass-adafactor": (dict(tie_word_embeddings=True, encoder="hourglass", num_layers=3),
                                 lambda p: Adafactor(p, lr=1e-2)),
}


def _micro_batches(step: int, n: int = 4):
    """n one-row micro-batches with padded targets (labels -100), different lengths of valid targets."""
    g = torch.Generator().manual_seed(step)
    out = []
    for i in range(n):
        labels = torch.randint(2, VOCAB, (1, 7), generator=g)
        labels[:, 3 + i:] = -100
        out.append({"input_ids": torch.randint(2, VOCAB, (1, 11), generator=g), "labels": labels})
    return out


def _model(overrides):
    torch.manual_seed(0)
    model = T5(T5Config.from_name("tiny", vocab_size=VOCAB, dropout_rate=0.0, **overrides))
    model, loss, _ = fast.apply(model, TokenNLL(), device=torch.device("cpu"))
    return model, loss


def _check_equal_to_one_process(rank, world):
    cpu = torch.device("cpu")
    for name, (overrides, make_optimizer) in VARIANTS.items():
        ref, ref_loss = _model(overrides)
        model, loss = copy.deepcopy(ref), copy.deepcopy(ref_loss)
        shard_fsdp(model, world, "fp32")
        assert all(isinstance(p, DTensor) for p in model.parameters())
        if overrides.get("tie_word_embeddings"):
            assert model.lm_head is None and len(list(model.parameters())) == len(list(ref.parameters()))
        opt, ref_opt = make_optimizer(model.parameters()), make_optimizer(ref.parameters())
        for step in range(STEPS):
            batches = _micro_batches(step)
            mine = batches[2 * rank: 2 * rank + 2]  # rank r: micro-batches 2r, 2r+1; one process: all 4
            got = train_step(model, opt, mine, 1e-2, grad_clip=1.0, device=cpu, world=world, loss_fn=loss)
            want = train_step(ref, ref_opt, batches, 1e-2, grad_clip=1.0, device=cpu, loss_fn=ref_loss)
            assert float(got.n_targets) == float(want.n_targets)
            torch.testing.assert_close(got.loss_sum / got.n_targets, want.loss_sum / want.n_targets,
                                       rtol=1e-5, atol=0, msg=lambda m: f"{name} step {step} loss: {m}")
            assert not isinstance(got.grad_norm, DTensor)
            torch.testing.assert_close(got.grad_norm, want.grad_norm, rtol=1e-5, atol=0)
            assert float(want.grad_norm) > 1.0  # clipping took part
        for (key, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p.detach().full_tensor(), q.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} {key}: {m}")


def _check_accumulation_keeps_gathered_weights(world):
    model, loss = _model({})
    shard_fsdp(model, world, "fp32")
    block_weight = lambda: model.encoder.blocks[0].attn.q.weight  # noqa: E731
    batch = _micro_batches(0)[0]
    for last in (False, True):
        with micro_step_sync(model, model, last):
            out = model(**batch)
            loss(*model.output_projection(out.hidden), batch["labels"]).backward()
        # An earlier micro-step keeps the gathered (plain) weight and its local gradient; the last
        # reduces the gradients and reshards (the DTensor shard again, with a sharded gradient).
        assert isinstance(block_weight(), DTensor) is last
    assert isinstance(block_weight().grad, DTensor)


def _check_bf16_policy(rank, world):
    cpu = torch.device("cpu")
    model, loss = _model({})
    shard_fsdp(model, world, "bf16")
    opt = AdamWScale(model.parameters(), lr=1e-2)
    for step in range(2):
        mine = _micro_batches(step)[2 * rank: 2 * rank + 2]
        got = train_step(model, opt, mine, 1e-2, grad_clip=1.0, device=cpu, world=world, loss_fn=loss,
                         autocast=autocast_for("bf16", cpu))
        assert bool(got.finite) and torch.isfinite(got.loss_sum / got.n_targets)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the shards the optimizer updates


def _check_activation_checkpointing_bit_identical(rank, world):
    """none / full / selective through training_model with distributed.strategy=fsdp: the recompute
    in the backward gathers the block's weights again and replays dropout's RNG state, so the
    losses, gradient norms and weights are bit-identical, over steps of 2 accumulated micro-steps."""
    cpu = torch.device("cpu")
    results = {}
    for mode in ("none", "full", "selective"):
        cfg = load_config(["model.name=tiny", f"model.activation_checkpointing={mode}", "distributed.strategy=fsdp",
                           "precision=fp32", "model.compile=false", "model.compile_elementwise=false"])
        torch.manual_seed(0)
        model = T5(T5Config.from_name("tiny", vocab_size=VOCAB, dropout_rate=0.1))
        training, loss_fn = training_model(model, cfg, world, cpu)
        assert is_fsdp(training) and all(isinstance(p, DTensor) for p in model.parameters())
        checkpointed = [isinstance(b, CheckpointedBlock) for b in (*model.encoder.blocks, *model.decoder.blocks)]
        assert checkpointed == {"none": [False] * 4, "full": [True] * 4, "selective": [True, False] * 2}[mode]
        optimizer = build_optimizer(model, cfg.optim)  # on the DTensor shards, as the run builds it
        torch.manual_seed(100 + rank)  # dropout differs by rank
        steps = []
        for step in range(STEPS):
            out = train_step(training, optimizer, _micro_batches(step)[2 * rank: 2 * rank + 2], 1e-2, grad_clip=1.0,
                             device=cpu, world=world, loss_fn=loss_fn)
            steps.append(torch.stack([out.loss_sum, out.grad_norm]))
        results[mode] = (torch.stack(steps), {n: p.detach().full_tensor() for n, p in model.named_parameters()})
    for mode in ("full", "selective"):
        assert torch.equal(results[mode][0], results["none"][0]), (mode, results[mode][0], results["none"][0])
        for name, w in results["none"][1].items():
            assert torch.equal(results[mode][1][name], w), (mode, name)


def _worker(rank, world_size, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    world = World(rank=rank, local_rank=rank, world_size=world_size)
    try:
        _check_equal_to_one_process(rank, world)
        _check_accumulation_keeps_gathered_weights(world)
        _check_bf16_policy(rank, world)
        _check_activation_checkpointing_bit_identical(rank, world)
    finally:
        dist.destroy_process_group()


def test_fsdp_steps_equal_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # import torch._dynamo once, before the fork
    mp.start_processes(_worker, args=(2, str(tmp_path / "init")), nprocs=2, start_method="fork")
