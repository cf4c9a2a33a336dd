"""Without the Hugging Face Hub, commands that need it fail at once with advice for that command.

The Hub is made unreachable for certain, on any machine: HF_ENDPOINT points at a local port that
refuses connections, or at a local socket that never answers, or the libraries' offline switches
are set. Hub ids that are in the local Hugging Face cache still load offline.
"""

import shutil
import socket
import time

import pytest
import torch

from t5forge.cli import main
from t5forge.hub import OFFLINE_SWITCHES, offline_reason

FAST_S = 15  # well above the probe's PROBE_TIMEOUT_S, well below `datasets`' own retries before its error


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache and a Hub endpoint that refuses connections."""
    import huggingface_hub.constants

    for name in OFFLINE_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    offline_reason.cache_clear()
    yield tmp_path / "hf_cache"
    offline_reason.cache_clear()


def run_cli(argv, capfd):
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    out, err = capfd.readouterr()
    # stdout holds the run's start-up story (device, run directory, tokenizer): no retry noise there either
    assert "Retry" not in out and "Traceback" not in out, out
    return code, err, elapsed


def assert_fast_and_quiet(code, output, elapsed):
    """`output` is stderr: the one error line and nothing else."""
    assert code == 2, output
    assert elapsed < FAST_S, f"took {elapsed:.1f}s"
    assert "Retry" not in output and "Traceback" not in output, output
    assert len(output.strip().splitlines()) == 1, output


@pytest.mark.parametrize("how", ["refused", "silent", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_pretrain_on_the_hub_dataset_fails_fast_and_names_the_local_file_keys(how, no_hub, monkeypatch, tmp_path,
                                                                              spiece_path, capfd):
    silent = socket.socket()
    if how == "silent":  # accepts the connection (kernel backlog), never answers the request
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    elif how.startswith("HF_"):
        monkeypatch.setenv(how, "1")
    with silent:
        code, output, elapsed = run_cli(
            ["pretrain", "task=pt_tiny", f"out_dir={tmp_path / 'run'}", f"data.tokenizer={spiece_path}"], capfd)
    assert_fast_and_quiet(code, output, elapsed)
    assert "dataset 'allenai/c4'" in output
    assert "data.train_files=[" in output and "data.validation_files=[" in output
    assert "--files" not in output  # pretrain has no such option
    expected_reason = {"refused": "cannot be reached", "silent": "no answer",
                       "HF_HUB_OFFLINE": "HF_HUB_OFFLINE=1 is set", "HF_DATASETS_OFFLINE": "HF_DATASETS_OFFLINE=1 is set"}
    assert expected_reason[how] in output or (how == "silent" and "timed out" in output), output


def test_pretrain_with_a_hub_tokenizer_names_data_tokenizer(no_hub, tmp_path, data_dir, capfd):
    c4 = data_dir / "c4-sample" / "c4-en.train-00000-first1000.json.gz"
    code, output, elapsed = run_cli(
        ["pretrain", "task=pt_tiny", f"out_dir={tmp_path / 'run'}", f"data.train_files=[{c4}]"], capfd)
    assert_fast_and_quiet(code, output, elapsed)
    assert "tokenizer 'google/t5-v1_1-base'" in output and "data.tokenizer=PATH/spiece.model" in output


def test_tokenizer_show_advice_names_its_own_option(no_hub, capfd):
    code, output, elapsed = run_cli(["tokenizer", "show", "--tokenizer", "google/t5-v1_1-base"], capfd)
    assert_fast_and_quiet(code, output, elapsed)
    assert "--tokenizer=PATH/spiece.model" in output and "data.tokenizer" not in output


def test_generate_with_a_hub_model_id_says_to_pass_a_local_directory(no_hub, capfd):
    code, output, elapsed = run_cli(["generate", "google/t5-v1_1-small", "hello"], capfd)
    assert_fast_and_quiet(code, output, elapsed)
    assert "model 'google/t5-v1_1-small' is not a local path" in output
    assert "local HF or t5forge model directory" in output and "model.checkpoint_path=DIR" in output


def test_hub_ids_in_the_local_cache_load_offline(no_hub, tmp_path, spiece_path, capfd):
    """A model downloaded before (the cache's models--ORG--NAME/snapshots/REV layout) works offline."""
    from t5forge.model.config import T5Config
    from t5forge.model.hf import export_hf
    from t5forge.model.t5 import T5
    from t5forge.tokenizer import load_tokenizer

    revision = "0" * 40
    snapshot = no_hub / "models--t5forge-test--tiny" / "snapshots" / revision
    torch.manual_seed(0)
    export_hf(T5(T5Config.from_name("tiny", dropout_rate=0.0)), load_tokenizer(spiece_path), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(revision)
    assert load_tokenizer("t5forge-test/tiny").vocab_size == 32100
    code, output, _ = run_cli(["generate", "t5forge-test/tiny", "Hello", "--max-new-tokens", "3"], capfd)
    assert code == 0, output
    shutil.rmtree(no_hub)  # and once it is gone, the one-line error again
    code, output, elapsed = run_cli(["generate", "t5forge-test/tiny", "Hello"], capfd)
    assert_fast_and_quiet(code, output, elapsed)
    assert "the local Hugging Face cache holds no copy" in output
