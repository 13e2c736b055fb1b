"""Load a chapter's exercise solutions (chapters/solutions/NN_name.py: a name that is not an identifier)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SOLUTIONS = Path(__file__).resolve().parents[1] / "chapters" / "solutions"


def load_solutions(chapter: str) -> ModuleType:
    """``load_solutions("05_router")`` -> the module chapters/solutions/05_router.py."""
    path = SOLUTIONS / f"{chapter}.py"
    spec = importlib.util.spec_from_file_location(f"solutions_{chapter}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
