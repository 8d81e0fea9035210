"""The package's shape: no import circle between its modules, and no module or class too long to read at once."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "llm_blueprint")
MAX_MODULE_LINES = 420
MAX_CLASS_LINES = 300


def _modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """Every import of the module, deferred ones inside functions included (a circle hidden by deferring an
    import is still a circle), except those only for type checkers (under ``if TYPE_CHECKING``)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = package.split(".")
                if node.level:
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # "from pkg import sub" imports the submodule sub when there is one
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            for target in targets:
                while target and target not in modules:  # a.b.c where c is an attribute: the module a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
                    parent = target.rpartition(".")[0]
                    while parent:  # importing a.b.c runs a/__init__ and a/b/__init__ first
                        if parent in modules and parent != name and not name.startswith(parent + "."):
                            graph[name].add(parent)
                        parent = parent.rpartition(".")[0]
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle():
    graph = import_graph()
    assert graph["llm_blueprint.engine.generation"] >= {"llm_blueprint.engine.scheduler"}  # the parser sees imports
    assert _cycles(graph) == []


def test_the_circle_check_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_and_classes_stay_readable():
    long_modules, long_classes = [], []
    for name, path in _modules().items():
        with open(path, encoding="utf-8") as f:
            source = f.read()
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES:
            long_modules.append((name, lines))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long_classes.append((f"{name}.{node.name}", node.end_lineno - node.lineno + 1))
    assert long_modules == [] and long_classes == []


def test_the_runtime_is_the_only_door_to_an_engine():
    """chat/ and api/ reach an engine through its ChatModel (the Runtime's chat models: it adds the metrics and
    counts the model's users, so that it is never unloaded under them), never by holding it; only the readiness
    probe and the metrics look at its state (engine_if_loaded)."""
    offenders = []
    for name, path in _modules().items():
        if not name.startswith(("llm_blueprint.api.", "llm_blueprint.chat.")):
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "engine":
                offenders.append(f"{name}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("engine.generation"):
                offenders.append(f"{name}:{node.lineno} imports the engine")
    assert offenders == []
