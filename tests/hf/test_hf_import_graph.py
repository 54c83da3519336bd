"""The modules of prefixattn.hf import one another without a circle (lazy imports inside functions included):
the names they share (attribute and kwarg keys) live in prefixattn/hf/_keys.py, which imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

HF = Path(__file__).resolve().parents[2] / "prefixattn" / "hf"


def _imports(path: Path) -> set[str]:
    """The sibling modules of prefixattn.hf that `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and (node.module or "").startswith("prefixattn.hf."):
                found.add(node.module.split(".")[2])
    return {name for name in found if (HF / f"{name}.py").is_file() and name != "__init__"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_hf_modules_import_without_a_circle():
    graph = {p.stem: _imports(p) for p in HF.glob("*.py") if p.stem != "__init__"}
    assert "attention" in graph["install"], graph  # the scan sees imports at all
    assert _cycle(graph) is None, _cycle(graph)
    assert graph["_keys"] == set()


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"attention": {"positions"}, "positions": {"attention"}}) == ["attention", "positions", "attention"]
    assert _cycle({"attention": {"positions", "_keys"}, "positions": {"_keys"}, "_keys": set()}) is None
