"""The package's shape, checked: no import cycle between modules, and each layer imports only the layers below it.

docs/architecture.md states the rule; this test reads every module's imports
with ``ast`` (TYPE_CHECKING imports included: a typing-only cycle is still a
knot for the reader) and fails naming the offending module.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "kvmkit"

# layer -> the layers it may import (besides itself). Top to bottom as in docs/architecture.md.
ALLOWED: dict[str, set[str]] = {
    "__main__": {"cli"},
    "__init__": {"api"},
    "pytest_plugin": {"api"},
    "cli": {"__init__", "api", "machine", "boot", "devices", "host", "kvm", "profile", "memory", "errors", "x86", "selftest"},
    "api": {"machine", "boot", "host", "errors", "memory"},
    "machine": {"boot", "devices", "host", "kvm", "profile", "memory", "errors", "x86"},
    "boot": {"host", "memory", "errors", "x86"},
    "devices": {"memory", "errors"},
    "host": {"errors"},
    "profile": {"kvm", "errors"},
    "kvm": {"errors"},
    "memory": {"errors"},
    "selftest": set(),
    "x86": set(),
    "errors": set(),
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The kvmkit modules ``name`` imports (a package when the imported name is not a module)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("kvmkit"):
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in modules else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kvmkit"))
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layers_import_only_downwards() -> None:
    bad = []
    for module, deps in sorted(_graph().items()):
        layer = _layer(module)
        allowed = ALLOWED.get(layer)
        assert allowed is not None, f"{module}: layer {layer!r} is not in the table; add it to docs/architecture.md and here"
        for dep in sorted(deps):
            if _layer(dep) != layer and _layer(dep) not in allowed:
                bad.append(f"{module} imports {dep}")
    assert not bad, "imports against the layer rule (docs/architecture.md):\n" + "\n".join(bad)


def test_the_checker_sees_a_cycle(tmp_path: Path) -> None:
    """The graph reader follows relative imports; a test that can fail."""
    modules = {"kvmkit.a": tmp_path / "a.py", "kvmkit.b": tmp_path / "b.py"}
    modules["kvmkit.a"].write_text("from .b import x\n")
    modules["kvmkit.b"].write_text("from . import a\n")
    assert _imports("kvmkit.a", modules["kvmkit.a"], modules) == {"kvmkit.b"}
    assert _imports("kvmkit.b", modules["kvmkit.b"], modules) == {"kvmkit.a"}
