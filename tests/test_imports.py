"""The package's import graph follows the data flow: no import circle, and no module imports from a higher layer
(the layers of the developers' brief: a lower layer never reaches back up). The graph is read from the source
(every ``import`` / ``from ... import``, also inside functions), a package's re-exports followed to the module that
defines the name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "onerank"
# lowest first; a top-level module or package not named here sits at 5 (with fusion)
LAYERS = {"resources": 0, "metrics": 0, "nn": 0, "data": 1, "features": 2, "objectives": 2, "models": 3,
          "training": 4, "fusion": 5, "api": 6, "serving": 7, "benchmarking": 7, "cli": 8, "__main__": 9}


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file (a package by its ``__init__.py``)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = (package.name, *path.relative_to(package).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(module: str, path: Path) -> list[tuple[str, str | None]]:
    """(module, name or None) for every import of the file: ``from a.b import c`` -> ("a.b", "c"),
    ``import a.b`` -> ("a.b", None); relative imports resolved against the file's package."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found += [(base, alias.name) for alias in node.names]
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Edges between the package's modules. Package ``__init__`` files only re-export: an import of a name from a
    package leads to the module the ``__init__`` takes it from; the ``__init__`` files themselves are no nodes."""
    modules = module_files(package)
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    reexports = {
        pkg: {name: source for source, name in imported_names(pkg, modules[pkg]) if name and source in modules}
        for pkg in packages
    }

    def targets(source: str, name: str | None) -> list[str]:
        if name is not None and f"{source}.{name}" in modules:  # from package import submodule
            return [f"{source}.{name}"]
        if source in packages:
            origin = reexports[source].get(name)
            return [origin] if origin and origin not in packages else []
        return [source] if source in modules else []

    return {
        module: {t for source, name in imported_names(module, path) for t in targets(source, name) if t != module}
        for module, path in modules.items() if module not in packages
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected groups of more than one module (iterative Tarjan)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 5) if len(parts) > 1 else 5


def climbs(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(a) < layer(b))


def test_the_package_has_no_import_circle_and_no_import_up_the_layers():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and any(graph.values())  # the walk found the package and its imports
    assert cycles(graph) == []
    assert climbs(graph) == []


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "onerank" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "onerank"


@pytest.mark.parametrize("files, circle, climb", [
    # a circle through a function-level import, and through a relative one
    ({"__init__.py": "", "data/__init__.py": "", "data/a.py": "from onerank.data import b\n",
      "data/b.py": "def f():\n    from .a import x\n"}, [["onerank.data.a", "onerank.data.b"]], []),
    # a lower layer reaching up, through a package's re-export
    ({"__init__.py": "", "metrics/__init__.py": "", "metrics/m.py": "from onerank.data import Schema\n",
      "data/__init__.py": "from onerank.data.schema import Schema\n", "data/schema.py": "Schema = 1\n"},
     [], ["onerank.metrics.m -> onerank.data.schema"]),
    # downward imports only: clean
    ({"__init__.py": "", "api.py": "import onerank.models.x\nfrom onerank.data import y\n", "models/__init__.py": "",
      "models/x.py": "from onerank.data.y import z\n", "data/__init__.py": "", "data/y.py": "z = 1\n"}, [], []),
])
def test_the_walk_finds_circles_and_climbs(tmp_path, files, circle, climb):
    graph = import_graph(write_package(tmp_path, files))
    assert cycles(graph) == circle
    assert climbs(graph) == climb
