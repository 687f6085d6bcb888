"""The package's layout: imports run down the floors, never in a circle, and a wing is entered by its door.

Every `import` in `dist_train/` (function-level ones too) is read with `ast`. A unit is a module at the
door (`loop`, `config`, ...) or a wing (`data/`, `checkpoint/`, ...); each unit has a floor, and a unit
may only import from a lower floor or from inside itself. From outside, a wing is imported through its
`__init__` only, so its other modules stay free to change.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dist_train"

# Lowest first. A unit imports only from units on a lower floor (or from inside itself).
FLOORS = [
    {"errors", "_version", "state", "examples"},
    {"eval_spec"},
    {"config"},
    {"accelerate_internals", "plugins"},
    {"data", "checkpoint"},
    {"components"},
    {"evaluation", "faults"},
    {"loop", "export"},
    {"doctor", "__init__", "inference"},
    {"cli"},
    {"__main__"},
]
FLOOR_OF = {unit: floor for floor, units in enumerate(FLOORS) for unit in units}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the dist_train modules it imports (as written: `from .data import x` names `dist_train.data`)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` may name a submodule rather than an attribute
                targets = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules] or [target]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                targets = [module] if module else [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t.startswith("dist_train") and t != name)
        graph.setdefault(name, set())
    return dict(graph)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle found by a depth-first search (one path per back edge)."""
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{src} -> {dst}"
        for src, dsts in graph.items()
        for dst in dsts
        if unit_of(src) != unit_of(dst) and FLOOR_OF[unit_of(dst)] >= FLOOR_OF[unit_of(src)]
    ]


def test_every_unit_has_a_floor():
    units = {unit_of(m) for m in import_graph()}
    assert units <= set(FLOOR_OF), f"give these a floor in FLOORS: {sorted(units - set(FLOOR_OF))}"


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_imports_only_run_down_the_floors():
    assert upward_imports(import_graph()) == []


def test_a_wing_is_entered_through_its_init():
    wings = {p.parent.name for p in PACKAGE.glob("*/__init__.py")} - {"examples"}
    private = [
        f"{src} -> {dst}"
        for src, dsts in import_graph().items()
        for dst in dsts
        if unit_of(dst) in wings and unit_of(src) != unit_of(dst) and dst != f"dist_train.{unit_of(dst)}"
    ]
    assert private == []


def test_the_checker_sees_a_circle_and_an_upward_import():
    """The rules above would catch what they are for (a check that cannot fail proves nothing)."""
    graph = {"dist_train.accelerate_internals": {"dist_train.checkpoint"}, "dist_train.checkpoint": {"dist_train.accelerate_internals"}}
    assert cycles(graph) == [["dist_train.accelerate_internals", "dist_train.checkpoint", "dist_train.accelerate_internals"]]
    assert upward_imports(graph) == ["dist_train.accelerate_internals -> dist_train.checkpoint"]


def test_the_layout_figures(capsys):
    """Prints the figures the README quotes: modules, units, floors in use."""
    graph = import_graph()
    units = {unit_of(m) for m in graph}
    floors = {FLOOR_OF[u] for u in units}
    with capsys.disabled():
        print(
            f"\nlayout: {len(graph)} modules, {len(units)} units on {len(floors)} floors, {len(cycles(graph))} cycles, {len(upward_imports(graph))} upward imports"
        )
    assert len(units) <= 20
