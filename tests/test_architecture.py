"""The package's shape: no import cycle between its modules (imports inside functions count too), and the
low layers never import the high ones."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (SRC / "antidote").rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        typing_only = {  # imports under `if TYPE_CHECKING:` never run
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for stmt in block.body
            for n in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: level 1 is this package, 2 its parent, ...
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                # `from pkg import sub` imports the submodule when there is one, else the package.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:  # `import a.b.c` of a name inside a module
                    target = target.rpartition(".")[0]
                if target.startswith("antidote") and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 30 and "antidote.cli" in graph
    assert cycles(graph) == []


def test_layers_point_one_way() -> None:
    """data and tasks know nothing of models, training, evaluation, defenses or experiments."""
    graph = import_graph()
    high = (
        "antidote.training",
        "antidote.evaluation",
        "antidote.defenses",
        "antidote.experiments",
        "antidote.cli",
    )
    for name, deps in graph.items():
        if name.startswith(("antidote.data", "antidote.tasks")):
            assert not [d for d in deps if d.startswith(high)], name


def private_names(source: str) -> list[tuple[str, str]]:
    """(module, name) of every `from antidote.x import _name` in `source` (imports inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("antidote"):
            found += [(str(node.module), a.name) for a in node.names if a.name.startswith("_")]
    return [(m, n) for m, n in found if not n.startswith("__")]


def private_imports() -> list[tuple[str, str, str]]:
    """(importing module, imported module, name) for every private import in the package."""
    return sorted(
        (module_name(path), module, name)
        for path in (SRC / "antidote").rglob("*.py")
        for module, name in private_names(path.read_text())
    )


def test_the_private_import_finder_finds_a_planted_one() -> None:
    source = "from antidote.x import _hidden, public, __version__\ndef f():\n    from antidote.y import _z\n"
    assert private_names(source) == [("antidote.x", "_hidden"), ("antidote.y", "_z")]
    assert private_names("from torch import _C\nfrom antidote.x import public\n") == []


def test_no_module_imports_a_private_name_of_another() -> None:
    assert private_imports() == []


def test_no_file_over_500_lines_in_experiments_and_evaluation() -> None:
    long = {
        str(p.relative_to(SRC)): n
        for folder in ("experiments", "evaluation")
        for p in (SRC / "antidote" / folder).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert long == {}


def test_no_type_ignore_comments_in_tests() -> None:
    """mypy checks src/antidote only (pyproject.toml), so an ignore comment in a test silences nothing."""
    marker = "type" + ": ignore"  # split so that this file does not match itself
    found = [p.name for p in Path(__file__).parent.rglob("*.py") if marker in p.read_text()]
    assert found == []
