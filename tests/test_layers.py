"""The layers of `mrml` (issue 17, item 4), read from the source with `ast` (importing `mrml` loads every
layer, so this cannot be checked by importing): no import cycle among its modules, and the functional core
with the solvers below it import nothing from `mrml.algorithms`.

An import counts wherever it is written (module level or inside a function); one under
`if TYPE_CHECKING:` does not (it never runs). `from .pkg import name` depends on `pkg` (or on `pkg.name`
when that is a module); the parent packages Python initialises on the way are not counted (a package's
`__init__` re-exporting its modules would otherwise close a circle with each of them)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mrml

ROOT = Path(mrml.__file__).parent
#: the functional core and the layers below it: none of them may reach `mrml.algorithms`
CORE = ("mrml.functional", "mrml.implicit", "mrml.pytree", "mrml.solvers")


def module_names() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("mrml", *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The `mrml` modules that `name` imports (see the module docstring)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_blocks(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            targets = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in modules else base_name for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import mrml.x.y` names a module, or a name in one
                target = target.rpartition(".")[0]
            if target.startswith("mrml") and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_import_graph_finds_imports_at_any_depth_but_not_type_checking_ones():
    graph = import_graph()
    assert "mrml.algorithms.batched" in graph["mrml.algorithms.mrml"]
    assert "mrml.solvers.head" in graph["mrml.algorithms.exact_head"]
    assert "mrml.algorithms.mrml" not in graph["mrml.algorithms.exact_head"]  # under TYPE_CHECKING only
    assert "mrml.functional" in graph["mrml.algorithms.base"]  # `from .. import functional as fn`


def test_the_cycle_finder_reports_a_circle_of_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_mrml_modules():
    found = cycles(import_graph())
    assert not found, f"import cycles among mrml's modules: {found}"


@pytest.mark.parametrize("layer", CORE)
def test_the_core_and_the_solvers_reach_nothing_in_algorithms(layer):
    graph = import_graph()
    names = [m for m in graph if m == layer or m.startswith(layer + ".")]
    assert names
    for name in names:
        bad = sorted(m for m in reachable(graph, name) | {name} if m.startswith("mrml.algorithms"))
        assert not bad, f"{name} imports (directly or through others) {bad}"


def test_one_flatten_serves_the_core_and_the_head_layout():
    """`mrml.pytree.flatten`/`unflatten` is the one pair: the core re-exports it, the head layout wraps it."""
    import torch

    from mrml import functional, pytree
    from mrml.algorithms.base import flat
    from mrml.solvers import HeadLayout

    assert functional.flatten is pytree.flatten is flat and functional.unflatten is pytree.unflatten
    params = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7.0, 8.0])}
    head = HeadLayout(params)
    w = head.matrix(params)
    assert torch.equal(head.to_flat(w), torch.tensor([0.0, 1, 2, 3, 4, 5, 7, 8]))
    assert torch.equal(head.from_flat(head.to_flat(w), w), w)
    stacked = {k: torch.stack([v, 10 * v]) for k, v in params.items()}  # (T = 2, ...) rows
    rows = pytree.flatten(stacked, batched=True)
    assert rows.shape == (2, 8) and torch.equal(rows[1], 10 * rows[0])
    back = pytree.unflatten(rows, stacked, batched=True)
    assert all(torch.equal(back[k], stacked[k]) for k in stacked)
