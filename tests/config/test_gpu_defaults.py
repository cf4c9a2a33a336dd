"""What a GPU user gets by default: model.compile=null compiles on CUDA only (nanoT5's recipe),
and the chunked cross-entropy sizes its chunks for the device."""

import torch

from t5forge.config_files import load_config
from t5forge.model.fast.loss import default_chunk_rows
from t5forge.train.setup import compiles


def test_model_compile_null_means_on_for_cuda_off_for_cpu_and_explicit_values_win():
    cfg = load_config([])
    assert cfg.model.compile is None
    assert compiles(cfg.model, torch.device("cuda")) and not compiles(cfg.model, torch.device("cpu"))
    assert compiles(cfg.model, "cuda:0")
    off, on = (load_config([f"model.compile={v}"]).model for v in ("false", "true"))
    assert not compiles(off, torch.device("cuda")) and compiles(on, torch.device("cpu"))


def test_cross_entropy_chunks_are_sized_per_device():
    cpu, gpu = default_chunk_rows(32128, torch.device("cpu")), default_chunk_rows(32128, torch.device("cuda"))
    assert cpu == 522 and gpu == 4177
    assert default_chunk_rows(10**9, torch.device("cpu")) == 16  # never below 16 rows
