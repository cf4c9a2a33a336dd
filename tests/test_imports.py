"""The package's import graph, read from the source with `ast` (nothing is imported).

Allowed direction (a module may import only from its own layer or the layers below it):

    t5forge.commands, t5forge.cli,           the CLI: may import anything (plot reads metrics.jsonl
    t5forge.plot                             through t5forge.train.metrics_log)
    t5forge.train                            the training engine: everything below
    t5forge.model, .data, .optim, .eval,     the components a run is built from, and the run's
    t5forge.config, .config_files, .plan     definition; they never import t5forge.train or
                                             t5forge.commands
    t5forge.errors, .constraints,            foundations: they import only each other
    .durations, .distributed, .stop_signals,
    .hub, .tokenizer, .console, .presets

Function-level imports count for the layering rule: a late import is still a dependency (it only
moves the cost to the first call), so `config.py` importing `t5forge.train.timing` inside a
function is as upward as at the top. Imports under `if TYPE_CHECKING:` count too (a type named in a
signature is a dependency of the reader, if not of the interpreter).

Cycles: module-level imports (those that run at import time and can fail on a half-initialised
module) must have none. Function-level imports must not close a cycle either: a late import is the
usual way to hide one from the interpreter, but the two modules still need each other, and the
package has no such pair (each late import here is for start-up time or an optional dependency,
e.g. `config_files.load_config` reading `t5forge.presets`, which imports nothing of the config).

The layer lists name directories and top-level modules, not files, so modules that move inside
`model/` (e.g. `model/fast/`) stay covered.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "t5forge"

# Module-name prefixes (a package covers everything under it) that must not import the UPPER ones.
LOWER = ("t5forge.model", "t5forge.data", "t5forge.optim", "t5forge.eval", "t5forge.config", "t5forge.config_files",
         "t5forge.plan")
UPPER = ("t5forge.train", "t5forge.commands")
FOUNDATIONS = ("t5forge.errors", "t5forge.constraints", "t5forge.durations", "t5forge.distributed",
               "t5forge.stop_signals", "t5forge.hub", "t5forge.tokenizer", "t5forge.console", "t5forge.presets")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _imports(path: Path, module: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported t5forge module, line, at module level) for every import statement in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def resolve(base: str, names) -> list[str]:
        # `from a.b import c`: c is the module a.b.c when that file exists, else a name in a.b.
        targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
        return targets or [base]

    def visit(node, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                targets = resolve(base, [a.name for a in child.names])
            else:
                deferred = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
                    isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
                visit(child, top and not deferred)
                continue
            for target in targets:
                if target == "t5forge" or target.startswith("t5forge."):
                    found.append((target, child.lineno, top))

    visit(tree, True)
    return found


def _graph():
    modules = _modules()
    known = set(modules)
    return modules, {name: _imports(path, name, known) for name, path in modules.items()}


def test_the_walk_sees_the_package():
    """The graph is not vacuous: it finds the package's modules and its known edges."""
    modules, edges = _graph()
    assert {"t5forge.config", "t5forge.plan", "t5forge.train.loop", "t5forge.model.t5"} <= set(modules)
    assert ("t5forge.errors", True) in {(t, top) for t, _, top in edges["t5forge.config"]}
    assert any(t == "t5forge.config" for t, _, _ in edges["t5forge.plan"])
    late = {t for t, _, top in edges["t5forge.config_files"] if not top}
    assert "t5forge.presets" in late  # a function-level import is seen, and marked as such


def test_lower_layers_never_import_train_or_commands():
    _, edges = _graph()
    upward = sorted(
        f"{module} -> {target} (line {line}{'' if top else ', inside a function'})"
        for module, found in edges.items() if _within(module, LOWER)
        for target, line, top in found if _within(target, UPPER)
    )
    assert not upward, "upward imports (see this file's docstring for the allowed direction):\n" + "\n".join(upward)


def test_foundations_import_only_foundations():
    modules, edges = _graph()
    assert set(FOUNDATIONS) <= set(modules)
    above = sorted(f"{module} -> {target} (line {line})" for module in FOUNDATIONS
                   for target, line, _ in edges[module] if target not in FOUNDATIONS)
    assert not above, "a foundation module imports from above it:\n" + "\n".join(above)


def _cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles_at_module_level():
    modules, edges = _graph()
    graph = {m: {t for t, _, top in found if top and t in modules and t != m} for m, found in edges.items()}
    cycle = _cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_no_import_cycles_through_function_level_imports():
    modules, edges = _graph()
    graph = {m: {t for t, _, _ in found if t in modules and t != m} for m, found in edges.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle (some of it inside functions): " + " -> ".join(cycle)
