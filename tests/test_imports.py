"""No import cycle inside `optin_hf`.

The graph holds every import statement of a module, relative or absolute: at module level, in
class bodies and inside functions. An import moved into a function still makes the module
depend on the other one, so it cannot hide a cycle; a cycle is broken by moving code to the
module it belongs in, or by passing an object down. Only imports under `if TYPE_CHECKING:`
are left out (they never run). Importing `optin_hf.a.b` also runs `optin_hf/a/__init__.py`,
so the importer depends on that package too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import optin_hf

PACKAGE = Path(optin_hf.__file__).parent


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package in folder `root` by dotted name (a package by its own name)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, functions' included, except those under `if TYPE_CHECKING`."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports, at import time or when a function runs."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = []
        for node in imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
                continue
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = ".".join(p for p in (base if node.level else "", node.module or "") if p)
            targets.append(base)
            targets += [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import submodule`
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the module and every package above it
                dep = ".".join(parts[:i])
                if dep in modules and dep != name and not name.startswith(dep + "."):
                    graph[name].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_optin_hf_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert {"optin_hf.allocate", "optin_hf.engine.estimate"} <= graph["optin_hf.pruner"]  # the walker sees imports
    assert "optin_hf.recipe_search" in graph["optin_hf.pruner"]  # an import inside a function counts
    assert "optin_hf.engine.run" in graph["optin_hf.engine.token_losses"]
    cycle = find_cycle(graph)
    assert cycle is None, (
        f"import cycle: {' -> '.join(cycle)}. Data flows one way (capture -> score -> allocate -> slim -> save): "
        "make the later module depend on the earlier one only, by moving the shared code down to a module both "
        "can import or by passing the object down; an import inside a function counts too."
    )


def test_the_graph_holds_the_imports_that_run_and_a_cycle_is_named(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from .b import x\n",
        "b.py": "from . import c\nclass B:\n    from .sub import d\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\ndef f():\n    import os\n",
        "sub/__init__.py": "from .d import w\n",
        "sub/d.py": "import os\nfrom .. import c\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.c", "pkg.sub", "pkg.sub.d"},
        "pkg.c": set(),  # imports under TYPE_CHECKING never run
        "pkg.sub": {"pkg.sub.d"},
        "pkg.sub.d": {"pkg.c"},
    }
    assert find_cycle(graph) is None
    (pkg / "sub/d.py").write_text("from ..a import x\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.d", "pkg.a"]


@pytest.mark.parametrize(
    "where",
    [
        "def f():\n    from .a import z\n",  # relative, in a function
        "class C:\n    def m(self):\n        import pkg.a\n",  # absolute, in a method
        "def f():\n    def g():\n        from pkg import a\n",  # a submodule named by `from pkg import`
        "try:\n    pass\nexcept ImportError:\n    from . import a\n",
    ],
)
def test_an_import_inside_a_function_or_block_still_closes_a_cycle(tmp_path, where):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .c import x\n")
    (pkg / "c.py").write_text(where)
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.c", "pkg.a"]


def test_a_prune_job_never_climbs_back_up_the_import_graph(tmp_path):
    """`prune_model` then `save`, traced call by call (benchmarks/job_road.py): control never enters a module that
    depends on the one it leaves (a callback or a base class calling down into its subclass's module), and no module
    runs only to find it has nothing to do (streaming on a model in memory, token merging on a text model)."""
    sys.path.insert(0, str(PACKAGE.parent / "benchmarks"))
    from job_road import prune_model_road

    road = prune_model_road(tmp_path, importance="optin")
    steps = {"optin_hf.pruner", "optin_hf.importance.optin", "optin_hf.allocate", "optin_hf.slim", "optin_hf.reconstruct",
             "optin_hf.checkpoint"}
    assert steps <= set(road.modules)  # the trace followed the whole job
    assert not road.climbs, f"climbs up: {dict(road.climbs)}"
    assert not {"optin_hf.engine.streaming", "optin_hf.tokens", "optin_hf.recipe_search"} & set(road.modules)


def test_the_recipe_search_never_climbs_back_up_either(tmp_path):
    """importance="auto" prunes a copy per candidate recipe: the pruner runs them and calls the search's parts
    (split, candidates, distance) below it, so control still only flows down the import graph."""
    sys.path.insert(0, str(PACKAGE.parent / "benchmarks"))
    from job_road import prune_model_road

    road = prune_model_road(tmp_path)  # the default: importance="auto"
    assert {"optin_hf.pruner", "optin_hf.recipe_search", "optin_hf.checkpoint"} <= set(road.modules)
    assert not road.climbs, f"climbs up: {dict(road.climbs)}"
