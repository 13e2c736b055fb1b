"""Where do two traces part? Per layer and activation: relative error, max ulp distance, router flips.

    python -m weights_tools.diff A B [--plot FILE.png] [--force]

    compare(a: Trace, b: Trace) -> Comparison        (load them with weights_tools.trace_file.load_trace)

A and B are trace files (``python -m weights_tools.trace``, or any engine following docs/numerics.md)
of the same token ids. Each float activation is judged by the one tolerance table
(``kimi_ref/tolerances.py``) at the row of the less precise side: the relative L∞ error
``max|a − b| / max|reference|`` (the reference is the more precise side; B when they tie) and the
largest distance in units in the last place of that dtype (among the elements of at least 2⁻⁴ of the
reference's largest magnitude: near zero ulps shrink without end). The first activation, in forward order,
past its row is marked: that is where to look. For each MoE layer the fraction of tokens whose
*set* of chosen experts differs is printed as well: a mixture of experts flips experts long before
the logits look wrong, and a flip is not an error by itself (bf16 flips near-ties).

Exit status: 0 when every activation is within tolerance, 1 when one is not, 2 on a bad input.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kimi_ref.tolerances import PRECISION_ORDER, RTOL, rel_error, row_dtype, smallest_normal, ulp_distance
from weights_tools._format import table
from weights_tools.safe_write import OutputError, check_file, write_file
from weights_tools.trace_file import Trace, TraceError, load_trace, split_name

__all__ = ["Row", "Comparison", "compare", "expert_flips", "plot", "main"]


@dataclass
class Row:
    """One activation compared: its error, and whether it is past the tolerance."""

    name: str
    layer: int | None
    activation: str
    rel_error: float
    max_ulp: int
    past: bool


@dataclass
class Comparison:
    a: Trace
    b: Trace
    precision: object  # the row of kimi_ref.tolerances.RTOL both are judged by
    tolerance: float
    rows: list[Row] = field(default_factory=list)
    flips: dict[int, tuple[int, int]] = field(default_factory=dict)  # layer -> (tokens flipped, tokens)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)

    @property
    def first_past(self) -> Row | None:
        return next((r for r in self.rows if r.past), None)

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)


def _rank(precision) -> int:
    if precision not in PRECISION_ORDER:
        raise TraceError(f"precision {precision!r} has no row in kimi_ref/tolerances.py; expected one of "
                         f"{[str(p) for p in PRECISION_ORDER]}")
    return PRECISION_ORDER.index(precision)


def expert_flips(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many tokens of two [B,T,k] expert-id tensors chose a different set of experts (order ignored)."""
    return int((a.sort(-1).values != b.sort(-1).values).any(-1).sum())


ULP_FLOOR = 2.0**-4  # ulps are counted where |reference| >= this fraction of its largest magnitude


def _max_ulp(actual: torch.Tensor, expected: torch.Tensor, precision) -> int:
    """The largest ulp distance among the elements that carry the tensor's scale.

    Near zero a dtype's ulps shrink without end, so an error that is tiny next to the tensor's
    largest value spans millions of them there; those elements are what ``rel_error`` is for.
    """
    e = expected.double()
    finite = torch.isfinite(e)
    if not finite.any():
        return 0
    big = finite & (e.abs() >= ULP_FLOOR * e[finite].abs().max())
    ulps = ulp_distance(actual[big], expected[big], row_dtype(precision))
    return int(ulps.max()) if ulps.size else 0


def label(precision) -> str:
    return str(precision).replace("torch.", "")


def compare(a: Trace, b: Trace) -> Comparison:
    """Compare every activation the two traces share, in A's forward order."""
    if a.header["input_ids"] != b.header["input_ids"]:
        raise TraceError(f"{a.path} and {b.path} traced different token ids: {a.header['input_ids']} vs "
                         f"{b.header['input_ids']}")
    precision = max(a.precision, b.precision, key=_rank)
    # The reference is the more precise trace: errors are relative to its magnitudes.
    actual, expected = (a, b) if _rank(a.precision) >= _rank(b.precision) else (b, a)
    out = Comparison(a, b, precision, RTOL[precision],
                     only_in_a=[n for n in a.tensors if n not in b.tensors],
                     only_in_b=[n for n in b.tensors if n not in a.tensors])
    for name in a.tensors:
        if name not in b.tensors:
            continue
        x, y = actual.tensors[name], expected.tensors[name]
        if x.shape != y.shape:
            raise TraceError(f"activation '{name}': shape {tuple(a.tensors[name].shape)} in {a.path}, "
                             f"{tuple(b.tensors[name].shape)} in {b.path}")
        layer, act = split_name(name)
        if not x.is_floating_point():
            if act == "router_experts" and layer is not None:
                out.flips[layer] = (expert_flips(x, y), x.shape[0] * x.shape[1])
            continue
        err = rel_error(x, y, floor=smallest_normal(precision))
        nan_mismatch = bool((torch.isnan(x) != torch.isnan(y)).any())
        max_ulp = _max_ulp(x, y, precision)
        out.rows.append(Row(name, layer, act, err, max_ulp, err > out.tolerance or nan_mismatch))
    if not out.rows:
        raise TraceError(f"{a.path} and {b.path} share no float activations")
    return out


def report(c: Comparison) -> str:
    """The printed table: one line per activation, the first past tolerance marked."""
    first = c.first_past
    rows = [["-" if r.layer is None else str(r.layer), r.activation, f"{r.rel_error:.2e}", str(r.max_ulp),
             "<< first past tolerance" if r is first else ("past" if r.past else "")] for r in c.rows]
    lines = [f"A: {c.a.path} ({c.a.describe()})", f"B: {c.b.path} ({c.b.describe()})",
             f"tolerance: relative L-inf error {c.tolerance:.1e} ({label(c.precision)}, kimi_ref/tolerances.py); "
             f"max ulp: in {label(row_dtype(c.precision))}, where |reference| >= 2^-4 max|reference|", "",
             table(rows, ["layer", "activation", "rel err", "max ulp", ""], right={2, 3}), ""]
    if c.flips:
        lines.append("router: tokens whose chosen-expert set differs")
        lines += [f"  layer {layer}: {n}/{total} ({n / total:.1%})" for layer, (n, total) in sorted(c.flips.items())]
    for side, names in (("A", c.only_in_a), ("B", c.only_in_b)):
        if names:
            lines.append(f"only in {side} (not compared): {', '.join(names)}")
    if first is None:
        lines.append(f"every activation is within tolerance ({c.tolerance:.1e})")
    else:
        lines.append(f"first past tolerance: {first.name} (relative error {first.rel_error:.2e} > {c.tolerance:.1e})")
    return "\n".join(lines)


def plot(c: Comparison, path: str | Path, *, force: bool = False) -> Path:
    """Relative error against depth, one line per activation kind, the tolerance as a dashed line."""
    try:
        check_file(path, force=force, what="--plot")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except OutputError as err:
        raise TraceError(str(err)) from None
    except ImportError:
        raise TraceError("--plot needs matplotlib (pip install matplotlib, or the 'notebooks' extra)") from None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    draw(c, ax)
    try:  # written under a temporary name and renamed, as every file the project writes
        return write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"),
                          force=force, what="--plot")
    except OutputError as err:
        raise TraceError(str(err)) from None
    finally:
        plt.close(fig)


def draw(c: Comparison, ax, prefix: str = "") -> None:
    """Draw ``c`` on a matplotlib axis: one line per activation kind over layers 0..L-1; the embedding
    at depth -1 and the final norm and logits at depth L as single points (an exact 0 is not drawn)."""
    depth_end = 1 + max((r.layer for r in c.rows if r.layer is not None), default=-1)
    kinds: dict[str, list[tuple[int, float]]] = {}
    for r in c.rows:
        if r.layer is not None:
            kinds.setdefault(r.activation, []).append((r.layer, r.rel_error))
    for kind, points in kinds.items():
        xs, ys = zip(*[(x, y) for x, y in points if y > 0] or [(None, None)])
        if xs[0] is not None:
            ax.plot(xs, ys, marker="o", label=f"{prefix}{kind}")
    for r in c.rows:
        if r.layer is None and r.rel_error > 0:
            x = -1 if r.activation == "embed" else depth_end
            ax.plot([x], [r.rel_error], marker={"logits": "*", "final_norm": "s"}.get(r.activation, "D"),
                    linestyle="none", markersize=9, label=f"{prefix}{r.activation}")
    ax.axhline(c.tolerance, color="k", linestyle="--", linewidth=1, label=f"tolerance {c.tolerance:.0e} ({label(c.precision)})")
    first = c.first_past
    if first is not None and first.rel_error > 0:
        x = first.layer if first.layer is not None else depth_end
        ax.annotate(f"first past: {first.name}", (x, first.rel_error), textcoords="offset points",
                    xytext=(-60, 25), arrowprops={"arrowstyle": "->"})
    ax.set_yscale("log")
    ax.set_xlabel(f"depth (layers 0..{depth_end - 1}; {depth_end}: final norm and logits)")
    ax.set_ylabel("relative L∞ error")
    ax.set_title(f"{Path(c.a.path).name} vs {Path(c.b.path).name}")
    ax.legend(fontsize=7, ncol=2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m weights_tools.diff", description=__doc__.splitlines()[0])
    p.add_argument("a", help="trace file A")
    p.add_argument("b", help="trace file B (the reference when both have the same precision)")
    p.add_argument("--plot", help="draw error against depth into this PNG file")
    p.add_argument("--force", action="store_true", help="overwrite --plot if it exists")
    args = p.parse_args(argv)
    try:
        if args.plot:
            check_file(args.plot, force=args.force, what="--plot")  # before any work
        c = compare(load_trace(args.a), load_trace(args.b))
        print(report(c))
        if args.plot:
            print(f"wrote {plot(c, args.plot, force=args.force)}")
    except (TraceError, OutputError, OSError) as err:
        print(f"diff: error: {err}", file=sys.stderr)
        return 2
    return 1 if c.first_past is not None else 0


if __name__ == "__main__":
    sys.exit(main())
