"""The package's shape, checked on its source: no import cycle among modules (imports at module
level; imports inside functions are the deliberate lazy ones). tests/unit/test_family.py checks
the rest of the boundary: no private name imported across modules, no family name in core modules."""

from __future__ import annotations

import ast
from pathlib import Path

import vlmkit

PACKAGE = Path(vlmkit.__file__).parent


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return out


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


def _imports(name: str, tree: ast.Module, module_level: bool):
    """``(imported module, imported names)`` of each import in ``tree``'s body (module level:
    not inside functions, not under ``if TYPE_CHECKING``) or anywhere."""
    base = name if _is_package(name) else name.rpartition(".")[0]
    nodes = tree.body if module_level else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.If) and module_level and "TYPE_CHECKING" not in ast.unparse(node.test):
            yield from _imports(name, ast.Module(body=node.body, type_ignores=[]), True)
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                root = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{root}.{node.module}" if node.module else root
            else:
                target = node.module or ""
            yield target, [a.name for a in node.names]


def _graph(mods: dict[str, ast.Module]) -> dict[str, set[str]]:
    graph = {}
    for name, tree in mods.items():
        edges = set()
        for target, names in _imports(name, tree, module_level=True):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in mods and cand != name:
                    edges.add(cand)
                    break
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_among_modules():
    mods = _modules()
    graph = _graph(mods)
    assert len(graph) > 50 and graph["vlmkit.cli"]  # the walk found the package and its imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
