"""The demo tools the chat can run (calculator, current_time): bounded in time and memory, never raising.

A tool's answer goes back to the model as text, so every failure is a result too: ``"error: ..."``,
which the model can read and act on. Nothing a model (or a user) writes can make a tool run for long,
eat memory, or end the chat with an exception:

* the calculator walks the expression's AST (never ``eval``) and, before each operation, bounds the
  size of its result: ``**``, ``*`` and ``factorial`` by the number of digits they would produce,
  every integer by ``MAX_DIGITS``, the expression by ``MAX_EXPRESSION`` characters and its nesting by
  ``MAX_DEPTH``, so no operation ever starts a huge bigint computation that Ctrl-C could not stop;
* ``run_tool`` turns a call into a result: an unknown or undeclared tool, arguments that are not a
  JSON object and wrong argument names are all answered with an ``error:`` line.
"""

from __future__ import annotations

import ast
import datetime
import json
import math
import operator
from typing import Any, Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["calculator", "current_time", "BUILTIN_TOOLS", "run_tool", "MAX_DIGITS", "MAX_EXPRESSION", "MAX_DEPTH"]

MAX_EXPRESSION = 1_000   # characters
MAX_DIGITS = 1_000       # decimal digits of any integer, given or computed
MAX_DEPTH = 100          # nesting of operators and parentheses
_LOG10_2 = math.log10(2)


class _Refusal(Exception):
    """Why an expression is not evaluated; its text becomes ``error: calculator: <text>``."""


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _digits(x: int | float) -> float:
    """Decimal digits of an integer's magnitude (from its bit length: no conversion to text)."""
    return abs(int(x)).bit_length() * _LOG10_2 if isinstance(x, int) else 0.0


def _too_large(digits: float | None = None) -> _Refusal:
    about = f"about {digits:.0f} digits" if digits is not None and digits < 1e12 else "far too many digits"
    return _Refusal(f"result too large ({about}; at most {MAX_DIGITS})")


def _power(base: int | float, exponent: int | float) -> int | float:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent > 10 * MAX_DIGITS:  # even 2 ** exponent has too many digits (and exponent may not fit a float)
            raise _too_large()
        digits = exponent * math.log10(abs(base))
        if digits > MAX_DIGITS:
            raise _too_large(digits)
    if isinstance(exponent, int) and abs(exponent) > 10 ** 6 and isinstance(base, float) and abs(base) not in (0.0, 1.0):
        raise _Refusal(f"exponent {exponent} is too large")  # float pow is fast, but 1.0000001**10**900 needs care
    if isinstance(base, (int, float)) and base < 0 and isinstance(exponent, float) and not exponent.is_integer():
        raise _Refusal("a negative number to a fractional power is not a real number")
    if base == 0 and exponent < 0:
        raise _Refusal("division by zero (0 to a negative power)")
    return base ** exponent


def _factorial(n: int | float) -> int:
    if isinstance(n, float):
        if not n.is_integer():
            raise _Refusal(f"factorial needs a whole number, found {n}")
        n = int(n)
    if n < 0:
        raise _Refusal(f"factorial needs a number >= 0, found {n}")
    if n > 10 ** 6:
        raise _too_large()
    digits = math.lgamma(n + 1) / math.log(10)
    if digits > MAX_DIGITS:
        raise _too_large(digits)
    return math.factorial(n)


def _sqrt(x: int | float) -> float:
    if x < 0:
        raise _Refusal(f"sqrt of a negative number ({x}) is not a real number")
    return math.isqrt(x) if isinstance(x, int) and math.isqrt(x) ** 2 == x else math.sqrt(x)


_FUNCTIONS: dict[str, Callable[[Any], int | float]] = {"abs": abs, "sqrt": _sqrt, "factorial": _factorial}


def _binary(op: ast.operator, left: int | float, right: int | float) -> int | float:
    if isinstance(op, ast.Pow):
        return _power(left, right)
    if isinstance(op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
        digits = _digits(left) + _digits(right)
        if digits > MAX_DIGITS + 1:
            raise _too_large(digits)
    return _BINARY[type(op)](left, right)


def _value(node: ast.AST, depth: int) -> int | float:
    if depth > MAX_DEPTH:
        raise _Refusal(f"the expression is nested too deeply (more than {MAX_DEPTH} levels)")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand, depth + 1))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _binary(node.op, _value(node.left, depth + 1), _value(node.right, depth + 1))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and len(node.args) == 1 and not node.keywords):
        return _FUNCTIONS[node.func.id](_value(node.args[0], depth + 1))
    raise _Refusal(f"only numbers, + - * / // % **, parentheses and {', '.join(_FUNCTIONS)}(x) are allowed; "
                   f"found {type(node).__name__}")


def _checked(x: int | float) -> int | float:
    if isinstance(x, complex):
        raise _Refusal("the result is not a real number")
    if isinstance(x, float) and not math.isfinite(x):
        raise _Refusal("the result is not a finite number")
    if isinstance(x, int) and _digits(x) > MAX_DIGITS:
        raise _too_large(_digits(x))
    return x


def _short(text: str) -> str:
    return repr(text) if len(text) <= 60 else repr(text[:60]) + f"... ({len(text)} characters)"


def calculator(expression: Any) -> str:
    """Evaluate arithmetic exactly (integers stay integers); ``"error: calculator: ..."`` if it cannot.

    Allowed: numbers, ``+ - * / // % **``, parentheses and ``abs(x)``, ``sqrt(x)``, ``factorial(n)``.
    """
    if not isinstance(expression, str):
        return f"error: calculator: 'expression' must be a string, found {type(expression).__name__}"
    if len(expression) > MAX_EXPRESSION:
        return f"error: calculator: the expression is {len(expression)} characters, at most {MAX_EXPRESSION}"
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        return f"error: calculator: {_short(expression)} is not arithmetic ({e.msg})"
    except (ValueError, RecursionError, MemoryError):  # NUL bytes; nesting the parser itself refuses
        return f"error: calculator: {_short(expression)} is not arithmetic the calculator can read"
    try:
        return str(_checked(_value(tree.body, 0)))
    except _Refusal as e:
        return f"error: calculator: {e}"
    except ZeroDivisionError:
        return "error: calculator: division by zero"
    except OverflowError:
        return "error: calculator: result too large for a floating-point number"
    except RecursionError:
        return f"error: calculator: the expression is nested too deeply (more than {MAX_DEPTH} levels)"
    except (ArithmeticError, ValueError, TypeError, MemoryError) as e:  # anything else Python refuses: say what
        return f"error: calculator: {type(e).__name__}: {e}"


def current_time(timezone: Any = None) -> str:
    """The current time as ISO 8601, in the IANA ``timezone`` if given (e.g. "Europe/Paris"), else local."""
    if timezone:
        if not isinstance(timezone, str):
            return f"error: current_time: 'timezone' must be a string, found {type(timezone).__name__}"
        try:
            return datetime.datetime.now(ZoneInfo(timezone)).isoformat(timespec="seconds")
        except (ZoneInfoNotFoundError, ValueError, OSError):
            return f"error: current_time: unknown timezone {timezone!r} (use an IANA name like 'Europe/Paris')"
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


BUILTIN_TOOLS: dict[str, tuple[Callable[..., str], dict]] = {
    "calculator": (calculator, {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression exactly.",
        "parameters": {"type": "object", "properties": {"expression": {
            "type": "string", "description": "numbers with + - * / // % ** and parentheses, e.g. (17*23)+1"}},
            "required": ["expression"]}}}),
    "current_time": (current_time, {"type": "function", "function": {
        "name": "current_time", "description": "The current date and time.",
        "parameters": {"type": "object", "properties": {"timezone": {
            "type": "string", "description": "IANA timezone, e.g. Europe/Paris; local time if omitted"}}}}}),
}


def run_tool(call: dict, ask: Callable[[str], str], declared: list[str] | None = None) -> str:
    """The result text of one tool call; never raises.

    ``declared``: the names of the tools this conversation declares (None: every built-in). A built-in
    runs here; a declared tool that is not built in is answered by the user through ``ask``; any other
    name is answered with an error the model can read -- never with a line of the user's input.
    """
    fn_part = call.get("function") if isinstance(call, dict) else None
    name = fn_part.get("name") if isinstance(fn_part, dict) else None
    raw = fn_part.get("arguments", "") if isinstance(fn_part, dict) else ""
    if not isinstance(name, str) or not isinstance(raw, str):
        return f"error: malformed tool call {call!r}"
    known = sorted(BUILTIN_TOOLS) if declared is None else list(declared)
    if name not in known:
        return (f"error: there is no tool named {name!r}; the tools here are {', '.join(known)}" if known
                else f"error: there is no tool named {name!r}; no tools are declared in this conversation")
    if name not in BUILTIN_TOOLS:
        return ask(f"tool {name}({raw}) — type its result: ")
    try:
        arguments = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as e:
        return f"error: the arguments are not valid JSON ({e.msg}): {raw[:200]!r}"
    except RecursionError:
        return "error: the arguments are nested too deeply to read"
    if not isinstance(arguments, dict):
        return f"error: the arguments must be a JSON object, found {raw[:200]!r}"
    fn = BUILTIN_TOOLS[name][0]
    try:
        return fn(**arguments)
    except TypeError as e:  # unexpected or missing argument names
        return f"error: {name} was called with {sorted(arguments)}: {e}"
