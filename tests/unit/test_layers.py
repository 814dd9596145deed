"""The package's layers (docs/architecture.md): imports only go down, no cycles, no oversized module or class.

Read from the source with ``ast``, so an import inside a function or under ``TYPE_CHECKING``
counts as much as one at the top of a module: either is a dependency a reader must know of.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gateway"

# Bottom up. A module may import its own layer and every layer before it in this list.
# ``settings`` sits above ``routing`` (it reads the budget rules) and below ``net``.
ORDER = ["http", "observe", "routing", "settings", "net", "auth", "upstream", "blobs", "relay", "root"]
ROOT_MODULES = {"allocator", "app", "check", "__main__", "sizing"}
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300


def layer_of(module: str) -> str:
    """``gateway.net.egress`` -> ``net``; ``gateway.settings`` -> ``settings``; ``gateway`` itself is the version."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__init__":
        return "http"  # gateway/__init__.py holds only __version__: anyone may read it
    if parts[1] in ROOT_MODULES or parts[1].startswith("check"):
        return "root"
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every ``gateway`` module that ``module`` (with this source) imports, wherever the import stands."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "gateway")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "gateway":
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                # ``from gateway.observe import metrics`` names a module; ``from gateway.http.errors import X`` a name.
                is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    PACKAGE.parent / Path(*candidate.split("."))
                ).is_dir()
                found.add(candidate if is_module else target)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: imports_of(path.read_text(), name, path.name == "__init__.py") for name, path in MODULES.items()}


def upward(module: str, deps: set[str]) -> list[str]:
    """The imports of ``module`` that reach a layer above its own."""
    rank = ORDER.index(layer_of(module))
    return [d for d in sorted(deps) if ORDER.index(layer_of(d)) > rank]


def test_every_subpackage_is_a_known_layer() -> None:
    for name in MODULES:
        assert layer_of(name) in ORDER, f"{name}: not in a known layer ({ORDER})"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_only_go_down(module: str) -> None:
    found = upward(module, GRAPH[module])
    assert not found, f"{module} ({layer_of(module)}) imports a higher layer: {found}"


def test_no_import_cycles() -> None:
    # Depth-first search for a back edge; a package face (__init__) is a node like any other.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH.get(node, ())):
            if dep not in GRAPH:
                continue
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(dep) :], dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_every_subpackage_says_what_it_may_import() -> None:
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init}: no docstring"
        assert "import" in doc, f"{init}: the docstring does not say which layers it may import"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_or_class_too_large(module: str) -> None:
    source = MODULES[module].read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, f"{module}: over {MAX_MODULE_LINES} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{module}.{node.name}: {size} lines (over {MAX_CLASS_LINES})"


def test_the_checker_sees_hidden_upward_imports() -> None:
    # The rule is only worth having if it can fail: imports inside a function, under
    # TYPE_CHECKING and relative ones are all seen, and an import of the same layer is not flagged.
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import breaker\n"
        "if TYPE_CHECKING:\n"
        "    from gateway.upstream.client import UpstreamClient\n"
        "def f():\n"
        "    from gateway.relay import exchange\n"
    )
    deps = imports_of(source, "gateway.net.probe")
    assert upward("gateway.net.probe", deps) == ["gateway.relay.exchange", "gateway.upstream.client"]
    assert "gateway.net.breaker" in deps
