"""Every chapter runs top to bottom on the tiny model, each stays under its time budget, and each shows the
code it teaches through chapters/show_code.py (which renders the current source, never a pasted copy)."""

from __future__ import annotations

import ast
import importlib.util
import inspect
from pathlib import Path

import pytest

from run_chapter import execute_chapter

CHAPTERS = sorted((Path(__file__).resolve().parents[1] / "chapters").glob("[0-9][0-9]_*.py"))
BUDGET_S = 120  # per chapter, on 2 cores in CI


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_runs(chapter):
    notebook, seconds = execute_chapter(chapter, timeout=BUDGET_S)
    assert seconds < BUDGET_S, f"{chapter.name} took {seconds:.0f} s (budget {BUDGET_S} s)"
    shown = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
             if "python\n" in output.get("data", {}).get("text/markdown", "")]
    assert len(shown) >= 2, f"{chapter.name}: fewer than two code blocks rendered as Markdown by show_code.show"


# --- chapters show the code they teach (chapters/show_code.py) ----------------------------------------

def _load_show_code():
    spec = importlib.util.spec_from_file_location("show_code", CHAPTERS[0].parent / "show_code.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _show_calls(chapter: Path) -> int:
    """How many times the chapter calls `show` imported from show_code (never a pasted copy of code)."""
    tree = ast.parse(chapter.read_text())
    imported = any(isinstance(node, ast.ImportFrom) and node.module == "show_code"
                   and any(alias.name == "show" and alias.asname is None for alias in node.names)
                   for node in ast.walk(tree))
    calls = sum(isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "show"
                for node in ast.walk(tree))
    return calls if imported else 0


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_shows_its_code(chapter):
    assert _show_calls(chapter) >= 2, f"{chapter.name} should show the code it teaches with show_code.show (at least twice)"


def test_show_code_renders_current_source():
    from kimi_ref.norms import rms_norm
    from kimi_ref.mla import MLA

    show_code = _load_show_code()
    caption, source = show_code.source_of(rms_norm)
    assert source == inspect.getsource(rms_norm).rstrip("\n")
    assert caption.startswith("kimi_ref/norms.py, lines ") and caption.endswith(": rms_norm")
    first_line = inspect.getsourcelines(rms_norm)[1]
    assert f"lines {first_line}-" in caption

    caption, source = show_code.source_of(MLA.attend_absorbed, lines=(1, 2))
    assert source.startswith("def attend_absorbed(self") and len(source.splitlines()) == 2  # dedented
    caption, source = show_code.source_of(rms_norm, start="x32 = ")
    assert source.splitlines()[0].startswith("x32 = ") and source.splitlines()[-1].startswith("return ")
    body = inspect.getsourcelines(rms_norm)[0]
    x32_line = first_line + next(i for i, line in enumerate(body) if "x32 = " in line)
    assert caption == f"kimi_ref/norms.py, lines {x32_line}-{first_line + len(body) - 1}: rms_norm"

    from kimi_ref.kernels.rms_norm import _rms_norm_kernel  # a @triton.jit kernel (or the plain function)

    assert "def _rms_norm_kernel(" in show_code.source_of(_rms_norm_kernel)[1]
    text = show_code.markdown(caption, "x = '```'")
    assert "````python\nx = '```'\n````" in text  # a longer fence than any backtick run inside


def test_show_code_fails_without_source():
    show_code = _load_show_code()
    with pytest.raises(show_code.ShowCodeError, match="len .*no Python source"):
        show_code.show(len)
    from kimi_ref.norms import rms_norm

    with pytest.raises(show_code.ShowCodeError, match="not inside rms_norm"):
        show_code.show(rms_norm, lines=(2, 999))
    with pytest.raises(show_code.ShowCodeError, match="no line of rms_norm contains 'no such line'"):
        show_code.show(rms_norm, start="no such line")
