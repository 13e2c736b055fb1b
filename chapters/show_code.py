"""Show the code a chapter teaches: the current source of a function, class or method, read from its file.

    from show_code import show
    show(rms_norm)                         # a function
    show(MLA.attend_absorbed)              # a method
    show(route, lines=(1, 12))             # lines 1..12 of the function (1 = its `def` line)
    show(qk_clip_, start="gamma = ")       # from the first line containing "gamma = " to the end

In Jupyter the source appears as a highlighted ```python block under a one-line caption naming its file and
lines; anywhere else it is printed plainly. The chapters call this instead of pasting code, so a chapter
always shows the code as it is today. (The file is not named `code.py`: that would shadow the standard
library's `code` module for a kernel started in chapters/.)
"""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class ShowCodeError(TypeError):
    """The object has no Python source to show, or the lines asked for are not in it."""


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, property):
        return obj.fget
    if isinstance(obj, (classmethod, staticmethod)):
        return obj.__func__
    if inspect.isfunction(getattr(obj, "fn", None)):
        return obj.fn  # a @triton.jit kernel: its Python source is the kernel's source
    return inspect.unwrap(obj) if callable(obj) else obj


def _where(obj: Any) -> str:
    try:
        path = Path(inspect.getsourcefile(obj) or "").resolve()
    except TypeError:
        return "?"
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def source_of(obj: Any, lines: tuple[int, int] | None = None, start: str | None = None) -> tuple[str, str]:
    """``(caption, source)`` of ``obj``: caption like ``kimi_ref/norms.py, lines 30-36: rms_norm``.

    ``lines=(first, last)`` keeps only those lines of the object's source, counted from 1 (its ``def``
    or ``class`` line), both included. ``start="text"`` keeps the lines from the first one containing
    ``text`` to the end (it follows the code when lines are added above, where numbers would not).
    """
    target = _unwrap(obj)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(obj)
    try:
        body, first_line = inspect.getsourcelines(target)
    except (TypeError, OSError) as e:
        raise ShowCodeError(f"show_code: {name} ({type(obj).__name__}) has no Python source to show: {e}") from None
    if start is not None:
        if lines is not None:
            raise ShowCodeError("show_code: give lines or start, not both")
        found = [number for number, line in enumerate(body, 1) if start in line]
        if not found:
            raise ShowCodeError(f"show_code: no line of {name} contains {start!r}")
        lines = (found[0], len(body))
    if lines is not None:
        first, last = lines
        if not 1 <= first <= last <= len(body):
            raise ShowCodeError(f"show_code: lines={lines} is not inside {name}, which has lines 1..{len(body)}")
        body, first_line = body[first - 1:last], first_line + first - 1
    source = textwrap.dedent("".join(body)).rstrip("\n")  # a method reads as if written at the left margin
    caption = f"{_where(target)}, lines {first_line}-{first_line + len(body) - 1}: {name}"
    return caption, source


def markdown(caption: str, source: str) -> str:
    """The caption in code font and the source in a ```python fence longer than any backtick run inside."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", source)), default=0))
    return f"`{caption}`\n\n{fence}python\n{source}\n{fence}"


def _in_jupyter() -> bool:
    try:
        from IPython import get_ipython  # optional: plain Python has no IPython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


def show(obj: Any, lines: tuple[int, int] | None = None, start: str | None = None) -> None:
    """Display the source of ``obj`` (see :func:`source_of`): highlighted in Jupyter, printed elsewhere."""
    caption, source = source_of(obj, lines, start)
    if _in_jupyter():
        from IPython.display import Markdown, display

        display(Markdown(markdown(caption, source)))
    else:
        print(f"# {caption}\n{source}\n")
