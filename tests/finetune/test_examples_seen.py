"""`examples_seen` counts the examples trained on, not optimizer steps x batch size: packed rows
hold several, an epoch's last step may be partial, and its filler micro-batches hold none."""

import json

from t5forge.cli import main
from t5forge.data.finetune_loader import FinetuneLoader
from t5forge.train.loop import count_examples


def test_count_examples_of_padded_packed_and_filler_micro_batches(sni_train, t5_tokenizer):
    kw = dict(batch_size=8, grad_acc=2, max_source_length=256, max_target_length=32, seed=1)
    # 20 examples in steps of 8: the third step (positions 4, 5) holds 4, two per micro-batch.
    for pack in (False, True):
        loader = FinetuneLoader(sni_train, t5_tokenizer, pack=pack, **kw)
        counts = [count_examples(loader.batch(0, position)) for position in range(loader.batches_per_epoch)]
        assert counts == [4, 4, 4, 4, 2, 2]
    one_row = FinetuneLoader(sni_train, t5_tokenizer, pack=True, pack_source_len=4 * 256, pack_target_len=4 * 32, **kw)
    packed = one_row.batch(0, 0)
    assert packed["input_ids"].shape[0] == 1 and count_examples(packed) == 4  # one row, four examples
    # 20 examples over 8 slots of one example each: the last step's 4 examples leave 4 filler slots.
    fillers = FinetuneLoader(sni_train, t5_tokenizer, pack=True, **{**kw, "grad_acc": 8})
    counts = [count_examples(fillers.batch(0, position)) for position in range(16, 24)]
    assert counts == [1, 1, 1, 1, 0, 0, 0, 0]


def test_finetune_counts_the_examples_of_packed_partial_steps(cli_log_handlers, tmp_path, tiny_model_dir, sni_dir, capsys):
    # 12 training examples (3 per task), batch 8 in 4 micro-steps, packed: steps of 8 and 4 examples.
    out = tmp_path / "run"
    assert main(["finetune", "task=ft_tiny", f"out_dir={out}", f"model.checkpoint_path={tiny_model_dir}",
                 f"finetune.sni_dir={sni_dir}", "finetune.max_num_instances_per_task=3", "finetune.max_seq_len=128",
                 "finetune.pack=true", "optim.batch_size=8", "optim.grad_acc=4", "optim.total_steps=-1",
                 "optim.epochs=1", "eval.steps=0", "checkpoint.every_steps=1"]) == 0
    assert "done: 2 steps (1 epoch(s)), 12 examples" in capsys.readouterr().out
    seen = [json.loads((out / "checkpoints" / f"step-{s:08d}" / "train_state.json").read_text())["examples_seen"]
            for s in (1, 2)]
    assert seen == [8, 12]  # not 8 and 16 (steps x optim.batch_size)
