"""Files a run, its checkpoints and `t5forge export` write are as readable as the umask allows (a
plain open()'s 0666 & ~umask), so a group on a shared cluster can read them: safetensors' own
save_file would leave model.safetensors 0600."""

import os
import stat

import pytest
import torch

from t5forge.cli import main
from t5forge.model.hf import write_weights


@pytest.fixture
def umask():
    """Run the test under a given umask, restoring the process's afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def modes(directory):
    return {str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode) for p in directory.rglob("*") if p.is_file()}


def test_write_weights_follows_the_umask(tmp_path, umask):
    for mask, want in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        umask(mask)
        path = tmp_path / f"w{mask:o}.safetensors"
        write_weights({"w": torch.zeros(2)}, path)
        assert stat.S_IMODE(path.stat().st_mode) == want


def test_run_checkpoint_and_export_files_are_group_readable(tmp_path, data_dir, umask, capsys):
    umask(0o027)  # group may read, others nothing: every file must come out 0640
    run, hf = tmp_path / "run", tmp_path / "hf"
    assert main([
        "pretrain", "task=pt_tiny", f"out_dir={run}", f"data.tokenizer={data_dir / 't5-spiece' / 'spiece.model'}",
        f"data.train_files=[{data_dir / 'c4-sample' / 'c4-en.train-00000-first1000.json.gz'}]",
        "optim.total_steps=3", "eval.steps=0", "checkpoint.every_steps=100",
    ]) == 0
    assert main(["export", str(run), str(hf)]) == 0
    written = {**{f"run/{k}": v for k, v in modes(run).items()}, **{f"hf/{k}": v for k, v in modes(hf).items()}}
    assert "run/checkpoints/step-00000003/model.safetensors" in written and "hf/model.safetensors" in written
    assert {k: oct(v) for k, v in written.items() if v != 0o640} == {}
