"""Super-NaturalInstructions (SNI) from the official task-JSON layout, as Tk-Instruct prompts.

Reads `splits/default/{train,test}_tasks.txt` and `tasks/<task>.json` directly (no dataset script, no
network) and does what Tk-Instruct's `ni_dataset.py` + `DataCollatorForNI` do, as nanoT5 uses them:
- test tasks keep the first 100 instances (the official, label-balanced evaluation set), training
  tasks all of them; then `random.shuffle` and the first `max_num_instances_per_task`. One
  `random.Random(seed)` per split shuffles its tasks in split-file order: for the train split that
  is exactly what `set_seed(seed)` followed by ni_dataset's global `random.shuffle` calls gives;
  for the test split the *set* is the same whenever the cap is >= 100 (the official setting), only
  the order differs (Tk-Instruct's global RNG has shuffled the train tasks first);
- prompt = "Definition: ..." + up to 2 positive examples + "Now complete the following example -"
  (no task name, no negative examples, no explanations); a positive example is added only while
  the prompt still fits `max_source_length` tokens, and a prompt that is still too long is cut to
  its first `max_source_length` tokens (which can cut off the instance's "Output:" tail: that is
  Tk-Instruct's behaviour, counted and logged here, never dropped);
- every reference output is kept: training picks one per batch, evaluation scores against all.

Only English tasks (input, output and instruction language all "English") are read; the official
default split lists hold only those, and any other task is reported in the log, by name.
"""

from __future__ import annotations

import json
import logging
import random
import string
from dataclasses import dataclass
from pathlib import Path

from t5forge.data.seq2seq import Seq2SeqExample, log_truncation
from t5forge.errors import T5ForgeError

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
NUM_OFFICIAL_EVAL_INSTANCES = 100  # the first 100 instances of a test task are the official eval set
LANGUAGE_KEYS = ("Input_language", "Output_language", "Instruction_language")


@dataclass(frozen=True)
class PromptFormat:
    """Tk-Instruct's encoding switches; the defaults are the "def + 2 pos" setup nanoT5 trains with."""

    add_task_name: bool = False
    add_task_definition: bool = True
    num_pos_examples: int = 2
    num_neg_examples: int = 0
    add_explanation: bool = False


# ---------------------------------------------------------------------------------- files
def sni_paths(sni_dir, splits_dir=None, tasks_dir=None) -> tuple[Path, Path]:
    """(splits dir, tasks dir): by default `<sni_dir>/splits/default` and `<sni_dir>/tasks`."""
    if sni_dir is None and (splits_dir is None or tasks_dir is None):
        raise T5ForgeError(
            "SNI: give the SNI folder (holding splits/default/ and tasks/) or both splits_dir and tasks_dir"
        )
    sni_dir = Path(sni_dir) if sni_dir is not None else None
    splits = Path(splits_dir) if splits_dir is not None else sni_dir / "splits" / "default"
    tasks = Path(tasks_dir) if tasks_dir is not None else sni_dir / "tasks"
    if not tasks.is_dir():
        raise T5ForgeError(
            f"SNI task folder not found: {tasks} (expected tasks/<task>.json files from allenai/natural-instructions)"
        )
    return splits, tasks


def read_split_file(path) -> list[str]:
    """Task names of a split file, one per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise T5ForgeError(
            f"SNI split file not found: {path} "
            "(the official layout has splits/default/train_tasks.txt and test_tasks.txt)"
        )
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise T5ForgeError(f"SNI split file {path} lists no tasks")
    return names


def _check_text_list(task: dict, key: str, path: Path) -> None:
    value = task.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise T5ForgeError(f"{path}: key {key!r} must be a list of strings, got {value!r}")


def read_task(path, split_file=None) -> dict:
    """One task JSON, validated: a definition, instances with an id, an input and >= 1 output."""
    path = Path(path)
    if not path.is_file():
        listed = f" listed in {split_file}" if split_file else ""
        raise T5ForgeError(
            f"SNI task {path.stem}{listed} has no task file {path}; "
            "add the file or remove the task from the split file"
        )
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise T5ForgeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(task, dict):
        raise T5ForgeError(f"{path}: a task file must hold one JSON object")
    definition = task.get("Definition")
    if isinstance(definition, str):
        definition = [definition]
    if not (isinstance(definition, list) and definition and isinstance(definition[0], str) and definition[0].strip()):
        raise T5ForgeError(f"{path}: the task has no definition (key 'Definition' must be a non-empty list of strings)")
    task["Definition"] = definition
    for key in ("Categories", *LANGUAGE_KEYS):
        _check_text_list(task, key, path)
    for key in ("Positive Examples", "Negative Examples"):
        examples = task.setdefault(key, [])
        def valid(e):
            return isinstance(e, dict) and isinstance(e.get("input"), str) and isinstance(e.get("output"), str)

        if not isinstance(examples, list) or not all(valid(e) for e in examples):
            raise T5ForgeError(f"{path}: {key!r} must be a list of objects with string 'input' and 'output'")
    instances = task.get("Instances")
    if not isinstance(instances, list) or not instances:
        raise T5ForgeError(f"{path}: the task has no instances (key 'Instances' must be a non-empty list)")
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict) or not isinstance(inst.get("id"), str):
            raise T5ForgeError(f"{path}: instance #{i} has no string 'id'")
        if not isinstance(inst.get("input"), str):
            raise T5ForgeError(f"{path}: instance {inst['id']} has no string 'input'")
        out = inst.get("output")
        if not isinstance(out, list) or not out:
            raise T5ForgeError(
                f"{path}: instance {inst['id']} has an empty output list; every instance needs >= 1 reference output"
            )
        if not all(isinstance(o, str) for o in out):
            raise T5ForgeError(f"{path}: instance {inst['id']} has a non-string output")
    return task


def is_english(task: dict) -> bool:
    return all(task[key] == ["English"] for key in LANGUAGE_KEYS)


def select_instances(instances: list, split: str, max_num_instances: int | None, rng: random.Random) -> list:
    """Tk-Instruct's choice: test -> first 100; then shuffle and keep the first `max_num_instances`."""
    if split == "test":
        instances = instances[:NUM_OFFICIAL_EVAL_INSTANCES]
    instances = list(instances)
    if max_num_instances is not None and max_num_instances >= 0:
        rng.shuffle(instances)
        instances = instances[:max_num_instances]
    return instances


# ---------------------------------------------------------------------------------- prompt
def _end_sentence(text: str) -> str:
    # Tk-Instruct closes every field with "." unless it already ends in ASCII punctuation.
    return text if text[-1] in string.punctuation else text + "."


def _example_block(kind: str, idx: int, example: dict, add_explanation: bool) -> str:
    block = _end_sentence(f" {kind} Example {idx + 1} -\nInput: {example['input'].strip()}") + "\n"
    block = _end_sentence(block + f" Output: {example['output'].strip()}") + "\n"
    if add_explanation and "explanation" in example:
        block = _end_sentence(block + f" Explanation: {example['explanation'].strip()}") + "\n"
    return block + "\n"


def tk_instruct_prompt(task: dict, task_name: str, instance_input: str, count_tokens, max_source_length: int,
                       fmt: PromptFormat = PromptFormat()) -> str:
    """The Tk-Instruct source text for one instance, before truncation.

    `count_tokens(text)` is the encoded length with EOS, as the collator's `len(tokenizer(text)["input_ids"])`.
    """
    return _build_prompt(task, task_name, instance_input, count_tokens, max_source_length, fmt)[0]


def _build_prompt(task, task_name, instance_input, count_tokens, max_source_length, fmt) -> tuple[str, int]:
    """(prompt, number of positive examples that fit)."""
    task_input = _end_sentence(f"Now complete the following example -\nInput: {instance_input.strip()}") + "\nOutput: "
    name = task_name + ". " if fmt.add_task_name else ""
    definition = ""
    if fmt.add_task_definition:
        definition = _end_sentence("Definition: " + task["Definition"][0].strip()) + "\n\n"

    # The fit checks join the kept blocks with " " while the prompt joins them with "": both as
    # Tk-Instruct writes them, so that the same examples are kept.
    pos: list[str] = []
    for idx, ex in enumerate(task["Positive Examples"][: fmt.num_pos_examples]):
        block = _example_block("Positive", idx, ex, fmt.add_explanation)
        if count_tokens(definition + " ".join(pos) + block + task_input) > max_source_length:
            break
        pos.append(block)
    neg: list[str] = []
    for idx, ex in enumerate(task["Negative Examples"][: fmt.num_neg_examples]):
        block = _example_block("Negative", idx, ex, fmt.add_explanation)
        if count_tokens(definition + " ".join(pos) + " ".join(neg) + block + task_input) > max_source_length:
            break
        neg.append(block)
    return name + definition + "".join(pos) + "".join(neg) + task_input, len(pos)


# ---------------------------------------------------------------------------------- loading
def read_sni_instances(sni_dir, split: str, *, max_num_instances_per_task: int | None = 100,
                       seed: int = 42, english_only: bool = True, splits_dir=None, tasks_dir=None):
    """[(task_name, task_dict, instance)] of a split, selected as Tk-Instruct does (no tokenizer needed)."""
    if split not in SPLITS:
        raise T5ForgeError(f"SNI split must be one of {SPLITS}, got {split!r}")
    splits, tasks = sni_paths(sni_dir, splits_dir, tasks_dir)
    split_file = splits / f"{split}_tasks.txt"
    rng = random.Random(seed)
    selected, skipped = [], []
    for name in read_split_file(split_file):
        task = read_task(tasks / f"{name}.json", split_file)
        if english_only and not is_english(task):
            skipped.append(name)
            continue
        for inst in select_instances(task["Instances"], split, max_num_instances_per_task, rng):
            selected.append((name, task, inst))
    if skipped:
        logger.warning(
            "SNI %s: %d non-English task(s) in %s not used: %s", split, len(skipped), split_file, ", ".join(skipped)
        )
    if not selected:
        raise T5ForgeError(f"SNI {split}: no English task in {split_file}")
    return selected


def load_sni(sni_dir, split: str, tokenizer, *, max_num_instances_per_task: int | None = 100,
             max_source_length: int = 1024, max_target_length: int = 128, seed: int = 42,
             fmt: PromptFormat = PromptFormat(), english_only: bool = True,
             splits_dir=None, tasks_dir=None) -> list[Seq2SeqExample]:
    """SNI split as Tk-Instruct examples: source = prompt, references = all outputs, task + categories kept.

    nanoT5 / Tk-Instruct use `max_num_instances_per_task=100` for both splits.
    """
    rows = read_sni_instances(sni_dir, split, max_num_instances_per_task=max_num_instances_per_task, seed=seed,
                              english_only=english_only, splits_dir=splits_dir, tasks_dir=tasks_dir)

    # With 2 positive examples the last fit check encodes exactly the final prompt: keep it.
    last: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        if text not in last:
            last.clear()
            last[text] = tokenizer.encode(text)
        return last[text]

    def count_tokens(text: str) -> int:
        return len(encode(text))

    examples, long_sources, fewer_pos = [], 0, 0
    for name, task, inst in rows:
        source, num_pos = _build_prompt(task, name, inst["input"], count_tokens, max_source_length, fmt)
        ids = encode(source)
        if len(ids) > max_source_length:
            long_sources += 1
            # As the collator: keep the first max_source_length tokens, back to text.
            source = tokenizer.decode(ids[:max_source_length], skip_special_tokens=True)
        fewer_pos += num_pos < min(fmt.num_pos_examples, len(task["Positive Examples"]))
        examples.append(Seq2SeqExample(id=inst["id"], source=source, references=tuple(inst["output"]),
                                       task=name, categories=tuple(task["Categories"])))
    num_tasks = len({name for name, _, _ in rows})
    logger.info("SNI %s: %d tasks, %d instances (max %s per task, seed %d); %d prompts kept fewer positive "
                "examples to fit %d tokens", split, num_tasks, len(examples), max_num_instances_per_task, seed,
                fewer_pos, max_source_length)
    log_truncation(
        examples, tokenizer, max_source_length, max_target_length, name=f"SNI {split}", long_sources=long_sources
    )
    return examples
