"""Small formatting helpers shared by the weights_tools command lines."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """Decimal units, as checkpoint sizes are quoted (595.15 GB, 24.77 MB)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def table(rows: list[list[str]], header: list[str], right: set[int] | None = None) -> str:
    """A plain-text table; columns in ``right`` are right-aligned (numbers)."""
    right = right or set()
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] → '0..2, 5'."""
    out, numbers = [], sorted(set(numbers))
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(str(numbers[i]) if i == j else f"{numbers[i]}..{numbers[j]}")
        i = j + 1
    return ", ".join(out)
