"""The house rules of kimi_ref/, checked on the source: imports at the top, no import cycle, a first line per file.

* An ``import`` inside a function is allowed only for an optional dependency (triton, tiktoken, jinja2,
  PyAV, starlette/uvicorn), so a reader finds every dependency of a file at its top.
* No two modules of kimi_ref import each other, directly or around a loop (module-level imports).
* Every file opens with a docstring whose first line says what it holds.
* The backend's name is read in one place: no file but backend.py compares a string to "triton".
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kimi_ref"
FILES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)

# Imports that may sit inside a function: optional extras, and kimi_ref/__init__'s lazy loader.
OPTIONAL = ("triton", "tiktoken", "jinja2", "av", "starlette", "uvicorn", "kimi_ref.serve.app")


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.AST, here: str, is_package: bool) -> list[str]:
    """The module names an import statement names, relative imports resolved against ``here``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        parent = here.split(".") if is_package else here.split(".")[:-1]
        parent = parent[: len(parent) - (node.level - 1)]
        base = ".".join(parent + ([base] if base else []))
    # "from kimi_ref import moonvit" imports the module kimi_ref.moonvit
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def imports_inside_functions(path: Path, package: Path = PACKAGE) -> list[str]:
    found = []
    for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = imported(node, module_name(path, package), path.name == "__init__.py")
                    if not any(n == o or n.startswith(o + ".") for n in names for o in OPTIONAL):
                        found.append(f"{path.relative_to(package.parent)}:{node.lineno} imports {names[0]}")
    return found


def import_graph() -> dict[str, set[str]]:
    """Module-level imports between kimi_ref's own modules (those inside functions or try-blocks for an
    optional extra included: a try at module level still runs at import)."""
    modules = {module_name(p): p for p in FILES}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges = set()
        for node in tree.body:
            for stmt in ast.walk(node) if isinstance(node, ast.Try) else [node]:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    edges |= {n for n in imported(stmt, name, path.name == "__init__.py") if n in modules and n != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop (a list of modules, first == last), or None. A package's own __init__ importing
    its submodules is how packages re-export, so package -> child edges are not followed."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (loop := visit(nxt)):
                return loop
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (loop := visit(start)):
            return loop
    return None


def test_no_import_inside_a_function_but_optional_extras():
    found = [line for p in FILES for line in imports_inside_functions(p)]
    assert found == [], "move these imports to the top of their file:\n" + "\n".join(found)


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_checks_can_fail(tmp_path):
    """A function-level import and a loop are found when they are there."""
    package = tmp_path / "kimi_ref"
    package.mkdir()
    bad = package / "bad.py"
    bad.write_text('"""x."""\ndef f():\n    import json\n    from triton import language\n', encoding="utf-8")
    assert imports_inside_functions(bad, package) == ["kimi_ref/bad.py:3 imports json"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"k": {"k.x"}, "k.x": {"k"}}) is None  # a package re-exporting its child


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_file_says_what_it_holds_in_its_first_line(path):
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert doc and len(doc.splitlines()[0].split()) >= 3, f"{path}: open with a docstring whose first line names its concept"


def test_only_backend_py_reads_a_backend_name():
    readers = []
    for path in FILES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare) and any(
                    isinstance(c, ast.Constant) and c.value == "triton" for c in [node.left, *node.comparators]):
                readers.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert readers == [], "the backend is chosen in kimi_ref/backend.py only: " + ", ".join(readers)
