"""Tk-Instruct prompts (definition + 2 positive examples), written out literally from its collator."""

import json

from t5forge.data.instructions import PromptFormat, load_sni, tk_instruct_prompt

CHAD_ID = "task1146-04634bdd196f4824a85c1c21577de175"
DEFINITION_1146 = (
    "Definition: In this task, you are given a country name and you need to return the capital city of the "
    "given country.\n\n"
)
POS_1146 = [
    " Positive Example 1 -\nInput: United States.\n Output: Washington.\n\n",
    " Positive Example 2 -\nInput: India.\n Output: New Delhi.\n\n",
]
TAIL_CHAD = "Now complete the following example -\nInput: Chad.\nOutput: "

CHAD_PROMPT = (
    "Definition: In this task, you are given a country name and you need to return the capital city of the "
    "given country.\n"
    "\n"
    " Positive Example 1 -\n"
    "Input: United States.\n"
    " Output: Washington.\n"
    "\n"
    " Positive Example 2 -\n"
    "Input: India.\n"
    " Output: New Delhi.\n"
    "\n"
    "Now complete the following example -\n"
    "Input: Chad.\n"
    "Output: "
)

# Input and example outputs that already end in punctuation get no extra ".".
COAT_PROMPT = (
    'Definition: Two analogies that relate items to the associated containers is given in the form "A : B. C : ?". '
    '"A : B" relates item A to its associated container B. Your task is to replace the question mark (?) with the '
    'appropriate container for the given item C, following the "A : B" relation.\n'
    "\n"
    " Positive Example 1 -\n"
    "Input: soda : can. water : ?\n"
    " Output: bottle.\n"
    "\n"
    " Positive Example 2 -\n"
    "Input: jam : jar. cereal : ?\n"
    " Output: box.\n"
    "\n"
    "Now complete the following example -\n"
    "Input: jam : jar. coat : ?\n"
    "Output: "
)

# Newlines inside inputs are kept.
COPA_PROMPT = (
    'Definition: In this task your given two statements. You must judge whether the second sentence is the cause '
    'or effect of the first one. Label the instances as "cause" or "effect" based on your judgment. The sentences '
    "are separated by a newline character.\n"
    "\n"
    " Positive Example 1 -\n"
    "Input: The women met for coffee.\n"
    "They wanted to catch up with each other.\n"
    " Output: cause.\n"
    "\n"
    " Positive Example 2 -\n"
    "Input: The physician misdiagnosed the patient.\n"
    "The patient filed a malpractice lawsuit against the physician.\n"
    " Output: effect.\n"
    "\n"
    "Now complete the following example -\n"
    "Input: The child woke up screaming.\n"
    "He had a nightmare.\n"
    "Output: "
)


def _by_id(examples):
    return {e.id: e for e in examples}


def test_prompts_match_tk_instruct_text(sni_dir, t5_tokenizer):
    train = _by_id(load_sni(sni_dir, "train", t5_tokenizer))
    test = _by_id(load_sni(sni_dir, "test", t5_tokenizer))
    assert train[CHAD_ID].source == CHAD_PROMPT
    assert train[CHAD_ID].references == ("N'Djam",)
    assert test["task1159-1286e99aa0f64d6a863eb5e5539839a4"].source == COAT_PROMPT
    assert test["task828-ade8cb53e1c44721b96208dfeac42dea"].source == COPA_PROMPT


def test_positive_examples_dropped_when_they_do_not_fit(sni_dir, t5_tokenizer):
    assert CHAD_PROMPT == DEFINITION_1146 + "".join(POS_1146) + TAIL_CHAD
    task = json.loads((sni_dir / "tasks" / "task1146_country_capital.json").read_text())

    def count(text):
        return len(t5_tokenizer.encode(text))

    full = count(CHAD_PROMPT)
    assert tk_instruct_prompt(task, "task1146", "Chad", count, full) == CHAD_PROMPT
    # Tk-Instruct checks the 2nd example with the kept ones joined by " " (one extra space).
    one_pos = DEFINITION_1146 + POS_1146[0] + TAIL_CHAD
    limit = count(DEFINITION_1146 + POS_1146[0] + " " + POS_1146[1] + TAIL_CHAD) - 1
    assert count(one_pos) <= limit
    assert tk_instruct_prompt(task, "task1146", "Chad", count, limit) == one_pos
    no_pos = DEFINITION_1146 + TAIL_CHAD
    assert tk_instruct_prompt(task, "task1146", "Chad", count, count(one_pos) - 1) == no_pos


def test_prompt_format_switches(sni_dir, t5_tokenizer):
    task = json.loads((sni_dir / "tasks" / "task1146_country_capital.json").read_text())
    fmt = PromptFormat(add_task_name=True, num_pos_examples=1, num_neg_examples=1, add_explanation=True)
    got = tk_instruct_prompt(task, "task1146_country_capital", " Chad ", lambda t: 0, 1024, fmt)
    assert got == (
        "task1146_country_capital. " + DEFINITION_1146
        + " Positive Example 1 -\nInput: United States.\n Output: Washington.\n"
        " Explanation: Washington is the capital city of United States.\n\n"
        " Negative Example 1 -\nInput: France.\n Output: Rome.\n"
        " Explanation: Rome is not the capital city of France. Paris is the capital city of France.\n\n"
        + TAIL_CHAD
    )
    no_def = tk_instruct_prompt(task, "t", "Chad", lambda t: 0, 1024, PromptFormat(add_task_definition=False))
    assert no_def == "".join(POS_1146) + TAIL_CHAD


def test_too_long_prompt_cut_like_the_collator(sni_dir, t5_tokenizer):
    examples = _by_id(load_sni(sni_dir, "train", t5_tokenizer, max_source_length=12))
    src = examples[CHAD_ID].source
    # The first 12 tokens of the definition-only prompt (the examples did not fit), decoded back to text.
    expected = t5_tokenizer.decode(t5_tokenizer.encode(DEFINITION_1146 + TAIL_CHAD)[:12])
    assert src == expected
    assert src.startswith("Definition: In this task, you are given")
