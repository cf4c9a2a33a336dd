"""Packed (padding-free) fine-tuning batches on real SNI examples with the real T5 tokenizer: every
example in exactly one row with its exact ids, capacities kept, the loader's resume and slots
unchanged, the loss equal to the padded batch's, and `t5forge finetune finetune.pack=true` end to end."""

import json

import pytest
import torch

from t5forge.cli import main
from t5forge.config_files import load_config
from t5forge.data.finetune_loader import FinetuneLoader
from t5forge.data.packing import assign_rows, pack_seq2seq
from t5forge.data.seq2seq import collate_packed, collate_seq2seq
from t5forge.errors import T5ForgeError
from t5forge.model.config import T5Config
from t5forge.model.loss import seq2seq_loss
from t5forge.model.t5 import T5
from t5forge.train.loop import count_tokens


def unpack(batch):
    """{segment key (row, segment): (source ids, target ids)} of a packed batch."""
    out = {}
    for r in range(batch["input_ids"].shape[0]):
        for seg in batch["encoder_segment_ids"][r].unique().tolist():
            if seg == 0:
                continue
            src = batch["input_ids"][r][batch["encoder_segment_ids"][r] == seg].tolist()
            tgt = batch["labels"][r][batch["decoder_segment_ids"][r] == seg].tolist()
            out[(r, seg)] = (src, tgt)
    return out


def unpad(batch):
    return sorted((batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist(),
                   batch["labels"][i][batch["labels"][i] != -100].tolist()) for i in range(len(batch["input_ids"])))


def test_assign_rows_first_fit_decreasing_respects_both_capacities():
    lengths = [(5, 1), (9, 2), (3, 9), (6, 1), (2, 1)]
    rows = assign_rows(lengths, source_capacity=10, target_capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(5))  # each example exactly once
    for row in rows:
        assert sum(lengths[i][0] for i in row) <= 10 and sum(lengths[i][1] for i in row) <= 10
    assert rows == [[1], [3, 2], [0, 4]]  # longest source first, first row with room
    assert assign_rows(lengths, 10, 10) == rows  # deterministic
    assert len(assign_rows([(3, 6), (3, 6)], 10, 10)) == 2  # the target capacity splits them
    with pytest.raises(ValueError, match="example 1 .*exceeds the row capacity"):
        assign_rows([(3, 1), (11, 1)], 10, 10)


def test_packed_batch_holds_the_padded_batchs_examples_and_ids(sni_train, t5_tokenizer):
    import random

    examples = sni_train[:12]
    padded = collate_seq2seq(examples, t5_tokenizer, 256, 32, rng=random.Random(5))
    packed = collate_packed(examples, t5_tokenizer, 256, 32, rng=random.Random(5))
    assert set(packed) == {"input_ids", "encoder_segment_ids", "labels", "decoder_segment_ids"}
    assert sorted(unpack(packed).values()) == unpad(padded)  # same examples, same references drawn
    seg = packed["encoder_segment_ids"]
    assert packed["input_ids"].shape[1] <= 256 and packed["labels"].shape[1] <= 32
    assert packed["input_ids"].shape[1] == int((seg != 0).sum(1).max())  # as wide as the fullest row
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer rows
    assert count_tokens(packed) == count_tokens(padded)
    for r in range(seg.shape[0]):  # segments numbered 1..k left to right, contiguous, padding at the end
        used = seg[r][seg[r] != 0]
        assert used.tolist() == sorted(used.tolist()) and used.unique().tolist() == list(range(1, int(used.max()) + 1))
        assert (seg[r][len(used):] == 0).all() and (packed["input_ids"][r][len(used):] == 0).all()
    wider = collate_packed(examples, t5_tokenizer, 256, 32, source_capacity=1024, target_capacity=128,
                           pad_to_multiple_of=8, rng=random.Random(5))
    assert wider["input_ids"].shape[0] < packed["input_ids"].shape[0] and wider["input_ids"].shape[1] % 8 == 0
    assert sorted(unpack(wider).values()) == unpad(padded)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_packed_loss_and_gradient_equal_the_padded_batch_on_real_examples(sni_train, t5_tokenizer, backend):
    import random

    torch.manual_seed(0)
    model = T5(T5Config.from_name("tiny", dropout_rate=0.0, attention_backend=backend))
    padded = collate_seq2seq(sni_train[:8], t5_tokenizer, 256, 32, rng=random.Random(1))
    packed = collate_packed(sni_train[:8], t5_tokenizer, 256, 32, rng=random.Random(1))
    losses, grads = [], []
    for batch in (padded, packed):
        model.zero_grad()
        loss = seq2seq_loss(model, "sum", **batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.encoder.position.weight.grad.clone())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_packed_loader_keeps_slots_resume_and_filler(sni_train, t5_tokenizer):
    kw = {"batch_size": 6, "grad_acc": 2, "max_source_length": 256, "max_target_length": 32, "seed": 3}
    padded, packed = FinetuneLoader(sni_train, t5_tokenizer, **kw), FinetuneLoader(sni_train, t5_tokenizer, pack=True, **kw)
    assert len(padded) == len(packed) == 8  # 20 examples, 6 per step: 4 steps of 2 micro-batches
    it_a, it_b = iter(padded), iter(packed)
    batches = [next(it_b) for _ in range(8)]
    for b in batches:
        assert sorted(unpack(b).values()) == unpad(next(it_a))  # the same examples per micro-batch
    resumed = FinetuneLoader(sni_train, t5_tokenizer, pack=True, **kw)
    first = FinetuneLoader(sni_train, t5_tokenizer, pack=True, **kw)
    it = iter(first)
    for _ in range(3):
        next(it)
    resumed.load_state_dict(first.state_dict())
    again = iter(resumed)
    for b in batches[3:]:
        nxt = next(again)
        assert all(torch.equal(nxt[k], b[k]) for k in b)
    # 3 ranks x 2 micro-steps = 6 slots; the last step has 2 examples: empty slots get a filler.
    ranks = [FinetuneLoader(sni_train, t5_tokenizer, pack=True, rank=r, world_size=3, **kw) for r in range(3)]
    last = [ranks[r].batch(0, 7) for r in range(3)]
    assert (last[2]["labels"] == -100).all() and (last[2]["decoder_segment_ids"] != 0).any()


def test_pack_config_keys_and_a_capacity_below_the_longest_example(sni_train, t5_tokenizer):
    cfg = load_config(["finetune.pack=true", "finetune.pack_source_len=2048"], base="ft")
    assert cfg.finetune.pack and cfg.finetune.pack_source_len == 2048
    with pytest.raises(T5ForgeError, match="pack_target_len"):
        load_config(["finetune.pack_target_len=-1"], base="ft")
    # A capacity below the batch's longest example widens to it: nothing is cut or dropped.
    loader = FinetuneLoader(sni_train, t5_tokenizer, batch_size=4, max_source_length=256, max_target_length=32,
                            pack=True, pack_source_len=8, pack_target_len=2)
    batch = loader.batch(0, 0)
    padded = FinetuneLoader(sni_train, t5_tokenizer, batch_size=4, max_source_length=256, max_target_length=32).batch(0, 0)
    assert sorted(unpack(batch).values()) == unpad(padded)
    with pytest.raises(ValueError, match="one target per source"):
        pack_seq2seq([[1]], [], source_capacity=4, target_capacity=4, pad_id=0)


def test_finetune_cli_trains_with_packed_batches(tmp_path, tiny_model_dir, sni_dir, capsys):
    # The same run padded and packed (on CPU: one row per micro-batch, attention per example):
    # every step's logged loss and gradient norm agree, so the updates did too, and the held-out
    # loss (packed the same way) agrees at the end.
    train, held_out = {}, {}
    for pack in ("false", "true"):
        out = tmp_path / f"pack-{pack}"
        argv = ["finetune", "task=ft_tiny", f"out_dir={out}", f"model.checkpoint_path={tiny_model_dir}",
                f"finetune.sni_dir={sni_dir}", "finetune.max_num_instances_per_task=5", "finetune.max_seq_len=192",
                "finetune.max_target_len=16", f"finetune.pack={pack}", "optim.total_steps=4", "eval.steps=2",
                "eval.every_steps=4", "checkpoint.every_steps=4", "logging.every_steps=1", "precision=fp32"]
        assert main(argv) == 0
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train[pack] = [r for r in recs if r["kind"] == "train"]
        held_out[pack] = [r for r in recs if r["kind"] == "eval"]
        assert f"pack: {pack}" in (out / "config.yaml").read_text()
    assert "packed rows: source up to 768, target up to 64 tokens" in capsys.readouterr().out  # 4 examples x 192 / 16
    assert [r["step"] for r in train["true"]] == [1, 2, 3, 4]
    for padded, packed in zip(train["false"], train["true"]):
        assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-5)
        assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-4)
    (padded,), (packed,) = held_out["false"], held_out["true"]
    assert packed["eval_tokens"] == padded["eval_tokens"] > 0
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-5)
    assert packed["eval_accuracy"] == pytest.approx(padded["eval_accuracy"], abs=1e-9)


def test_pack_capacity_puts_a_cpu_micro_batch_in_one_row_with_sdpa(sni_train, t5_tokenizer):
    from t5forge.train.finetune import pack_capacity

    per_batch, cpu = 4, torch.device("cpu")  # examples per micro-batch
    args = ["finetune.pack=true", "finetune.max_seq_len=256", "finetune.max_target_len=32"]
    cfg = load_config(args, base="ft")
    assert pack_capacity(cfg, per_batch, cpu) == (1024, 128)  # every micro-batch fits one row
    assert pack_capacity(cfg, per_batch, torch.device("cuda")) == (None, None)  # dense masks / flex: the longest
    for override, want in [("model.attention=eager", (None, None)), ("model.compile=true", (None, None)),
                           ("finetune.pack_source_len=512", (512, None))]:
        assert pack_capacity(load_config([*args, override], base="ft"), per_batch, cpu) == want, override
    loader = FinetuneLoader(sni_train, t5_tokenizer, batch_size=4, max_source_length=256, max_target_length=32,
                            pack=True, pack_source_len=1024, pack_target_len=128)
    batch = loader.batch(0, 0)
    assert batch["input_ids"].shape[0] == 1 and int((batch["encoder_segment_ids"] == 0).sum()) == 0
