"""Data flows one way through the package: no module imports, at any depth, one that imports it back.

The graph is read from the source (every import statement, function-level ones included), so an import
put inside a function to dodge a cycle at load time counts as what it is: a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyggml_resnet"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """The package's modules that `path` imports anywhere in its body. `from . import x` names module x when x
    is one, else the package (x is defined in its __init__); `from .m import name` names m."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from base import x`: module base.x if there is one, else base itself (x is its attribute)
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    return {name: imported_modules(p, set(paths), root) for name, p in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None. Importing a package's submodule runs the package's __init__, which
    is not an edge here: only import statements are."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20 and "pyggml_resnet.convert.write" in graph  # it really read the package
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_walk_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: a cycle closed by an import inside a function, two packages deep, is found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (pkg / "sub" / "b.py").write_text("def f():\n    import json\n")
    assert find_cycle(import_graph(pkg)) is None


@pytest.mark.parametrize("args", [["--out", "r.csv"], ["--json"]], ids=["out", "print"])
def test_classify_without_ray_imports_neither_ray_nor_pyarrow(model_files, tmp_path, args):
    """Ray and pyarrow cost seconds to import: a run without --ray never loads them (.csv needs neither)."""
    from PIL import Image

    _, _, model = model_files(18, 10)
    Image.new("RGB", (40, 30), (200, 10, 30)).save(tmp_path / "a.png")
    code = ("import sys; from pyggml_resnet import cli; rc = cli.main(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyarrow'))); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "classify", str(tmp_path / "a.png"), "--model", str(model),
                        "--threads", "1", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "[]"
    if args[0] == "--out":
        assert (tmp_path / "r.csv").read_text().startswith("path,labels,indices,probs,error")
