"""The package's shape: no import cycle between microser's modules, no module over 600 lines.

Imports are read with ``ast`` (top-level and inside functions alike), so a
cycle hidden behind a function-level import is found too.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "microser"
MAX_LINES = 600


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """``microser.x.y`` -> its file, for every ``.py`` under ``root`` (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = ("microser",) + path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The microser modules that ``name`` (its file at ``path``) imports anywhere in its text."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:  # `from microser import qat` imports the module microser.qat
                found.add(f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module)
    return {m for m in found if m in modules and m != name}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, modules in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "microser"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from microser.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from microser.sub import c\n")
    (pkg / "sub" / "c.py").write_text("from ..a import x\n")   # relative: microser.a
    (pkg / "d.py").write_text("from microser import a\n")
    graph = import_graph(pkg)
    assert graph["microser.d"] == {"microser.a"}
    assert graph["microser.sub.c"] == {"microser.a"}
    assert find_cycle(graph) == ["microser.a", "microser.b", "microser.sub.c", "microser.a"]
    (pkg / "b.py").write_text("def f():\n    pass\n")
    assert find_cycle(import_graph(pkg)) is None


def test_no_import_cycle_between_microser_modules():
    graph = import_graph()
    assert {"microser.compress", "microser.export", "microser.cgen.plan"} <= set(graph)
    assert "microser.quantize" in graph["microser.compress"] or "microser.quantize" in graph["microser.measure"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_is_over_600_lines():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in module_files().items()}
    assert len(sizes) > 40 and "microser.cgen.emit" in sizes
    over = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them into modules of one job each): {over}"
