"""Checkpointer across two gloo processes: rank 0 writes, every rank's data and RNG state is kept."""

from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from t5forge.model.config import T5Config
from t5forge.model.t5 import T5
from t5forge.tokenizer import load_tokenizer
from t5forge.train.checkpoint import Checkpointer, load, resolve_resume
from t5forge.train.checkpoint_parts import Value, run_parts
from t5forge.train.state import TrainState


def _worker(rank, world_size, run_dir, spiece_path, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # identical replicas, as DDP keeps them
        model = T5(T5Config.from_name("tiny"))
        optimizer = torch.optim.AdamW(model.parameters())
        torch.manual_seed(100 + rank)  # per-rank RNG streams (dropout differs by rank)
        world = SimpleNamespace(rank=rank, world_size=world_size)
        path = Checkpointer(run_dir, keep_last=1, world=world).save(run_parts(
            model=model, tokenizer=load_tokenizer(spiece_path), optimizer=optimizer,
            train_state=TrainState(step=4), data=Value({"rank": rank, "offset": 10 * rank}), config_text="x: 1\n",
        ), step=4)
        # After the barrier inside save, every rank sees the complete checkpoint.
        assert resolve_resume("auto", run_dir) == path
        _, rng_state, data_state = load(path, model, optimizer, rank=rank, world_size=world_size)
        assert data_state == {"rank": rank, "offset": 10 * rank}
        torch.manual_seed(100 + rank)
        assert torch.equal(rng_state["torch"], torch.get_rng_state())
    finally:
        dist.destroy_process_group()


def test_two_process_save_and_load(tmp_path, spiece_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # both processes are local; no network needed
    # The first optimizer built in a process imports torch._dynamo (seconds); do it once here so the
    # forked children inherit it instead of each paying for it.
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    mp.start_processes(_worker, args=(2, str(tmp_path / "run"), str(spiece_path), str(tmp_path / "init")), nprocs=2,
                       start_method="fork")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000004"]
