"""Write each chapter's notebook (chapters/NN_name.ipynb) from its plain-text source, without outputs.

    python chapters/pair.py            # after editing a chapters/NN_name.py
    python chapters/pair.py --check    # exit 1 if a notebook is missing or out of date

The .py file (jupytext percent format) is the one to edit and review; the .ipynb is its pair for
Jupyter users, committed without outputs. Both carry the jupytext pairing metadata, so
`jupytext --sync` works on them as well.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jupytext

HERE = Path(__file__).resolve().parent
FORMATS = "ipynb,py:percent"


def chapters() -> list[Path]:
    return sorted(HERE.glob("[0-9][0-9]_*.py"))


def notebook_text(source: Path) -> str:
    notebook = jupytext.read(source)
    notebook.metadata.setdefault("jupytext", {})["formats"] = FORMATS
    notebook.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    for number, cell in enumerate(notebook.cells):  # a pair never carries outputs: they rot and bloat diffs
        cell["id"] = f"cell-{number:02d}"  # nbformat draws random ids; fixed ones keep the file stable
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return jupytext.writes(notebook, fmt="ipynb")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for source in chapters():
        target, text = source.with_suffix(".ipynb"), notebook_text(source)
        if target.exists() and target.read_text() == text:
            continue
        stale.append(target.name)
        if not args.check:
            target.write_text(text)
    verb = "out of date" if args.check else "written"
    print(f"{len(stale)} notebook(s) {verb}: {', '.join(stale) or '-'}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
