"""`t5forge pretrain data.objective=ul2` end to end in-process on real C4: it trains and evaluates,
saves the paradigm tokens with the run, and resumes bit for bit (the denoiser sequence included)."""

import json

import torch
from safetensors.torch import load_file

from t5forge.cli import main
from t5forge.config_files import load_config
from t5forge.tokenizer import load_tokenizer

UL2 = ("data.objective=ul2", "optim.total_steps=4", "eval.every_steps=2", "eval.steps=1",
       "checkpoint.every_steps=2", "logging.every_steps=1", "data.shuffle_buffer=20")


def history(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["kind"], r.get("loss"), r.get("grad_norm"), r.get("eval_loss")) for r in records]


def test_ul2_run_trains_saves_its_tokens_and_resumes_exactly(tmp_path, c4_pretrain_args, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(c4_pretrain_args(straight, *UL2)) == 0
    assert main(c4_pretrain_args(split, *UL2, "stop_at_step=2")) == 0
    assert main(c4_pretrain_args(split, *UL2, "resume=auto")) == 0
    assert history(split) == history(straight)
    evals = [h[4] for h in history(straight) if h[1] == "eval"]
    assert len(evals) == 2 and all(loss == loss and loss > 0 for loss in evals)

    final = straight / "checkpoints" / "step-00000004"
    a, b = load_file(final / "model.safetensors"), load_file(split / "checkpoints/step-00000004/model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    tok = load_tokenizer(final)
    assert tok.added_tokens == ("[NLU]", "[NLG]", "[S2S]") and tok.added_token_id("[S2S]") == 32102
    cfg = load_config([f"config={straight / 'config.yaml'}"])
    assert cfg.data.objective == "ul2" and len(cfg.data.ul2_denoisers) == 7
    # the data position knows its objective: resuming it as span corruption is refused
    capsys.readouterr()
    assert main(c4_pretrain_args(split, "optim.total_steps=6", "resume=auto")) != 0
    err = capsys.readouterr().err
    assert "objective" in err, err
