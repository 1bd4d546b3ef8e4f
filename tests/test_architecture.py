"""The package's shape, checked from its source (DESIGN.md, README "Architecture"): imports only point down the
layers, no module imports itself back through a circle, and no function grows past what a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "carclf"

# Top to bottom. A module may import modules of its own layer's packages only within its own package (a step never
# imports another step), and any module of a lower layer.
LAYERS: list[tuple[str, set[str]]] = [
    ("entry points", {"cli", "__main__", "demo", "nest"}),
    ("steps", {"train", "calibrate", "ensemble", "export", "serve", "analyze"}),
    ("predictor", {"infer"}),
    ("models, data, artifacts", {"models", "data", "artifacts", "tracking"}),
    ("core", {"metrics", "runtime", "config", "io", "errors", "tta", "__init__"}),
]
# Packages of these layers may import each other (acyclically): the CLI runs the demo; the storage layer is one.
SHARED_LAYER = {"entry points", "models, data, artifacts", "core"}
LONG_FUNCTION = 80
# The report's HTML text and the demo's drawing code are long by nature (DESIGN.md): one page, one car.
LONG_ALLOWED = {("demo/synth.py", "_draw_car")}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = p.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path) -> set[str]:
    """The carclf modules ``name`` imports (anywhere in the file: lazy imports count too), as module names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                if not (node.module or "").startswith("carclf"):
                    continue
                target = node.module.removeprefix("carclf").lstrip(".")
            for alias in node.names:  # "from carclf.analyze import report_stats" imports a module
                found.add(f"{target}.{alias.name}" if target else alias.name)
            found.add(target or "__init__")
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("carclf").lstrip(".") for a in node.names if a.name.startswith("carclf")}
    return found


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or ("__init__" if "__init__" in modules else None)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = {_resolve(t, modules) for t in _imports(name, path)}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, (_, packages) in enumerate(LAYERS):
        if top in packages:
            return i
    raise AssertionError(f"carclf.{module} is in no layer of tests/test_architecture.py: add its package to LAYERS")


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)


def test_imports_only_point_down():
    bad = []
    for src, targets in _graph().items():
        for dst in targets:
            a, b = _layer(src), _layer(dst)
            same_package = src.split(".")[0] == dst.split(".")[0]
            if a > b or (a == b and not same_package and LAYERS[a][0] not in SHARED_LAYER):
                bad.append(f"carclf.{src} ({LAYERS[a][0]}) imports carclf.{dst} ({LAYERS[b][0]})")
    assert not bad, "imports that climb back up or cross between steps:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(m: str) -> None:  # depth-first search; a grey node met again closes a circle
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                circles.append(" -> ".join([*stack[stack.index(n):], n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_no_function_is_too_long_to_read():
    long = []
    for path in _modules().values():
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONG_FUNCTION and (rel, node.name) not in LONG_ALLOWED:
                    long.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {LONG_FUNCTION} lines:\n" + "\n".join(long)


@pytest.mark.parametrize("probe", ["circle", "climb"])
def test_the_checks_catch_what_they_are_for(probe, monkeypatch):
    """The checks above fail on a circle and on an upward import (so a green run means something)."""
    graph = _graph()
    if probe == "circle":
        graph = {**graph, "metrics": graph["metrics"] | {"errors"}, "errors": graph["errors"] | {"metrics"}}
    else:
        graph = {**graph, "metrics": graph["metrics"] | {"infer.predictor"}}
    import sys

    monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: graph)
    check = test_no_import_circles if probe == "circle" else test_imports_only_point_down
    with pytest.raises(AssertionError):
        check()
