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

TEXTS = ["translate English to German: The house is wonderful.", "summarize: studies have shown that owning a dog",
         "The <extra_id_0> walks in <extra_id_1> park"]
# The only tokens the test model can produce: two sentinels, EOS and four words.
VOCAB = [32099, 32098, 1, 8, 1782, 2447, 1712]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spiece_path):
    """A run directory with one complete checkpoint of a random tiny model whose LM head knows only
    VOCAB: it answers like a span-corruption model, sentinels between words, some outputs ending early."""
    torch.manual_seed(1)
    model = T5(T5Config.from_name("tiny", dropout_rate=0.0)).eval()
    with torch.no_grad():
        kept = model.lm_head.weight[VOCAB].clone()
        model.lm_head.weight.zero_()
        model.lm_head.weight[VOCAB] = kept
    run = tmp_path_factory.mktemp("run")
    save_model_dir(model, load_tokenizer(spiece_path), run / "checkpoints" / "step-00000010")
    return run


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.T5Tokenizer.from_pretrained(str(model_dir / "checkpoints" / "step-00000010"))


def expected(model_dir, hf_tokenizer, texts, num_beams, max_new_tokens=8):
    """What the user should read: transformers' decoding with special tokens shown, up to the EOS."""
    from t5forge.model.load import load_model

    model, tok = load_model(model_dir)
    ids = tok.encode_batch(texts)
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    out = model.generate(input_ids, (input_ids != 0).long(), max_new_tokens=max_new_tokens, num_beams=num_beams)
    rows = [row[: row.index(1)] if 1 in row else row for row in out.tolist()]
    return [hf_tokenizer.decode(row, skip_special_tokens=False) for row in rows]


def listing(texts, outputs):
    lines = []
    for i, (text, output) in enumerate(zip(texts, outputs), 1):
        lines += [f"[{i}] prompt: {text}", f"    -> {output}"]
    return lines


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_texts_shows_each_prompt_and_its_sentinels(model_dir, hf_tokenizer, capsys, num_beams):
    rc = main(["generate", str(model_dir), *TEXTS, "--num-beams", str(num_beams), "--max-new-tokens", "8",
               "--device", "cpu"])
    assert rc == 0
    outputs = expected(model_dir, hf_tokenizer, TEXTS, num_beams)
    assert capsys.readouterr().out.splitlines() == listing(TEXTS, outputs)
    assert any("<extra_id_0>" in o for o in outputs) and any("<extra_id_1>" in o for o in outputs)
    assert not any("</s>" in o or "<pad>" in o for o in outputs)


def test_generate_jsonl_in_and_out(model_dir, hf_tokenizer, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(TEXTS * 2)))
    out = tmp_path / "out" / "pred.jsonl"
    rc = main(["generate", str(model_dir), "--input-file", str(src), "--field", "prompt", "--output", str(out),
               "--batch-size", "4", "--max-new-tokens", "8", "--device", "cpu"])
    assert rc == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == list(range(6))
    assert [r["prediction"] for r in records] == expected(model_dir, hf_tokenizer, TEXTS, 1) * 2
    assert capsys.readouterr().out.splitlines() == listing(TEXTS * 2, [r["prediction"] for r in records])

    # --jsonl: stdout is the same records, one JSON object per line, nothing else
    assert main(["generate", str(model_dir), "--input-file", str(src), "--field", "prompt", "--jsonl",
                 "--batch-size", "4", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == records


def test_generate_from_a_text_file_of_prompts(model_dir, hf_tokenizer, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    assert main(["generate", str(model_dir), "--input-file", str(prompts), "--max-new-tokens", "8",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines() == listing(TEXTS, expected(model_dir, hf_tokenizer, TEXTS, 1))


def test_long_multiline_prompts_and_empty_outputs_stay_readable():
    from t5forge.commands.generate import listing as shown

    prompt = "Definition: answer.\n\nInput: " + "word " * 100
    text = shown(7, prompt, "")
    assert text.splitlines() == [
        "[7] prompt: Definition: answer.\\n\\nInput: " + ("word " * 100)[:300 - 30] + f" ... ({len(prompt)} characters)",
        "    -> (empty output: the model ended the sequence at once)",
    ]


def test_generate_console_script(model_dir, hf_tokenizer):
    out = subprocess.run([sys.executable, "-m", "t5forge", "generate", str(model_dir), TEXTS[2],
                          "--max-new-tokens", "5", "--device", "cpu"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == listing(TEXTS[2:], expected(model_dir, hf_tokenizer, TEXTS[2:], 1, 5))


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


def test_an_empty_prompt_is_refused(model_dir, tmp_path, capsys):
    def error(*argv):
        assert main(["generate", str(model_dir), *map(str, argv)]) == 2
        return error_line(capsys)

    assert "the TEXT argument is empty; give a prompt" in error("")
    assert "TEXT argument 2 of 3 is empty" in error("hi", "   ", "there")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nthird prompt\n")
    assert f"{prompts}:2: empty line; every line must hold a prompt" in error("--input-file", prompts)
    records = tmp_path / "records.jsonl"
    records.write_text('{"input": "fine"}\n{"input": " "}\n')
    assert f"{records}:2: field 'input' is empty" in error("--input-file", records)
    records.write_text('{"input": "fine"}\n\n{"input": "also fine"}\n')
    assert f"{records}:2: empty line; every line must hold a JSON record" in error("--input-file", records)
    assert capsys.readouterr().out == ""  # nothing was generated


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
        torch.testing.assert_close(hf(input_ids=ids, labels=ids).logits, ours.logits(ours(ids, labels=ids).hidden),
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
