"""The package's layers: a module imports only from its own layer or below, and no imports go in a circle.

Read from the source (every ``import`` of a detkd module, at module level or inside a function), so a new module
must be placed in a layer here: that is the point where its place in the architecture is decided.
"""

from __future__ import annotations

import ast
from pathlib import Path

import detkd

PACKAGE = Path(detkd.__file__).resolve().parent

# low → high; a module may import from its own layer and the ones before it
LAYERS = [
    ["detkd.errors", "detkd.utils", "detkd.runtime", "detkd.adapters.view", "detkd.losses.registry"],
    ["detkd.safe_load", "detkd.losses"],  # losses.* : pure tensor functions
    ["detkd.ultralytics_internals"],  # every use of Ultralytics internals
    ["detkd.data", "detkd.config"],
    ["detkd.evaluation", "detkd.adapters"],
    [
        "detkd.distiller",
        "detkd.transfer",
        "detkd.export",
        "detkd.teacher_train",
        "detkd.backbone_pretrain",
        "detkd.video",
        "detkd.speed",
        "detkd.pseudo_label",
    ],
    ["detkd.engine.criterion", "detkd.engine.ddp"],
    ["detkd.engine.trainer"],
    ["detkd.engine"],  # api
    ["detkd.diagnose", "detkd.quickstart", "detkd.benchmark"],
    ["detkd.cli", "detkd"],
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"}


def _imports(path: Path) -> set[str]:
    """detkd modules imported by the file (``from detkd.x import y`` is ``detkd.x.y`` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "detkd":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "detkd"}
    return found


def _layer(module: str) -> int:
    """The layer of the longest prefix listed (``detkd.losses.feature`` is in ``detkd.losses``'s layer)."""
    best = max(
        (
            (len(prefix), i)
            for i, layer in enumerate(LAYERS)
            for prefix in layer
            if f"{module}.".startswith(f"{prefix}.")
        ),
        default=None,
    )
    assert best is not None, f"{module} is in no layer of tests/test_layering.py: place it there"
    return best[1]


def test_every_module_imports_only_its_layer_or_below():
    upward = [
        f"{module} (layer {_layer(module)}) imports {dep} (layer {_layer(dep)})"
        for module, path in MODULES.items()
        for dep in _imports(path)
        if _layer(dep) > _layer(module)
    ]
    assert upward == []


def test_no_import_circles():
    graph = {m: {d for d in _imports(p) if d in MODULES and d != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return [*path, module, dep]
            if dep not in state and (cycle := visit(dep, [*path, module])):
                return cycle
        state[module] = 2
        return None

    cycles = [cycle for m in sorted(graph) if m not in state and (cycle := visit(m, []))]
    assert cycles == []
