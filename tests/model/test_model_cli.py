"""`t5forge generate` and `t5forge export` on a tiny model with the real T5 vocabulary."""

import json
import subprocess
import sys

import pytest
import torch

from t5forge.cli import main
from t5forge.model.config import T5Config
from t5forge.model.load import save_model_dir
from t5forge.model.t5 import T5
from t5forge.tokenizer import load_tokenizer

TEXTS = ["translate English to German: The house is wonderful.", "summarize: studies have shown that owning a dog"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spiece_path):
    """A run directory with one complete checkpoint of a random tiny model (EOS made likely)."""
    torch.manual_seed(0)
    model = T5(T5Config.from_name("tiny", dropout_rate=0.0)).eval()
    with torch.no_grad():  # so that some outputs end before the length limit
        model.lm_head.weight[1] = model.lm_head.weight[5] * 1.5
    run = tmp_path_factory.mktemp("run")
    save_model_dir(model, load_tokenizer(spiece_path), run / "checkpoints" / "step-00000010")
    return run


def expected(model_dir, texts, num_beams, max_new_tokens=8):
    from t5forge.model.load import load_model

    model, tok = load_model(model_dir)
    ids = tok.encode_batch(texts)
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    out = model.generate(input_ids, (input_ids != 0).long(), max_new_tokens=max_new_tokens, num_beams=num_beams)
    return [tok.decode(row) for row in out]


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_texts(model_dir, capsys, num_beams):
    rc = main(["generate", str(model_dir), *TEXTS, "--num-beams", str(num_beams), "--max-new-tokens", "8",
               "--device", "cpu"])
    assert rc == 0
    assert capsys.readouterr().out.splitlines() == expected(model_dir, TEXTS, num_beams)


def test_generate_jsonl_in_and_out(model_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(TEXTS * 3)))
    out = tmp_path / "out" / "pred.jsonl"
    rc = main(["generate", str(model_dir), "--input-file", str(src), "--field", "prompt", "--output", str(out),
               "--batch-size", "4", "--max-new-tokens", "8", "--device", "cpu"])
    assert rc == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == list(range(6))
    assert [r["prediction"] for r in records] == expected(model_dir, TEXTS, 1) * 3
    assert capsys.readouterr().out.splitlines() == [r["prediction"] for r in records]


def test_generate_console_script(model_dir):
    out = subprocess.run([sys.executable, "-m", "t5forge", "generate", str(model_dir), TEXTS[0],
                          "--max-new-tokens", "5", "--device", "cpu"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == expected(model_dir, TEXTS[:1], 1, max_new_tokens=5)


def test_generate_bad_inputs(model_dir, tmp_path, capsys):
    def run(*argv):
        assert main(["generate", *map(str, argv)]) == 2
        line = error_line(capsys)
        assert line.startswith("t5forge generate: error: ")
        return line

    assert "does not exist" in run(tmp_path / "missing_model", "hi")
    assert "nothing to generate from" in run(model_dir)
    assert "not both" in run(model_dir, "hi", "--input-file", tmp_path / "x.jsonl")
    assert "x.jsonl does not exist" in run(model_dir, "--input-file", tmp_path / "x.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "fine"}\n{"input": broken\n')
    assert "bad.jsonl:2: not valid JSON" in run(model_dir, "--input-file", bad)
    bad.write_text('{"input": "fine"}\n{"text": "no input field"}\n')
    assert "bad.jsonl:2: no string field 'input'" in run(model_dir, "--input-file", bad)
    assert "--num-beams must be at least 1" in run(model_dir, "hi", "--num-beams", "0")
    not_t5 = tmp_path / "not_t5"
    not_t5.mkdir()
    (not_t5 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "model_type is 'gpt2'" in run(not_t5, "hi")


def test_export_cli_round_trip(model_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from t5forge.model.load import load_model

    out_dir = tmp_path / "hf"
    assert main(["export", str(model_dir), str(out_dir)]) == 0
    assert "exported" in capsys.readouterr().out
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(out_dir)).eval()
    ours, tok = load_model(model_dir)
    ids = torch.tensor([tok.encode(TEXTS[0])])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, labels=ids).logits, ours(ids, labels=ids).logits,
                                   rtol=1e-5, atol=5e-5)
    assert transformers.AutoTokenizer.from_pretrained(str(out_dir))(TEXTS[0]).input_ids == tok.encode(TEXTS[0])
    capsys.readouterr()  # transformers' progress bars

    # Bad inputs: a non-empty OUT_DIR, a missing checkpoint.
    assert main(["export", str(model_dir), str(out_dir)]) == 2
    assert "is not empty" in error_line(capsys)
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "hf2")]) == 2
    assert "does not exist" in error_line(capsys)
    assert main(["export", str(model_dir), str(out_dir), "--force", "--dtype", "bf16"]) == 0
    assert transformers.T5ForConditionalGeneration.from_pretrained(str(out_dir)).shared.weight.dtype == torch.bfloat16
