"""Span corruption undone, for the tests of the objectives that make it (span corruption, UL2's R/X
denoisers): the original tokens back from an example's inputs and targets."""


def rebuild(inputs, targets, tokenizer):
    """Span corruption undone: each target span back at its sentinel, sentinels checked in order."""
    assert inputs[-1] == targets[-1] == tokenizer.eos_id
    spans, expected = {}, tokenizer.sentinel_id(0)
    for tok in targets[:-1]:
        if tokenizer.is_sentinel(tok):
            assert tok == expected, "target sentinels out of order"
            spans[tok], expected = [], tok - 1
        else:
            spans[expected + 1].append(tok)
    raw, expected = [], tokenizer.sentinel_id(0)
    for tok in inputs[:-1]:
        if tokenizer.is_sentinel(tok):
            assert tok == expected, "input sentinels out of order"
            raw += spans.pop(tok)
            expected -= 1
        else:
            raw.append(tok)
    assert not spans, "a target span has no sentinel in the input"
    return raw
