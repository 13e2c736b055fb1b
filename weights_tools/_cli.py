"""The exit codes every command line of the project uses, and its one-line error format.

    0  done                      2  usage: the command line, or a path it names, cannot be used as given
    1  failure or problems found (checked before any work starts: nothing was read at length or written)
    130  interrupted (Ctrl-C); whatever was being written was left as it was
"""

from __future__ import annotations

import sys

__all__ = ["OK", "FAILURE", "USAGE", "INTERRUPTED", "fail"]

OK, FAILURE, USAGE, INTERRUPTED = 0, 1, 2, 130


def fail(prog: str, error: object, code: int) -> int:
    """Print ``prog: error: ...`` (one line) to stderr and return ``code``."""
    label = "interrupted" if code == INTERRUPTED else "error"
    text = " ".join(str(error).split("\n"))
    print(f"{prog}: {label}: {text}", file=sys.stderr)
    return code
