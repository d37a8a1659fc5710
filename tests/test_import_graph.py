"""The package's shape, read from its source with ``ast`` (nothing imported): intra-package imports form an
acyclic graph, the library never imports ``dit_kernels.bench``, and no module outside a family's own file
and the registry names a family (as a string) or imports a family's diffusers transformer class."""

import ast
from pathlib import Path

import pytest

import dit_kernels
from dit_kernels.models import FAMILY_MODULES, families

PACKAGE = Path(dit_kernels.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The dit_kernels modules ``name`` imports (at any depth of its code, lazy imports included); ``from
    package import submodule`` counts as importing the submodule (the package is initialised already)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # a submodule, else a name defined by the module ``base`` itself
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def test_intra_package_imports_are_acyclic():
    """Depth-first search over the import graph; a back edge is a cycle, reported as its path."""
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == "open":
                cycle = path[path.index(dep):] + [dep] if dep in path else [name, dep]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in MODULES:
        if name not in state:
            visit(name, [name])


# Tools above the library that may use the bench: the bench itself and the selftest (which runs it).
TOOLS = ("dit_kernels.bench", "dit_kernels.selftest")


def test_the_library_never_imports_the_bench():
    offenders = {name: sorted(d for d in deps if d.startswith("dit_kernels.bench"))
                 for name, deps in GRAPH.items() if not name.startswith(TOOLS)}  # fmt: skip
    assert {k: v for k, v in offenders.items() if v} == {}


def _family_files() -> set[str]:
    """The modules allowed to name a family: each family's own module and the registry."""
    return {f"dit_kernels.models.{name}" for name in FAMILY_MODULES} | {"dit_kernels.models"}


def test_no_module_outside_a_family_names_one():
    """String literals equal to a family name, and imports of a family's transformer class, appear only in
    that family's file and the registry (everything else iterates the registry or asks the Family)."""
    names = set(FAMILY_MODULES)
    classes = {cls.__name__ for family in families() for cls in family.classes}
    found = []
    for name, path in MODULES.items():
        if name in _family_files():
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in names | classes:
                found.append(f"{name}:{node.lineno}: {node.value!r}")
            elif isinstance(node, ast.ImportFrom) and any(alias.name in classes for alias in node.names):
                found.append(f"{name}:{node.lineno}: imports {[a.name for a in node.names if a.name in classes]}")
    assert found == []
