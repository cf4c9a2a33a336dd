"""Every code block of README.md runs, as written, and does what the README says.

How a block is run is set by an HTML comment (invisible on GitHub) on the line right before its
opening fence:

    <!-- readme-test: MODE [; replace "OLD" "NEW"]... [; expect "TEXT"]... -->

MODE is one of
- `run` (the default for ```bash and ```python blocks without a comment): the block runs in one
  scratch directory shared by all blocks, in README order, like one terminal session from the
  repository's root (bash blocks pass their exported variables on; `T5FORGE_DATA` is the sample data).
  `replace` edits the block's text first: the only way to make a slow block quick, stated next to
  it. Each `expect` TEXT must appear in the block's output.
- `print-config`: for commands that need a GPU, the Hub or hours. The bash block runs with every
  `t5forge` command given `--print-config`, so the whole config resolves (keys, types, presets);
  each must print the resolved YAML config, and at least one must run. Cluster launches in such a
  block (`torchrun ... -m t5forge`, `srun`, an sbatch script's `scontrol` and `SLURM_*`) go
  through CLUSTER_SHIMS: they launch nothing and run the t5forge command they wrap.
- `install` / `ci`: the commands (comments dropped) are not run here; together, in README order,
  they must be exactly the commands of `.ci/run`.
- `layout`: a tree of the repository; see `test_layout_block_is_the_repository`.

A block of another language, or with an unknown mode or directive, fails the test.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CI_SCRIPT = REPO / ".ci" / "run"
MODES = ("run", "print-config", "install", "ci", "layout")
MARKER = re.compile(r"<!--\s*readme-test:(.*?)-->\s*\Z")
BLOCK_TIMEOUT_S = 600
# print-config blocks may show cluster launches: `torchrun ... -m t5forge ARGS` and `srun CMD` launch
# nothing here but run the t5forge command (so its config is checked), `scontrol show hostnames`
# names this machine, and the SLURM_* variables an sbatch script reads describe a 2-node job.
CLUSTER_SHIMS = [
    'torchrun() { while [ $# -gt 0 ] && [ "$1" != "-m" ]; do shift; done; '
    '[ "${2:-}" = t5forge ] || { echo "torchrun: expected -m t5forge" >&2; return 2; }; shift 2; t5forge "$@"; }',
    'srun() { "$@"; }',
    'scontrol() { hostname; }',
    'SLURM_NNODES=2 SLURM_JOB_ID=1 SLURM_JOB_NODELIST=localhost SLURM_GPUS_ON_NODE=8',
]


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    mode: str = ""
    replace: list = field(default_factory=list)
    expect: list = field(default_factory=list)

    def __str__(self):
        return f"README.md:{self.line} (```{self.lang}, {self.mode})"


def parse_marker(block: Block, body: str) -> None:
    lexer = shlex.shlex(body, posix=True, punctuation_chars=";")
    lexer.whitespace_split = True
    parts, current = [], []
    for token in lexer:
        if token == ";":
            parts.append(current)
            current = []
        else:
            current.append(token)
    parts.append(current)
    if not parts[0] or len(parts[0]) != 1 or parts[0][0] not in MODES:
        raise ValueError(f"README.md:{block.line}: the marker must start with one of {MODES}, got {body.strip()!r}")
    block.mode = parts[0][0]
    for directive in parts[1:]:
        if len(directive) == 3 and directive[0] == "replace":
            block.replace.append((directive[1], directive[2]))
        elif len(directive) == 2 and directive[0] == "expect":
            block.expect.append(directive[1])
        else:
            raise ValueError(f"README.md:{block.line}: unknown directive {directive!r} "
                             '(use: replace "OLD" "NEW" / expect "TEXT")')


def readme_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"\s*```(\S*)\s*\Z", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"README.md:{i + 1}: code block never closed")
        block = Block(line=i + 1, lang=fence.group(1), text="\n".join(lines[i + 1:end]) + "\n")
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(before.strip())
        if marker:
            parse_marker(block, marker.group(1))
        elif block.lang in ("bash", "python"):
            block.mode = "run"
        else:
            raise ValueError(f"README.md:{block.line}: a ```{block.lang} block without a readme-test marker; "
                             f"say how to test it (one of {MODES})")
        if block.mode in ("run", "print-config") and block.lang not in ("bash", "python"):
            raise ValueError(f"{block}: only bash and python blocks can be run")
        if block.mode == "print-config" and block.lang != "bash":
            raise ValueError(f"{block}: print-config is for bash blocks of t5forge commands")
        for old, new in block.replace:
            if old not in block.text:
                raise ValueError(f"{block}: replace {old!r}: no such text in the block (stale marker)")
            block.text = block.text.replace(old, new)
        blocks.append(block)
        i = end + 1
    return blocks


@pytest.fixture(scope="module")
def blocks() -> list[Block]:
    return readme_blocks(README.read_text(encoding="utf-8"))


def commands(text: str) -> list[str]:
    """The command lines of a shell text: comments and blank lines dropped, continuations joined."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*", "", line).strip()  # no '#' inside quotes in these commands
        if line:
            out.append(" ".join(line.split()))
    return out


def test_every_block_has_a_known_way_to_run(blocks):
    # readme_blocks raises on a block it cannot run; here: the README holds each kind the tests rely on
    kinds = {b.mode for b in blocks}
    assert {"run", "print-config", "install", "ci", "layout"} <= kinds, kinds
    assert any(b.lang == "python" and b.mode == "run" for b in blocks)


def test_the_marker_parser_refuses_what_it_does_not_know():
    with pytest.raises(ValueError, match="without a readme-test marker"):
        readme_blocks("text\n\n```yaml\na: 1\n```\n")
    with pytest.raises(ValueError, match="must start with one of"):
        readme_blocks("<!-- readme-test: skip -->\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="unknown directive"):
        readme_blocks('<!-- readme-test: run; expect-file "x" -->\n```bash\nls\n```\n')
    with pytest.raises(ValueError, match="stale marker"):
        readme_blocks('<!-- readme-test: run; replace "steps=9" "steps=1" -->\n```bash\nls\n```\n')
    (block,) = readme_blocks('<!-- readme-test: run; replace "a=1" "a=2"; expect "x; y" -->\n```bash\necho a=1\n```\n')
    assert block.text == "echo a=2\n" and block.expect == ["x; y"]


def test_ci_runs_exactly_the_readme_install_and_test_commands(blocks):
    ci = commands(CI_SCRIPT.read_text())
    assert ci[0] == "#!/usr/bin/env bash" or not ci[0].startswith("#!")  # the shebang is dropped as a comment
    mechanics = ["set -euo pipefail", 'cd "$(dirname "$0")/.."']
    assert ci[:2] == mechanics, ci
    readme = [cmd for b in blocks if b.mode in ("install", "ci") for cmd in commands(b.text)]
    assert readme == ci[2:], f"README install + test commands:\n{readme}\n.ci/run:\n{ci[2:]}"
    assert [b.mode for b in blocks if b.mode in ("install", "ci")] == ["install", "ci"]


def test_layout_block_is_the_repository(blocks):
    """Each name in the first column exists (an indented name: inside the directory above it); each
    `name.py` a description mentions exists (inside the line's directory, if it names one); a
    package of src/t5forge whose description names some of its modules names all of them; and every
    module and package of src/t5forge appears."""
    (layout,) = [b for b in blocks if b.mode == "layout"]
    package = REPO / "src" / "t5forge"
    parents: dict[int, Path] = {}
    problems = []
    entries = []  # (indent, first column, description); deeper-indented lines continue a description
    for raw in layout.text.splitlines():
        indent = len(raw) - len(raw.lstrip())
        if raw.strip() and entries and indent > entries[-1][0] + 4:
            entries[-1][2] += " " + raw.strip()
        elif raw.strip():
            names, _, description = raw.strip().partition("  ")
            entries.append([indent, names, description])
    for indent, names, description in entries:
        base = parents.get(indent - 2, REPO) if indent else REPO
        where = base
        for name in (n.strip() for n in names.split(",")):
            path = base / name
            if not path.exists():
                problems.append(f"{path.relative_to(REPO)} does not exist")
            elif name.endswith("/"):
                parents[indent] = where = path
        for mentioned in re.findall(r"([A-Za-z_0-9]+)\.py", description):
            if not (where / f"{mentioned}.py").exists():
                problems.append(f"{(where / mentioned).relative_to(REPO)}.py does not exist")
        if where is not base and package in where.parents:  # a package of ours: are its modules all listed?
            modules = {p.stem for p in where.glob("*.py") if not p.name.startswith("__")}
            words = set(re.findall(r"[A-Za-z_0-9]+", description))
            if modules & words:
                problems += [f"{where.relative_to(REPO)}/{m}.py is not in the layout" for m in sorted(modules - words)]
    named = set(re.findall(r"[A-Za-z_0-9]+", layout.text))
    problems += [f"src/t5forge/{p.name} is not in the layout" for p in sorted(package.iterdir())
                 if (p.suffix == ".py" or (p / "__init__.py").exists()) and not p.name.startswith("__")
                 and p.stem not in named]
    assert not problems, "README Layout section:\n" + "\n".join(problems)


def session_env(data_dir: Path) -> dict:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["T5FORGE_DATA"] = str(data_dir)
    env["OMP_NUM_THREADS"] = "1"  # two test workers share two cores
    env["MPLBACKEND"] = "Agg"
    if shutil.which("t5forge", path=env["PATH"]) is None:
        pytest.fail(f"no `t5forge` command next to {sys.executable}: install the project (pip install -e .)")
    return env


def run_block(block: Block, cwd: Path, env: dict, env_file: Path) -> str:
    script = cwd / f".readme-block-{block.line}"
    if block.lang == "python":
        script = script.with_suffix(".py")
        script.write_text(block.text)
        argv = [sys.executable, str(script)]
    else:
        calls = cwd / f".readme-calls-{block.line}"
        # set -a: the block's variables are exported, so that `export -p` hands them to the next block
        prelude = ["set -euo pipefail -a", f'if [ -f "{env_file}" ]; then . "{env_file}"; fi']
        if block.mode == "print-config":
            calls.mkdir()
            prelude.append(f't5forge() {{ __n=$(( ${{__n:-0}} + 1 )); command t5forge "$@" --print-config '
                           f'> "{calls}/$__n.yaml"; }}')
            prelude += CLUSTER_SHIMS
        script.write_text("\n".join(prelude) + "\n" + block.text + f'\nexport -p > "{env_file}"\n')
        argv = ["bash", str(script)]
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{block} failed (exit {result.returncode}):\n{block.text}\n--- output:\n{output[-6000:]}"
    for text in block.expect:
        assert text in output, f"{block}: the output lacks {text!r}:\n{output[-6000:]}"
    if block.mode == "print-config":
        printed = sorted((cwd / f".readme-calls-{block.line}").glob("*.yaml"))
        assert printed, f"{block}: no t5forge command ran"
        for path in printed:
            config = yaml.safe_load(path.read_text())
            assert isinstance(config, dict) and config.get("mode") in ("pt", "ft"), f"{block}: {path.read_text()[:500]}"
    return output


def test_readme_blocks_run_as_written(blocks, tmp_path, data_dir):
    """One session, in README order: the quick start's run is what the later blocks use."""
    env = session_env(data_dir)
    session = tmp_path / "session"
    session.mkdir()
    env_file = tmp_path / "session.env"
    timings = []
    for block in blocks:
        if block.mode not in ("run", "print-config"):
            continue
        start = time.perf_counter()
        run_block(block, session, env, env_file)
        timings.append(f"{block}: {time.perf_counter() - start:.1f}s")
    print("\n".join(timings))


def test_every_config_key_named_in_readme_and_messages_exists():
    """`section.key=...` in the README and in the code's messages (advice such as
    `data.train_files=[...]`) names a real config key."""
    from t5forge.config import describe_keys

    keys = {key for key, *_ in describe_keys()}
    sections = {key.split(".")[0] for key in keys}
    texts = {README: README.read_text(encoding="utf-8")}
    texts.update({p: p.read_text(encoding="utf-8") for p in (REPO / "src" / "t5forge").rglob("*.py")})
    unknown = sorted({f"{path.relative_to(REPO)}: {name}" for path, text in texts.items()
                      for name in re.findall(r"(?<![\w./])([a-z_]+\.[a-z_]+)=", text)
                      if name.split(".")[0] in sections and name not in keys})
    assert not unknown, unknown
