"""FinetuneLoader on real SNI examples with the real T5 tokenizer: exact resume, disjoint and complete
rank shards, epochs aligned with the plan's step count, deterministic reference choice."""

import math

import pytest
import torch

from t5forge.data.finetune_loader import FinetuneLoader
from t5forge.data.seq2seq import collate_seq2seq
from t5forge.errors import T5ForgeError


def make(examples, tok, **kw):
    kw = {"batch_size": 4, "max_source_length": 256, "max_target_length": 32, "seed": 3, **kw}
    return FinetuneLoader(examples, tok, **kw)


def truncated(tok, text, max_length):
    """The ids collate_seq2seq gives `text`: cut to max_length - 1 tokens + EOS when longer."""
    ids = tok.encode(text)
    return ids if len(ids) <= max_length else ids[: max_length - 1] + [tok.eos_id]


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("split_at", [7, 10, 13])  # mid-epoch, exactly at the epoch end, in epoch 2
def test_resume_is_exact(sni_train, t5_tokenizer, split_at):
    # 20 examples, batch 4 in 2 micro-steps: 10 micro-batches per epoch; 20 batches span two epochs.
    straight = take(make(sni_train, t5_tokenizer, grad_acc=2), 20)
    first = make(sni_train, t5_tokenizer, grad_acc=2)
    head = take(first, split_at)
    state = first.state_dict()
    assert state["epoch"] * 10 + state["position"] == split_at
    second = make(sni_train, t5_tokenizer, grad_acc=2)
    second.load_state_dict(state)
    assert_same_batches(head + take(second, 20 - split_at), straight)
    # Epochs are drawn afresh: epoch 2 is another order than epoch 1.
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(straight[:10], straight[10:]))


@pytest.mark.parametrize("world_size,grad_acc,batch_size", [(1, 1, 4), (2, 1, 4), (3, 2, 6), (2, 2, 8)])
def test_ranks_are_disjoint_and_cover_each_epoch(sni_train, t5_tokenizer, world_size, grad_acc, batch_size):
    n = len(sni_train)
    loaders = [make(sni_train, t5_tokenizer, batch_size=batch_size, grad_acc=grad_acc, rank=r, world_size=world_size)
               for r in range(world_size)]
    # Every rank steps the same number of times per epoch, and that is the plan's ceil(N / batch).
    assert {len(l) for l in loaders} == {grad_acc * math.ceil(n / batch_size)}
    encoded = {tuple(truncated(t5_tokenizer, e.source, 256)): i for i, e in enumerate(sni_train)}
    iters = [iter(l) for l in loaders]
    for epoch in range(2):
        seen = []
        for _ in range(len(loaders[0])):
            for rank, it in enumerate(iters):
                batch = next(it)
                rows = []
                for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
                    if (labels == -100).all():
                        continue  # a filler: no loss, only keeps the ranks in lockstep
                    rows.append(encoded[tuple(ids[mask.bool()].tolist())])
                assert len(rows) <= batch_size // (world_size * grad_acc)
                seen += rows
        assert sorted(seen) == list(range(n)), f"epoch {epoch}"
        assert seen != list(range(n))  # shuffled


def test_last_partial_step_is_kept_with_fillers(sni_train, t5_tokenizer):
    # 20 examples, batch 6 on 3 ranks x 2 micro-steps: 4 steps; the last has 2 examples for 6 slots.
    loaders = [make(sni_train, t5_tokenizer, batch_size=6, grad_acc=2, rank=r, world_size=3) for r in range(3)]
    last_step = [take(l, 8)[6:] for l in loaders]
    counts = [int((b["labels"] != -100).any(dim=1).sum()) for batches in last_step for b in batches]
    assert sorted(counts) == [0, 0, 0, 0, 1, 1]
    for batches in last_step:
        for b in batches:
            assert b["input_ids"].shape[0] == 1


def test_batches_are_collated_examples_in_order(sni_train, t5_tokenizer):
    loader = make(sni_train, t5_tokenizer, train=False)
    batches = list(loader)
    assert len(batches) == 5 and list(loader) == []  # one pass; the state is at its end
    expected = collate_seq2seq(sni_train[4:8], t5_tokenizer, 256, 32)  # first references, file order
    assert_same_batches([batches[1]], [expected])


def test_reference_choice_is_deterministic_and_random(sni_train, t5_tokenizer):
    multi = [e for e in sni_train if len(set(e.references)) > 1]
    assert multi, "the SNI subset has multi-reference training examples"
    epochs = 12
    loader = make(multi, t5_tokenizer, batch_size=1)
    batches = take(loader, epochs * len(multi))
    assert_same_batches(batches, take(make(multi, t5_tokenizer, batch_size=1), epochs * len(multi)))
    picked = {}
    for epoch in range(epochs):
        order = loader.order(epoch)
        for pos in range(len(multi)):
            (i,), _, _ = loader.slot_indices(order, pos)
            label = batches[epoch * len(multi) + pos]["labels"][0].tolist()
            refs = [truncated(t5_tokenizer, r, 32) for r in multi[i].references]
            assert label in refs  # always one of the example's own references
            picked.setdefault(i, set()).add(refs.index(label))
    assert any(len(p) > 1 for p in picked.values()), f"{epochs} epochs never drew a second reference"
    other = take(make(multi, t5_tokenizer, batch_size=1, seed=4), epochs * len(multi))
    assert any(not torch.equal(x["labels"], y["labels"]) for x, y in zip(batches, other))


def test_changed_data_is_refused_on_resume(sni_train, t5_tokenizer):
    loader = make(sni_train, t5_tokenizer)
    take(loader, 3)
    shorter = make(sni_train[:-1], t5_tokenizer)
    with pytest.raises(T5ForgeError, match="examples 20 -> 19"):
        shorter.load_state_dict(loader.state_dict())
    with pytest.raises(T5ForgeError, match="no fine-tuning loader state"):
        shorter.load_state_dict({"version": 1, "consumed": 3, "readers": {}})


def _step_sources(loaders, grad_acc, steps, tok):
    """The source ids of each optimizer step's examples, all ranks and micro-steps together."""
    iterators = [iter(loader) for loader in loaders]
    out = []
    for _ in range(steps):
        rows = set()
        for _ in range(grad_acc):
            for it in iterators:
                batch = next(it)
                rows |= {tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"])}
        out.append(rows)
    return out


@pytest.mark.parametrize("before, after", [((2, 1), (1, 2)), ((1, 4), (2, 1)), ((2, 2), (4, 1))])
def test_resume_on_another_world_size_or_grad_acc_takes_the_same_examples_per_step(sni_train, t5_tokenizer,
                                                                                    before, after):
    """(world size, grad_acc) before and after a checkpoint at step 3 of a 5-step epoch: every later
    step trains on the examples it would have without the change, now dealt to other slots."""
    def loaders(world_size, grad_acc):
        return [make(sni_train, t5_tokenizer, grad_acc=grad_acc, rank=r, world_size=world_size)
                for r in range(world_size)]

    straight = _step_sources(loaders(*before), before[1], 8, t5_tokenizer)
    first = loaders(*before)
    assert _step_sources(first, before[1], 3, t5_tokenizer) == straight[:3]
    states = [loader.state_dict() for loader in first]
    second = loaders(*after)
    for loader in second:
        loader.load_rank_states(states)
    assert _step_sources(second, after[1], 5, t5_tokenizer) == straight[3:]


def test_resume_with_another_global_batch_is_refused(sni_train, t5_tokenizer):
    loader = make(sni_train, t5_tokenizer)
    take(loader, 3)
    with pytest.raises(T5ForgeError, match=r"optim.batch_size 4 -> 8"):
        make(sni_train, t5_tokenizer, batch_size=8).load_rank_states([loader.state_dict()])
