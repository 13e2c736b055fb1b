"""One JSON key, one field: the strict reading (and writing) every kimi_ref config file goes through.

A config dataclass declares each field stored under one key once, with its kind and meaning::

    vocab_size: int = config_key(count, "embedding rows [163840]")
    hidden_size: int = config_key(count, "tower width [1152]", key="vt_hidden_size")

and three loops do the rest: :func:`read_declared` reads every declared key (a missing required key, a
wrong type or a bad value is a :class:`ConfigError` naming the file and the key's full path, e.g.
``'text_config.num_hidden_layers' must be an integer``), :func:`write_declared` writes them back, and
:func:`declared` lists them (the keys a file holds beyond these are kept aside). :func:`documented` appends
the list of fields and meanings to the class's docstring, so ``help()`` shows them.

A *kind* is a function ``(reader, key, default) -> value`` that checks one value: :func:`count`
(an integer > 0), ``integer``, ``number`` (JSON ints accepted, never true/false), ``flag``, ``string``,
``token_id`` (an integer or null), :func:`token_ids`, :func:`count_pair`, :func:`three_numbers`,
:func:`square`.

No torch here: the float64 oracle reads its configuration through ``kimi_ref.config`` too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

__all__ = ["ConfigError", "read_json", "Reader", "config_key", "about", "declared", "read_declared", "write_declared",
           "documented", "count", "integer", "integer_or_null", "number", "flag", "string", "token_id", "token_ids",
           "count_pair", "three_numbers", "square"]


class ConfigError(ValueError):
    """A config file is missing a key, has a wrong value, or has a layout we do not know."""


_MISSING = object()  # "no default": the key is required


class Reader:
    """Reads keys out of one JSON object and names the file and path in every error."""

    def __init__(self, data: Mapping[str, Any], source: str, where: str = ""):
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: {where or 'the file'} must be a JSON object, found {type(data).__name__}")
        self.data, self.source, self.where = data, source, where

    def keypath(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self.data

    def fail(self, key: str, expected: str, found: str) -> ConfigError:
        return ConfigError(f"{self.source}: '{self.keypath(key)}' must be {expected}, found {found}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _MISSING, *, nullable: bool = False) -> Any:
        if key not in self.data:
            if default is _MISSING:
                raise ConfigError(f"{self.source}: required key '{self.keypath(key)}' is missing")
            return default
        value = self.data[key]
        if value is None and nullable:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # JSON has one number type: accept ints where floats are expected, never bools as numbers.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise self.fail(key, _kind_name(kinds), repr(value))
        return value

    def positive(self, key: str, default: Any = _MISSING) -> int:
        value = self.get(key, int, default)
        if value <= 0:
            raise self.fail(key, "a positive integer", repr(value))
        return value

    def child(self, key: str) -> "Reader":
        return Reader(self.get(key, dict), self.source, self.keypath(key))


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "an object", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


# ----------------------------------------------------------------------------------------------------------
# Kinds: one checked value each
# ----------------------------------------------------------------------------------------------------------

# A kind reads one key: (reader, key, default) -> value, raising a ConfigError that names the key.
Kind = Callable[[Reader, str, Any], Any]


def _json_kind(kind: type, nullable: bool = False) -> Kind:
    return lambda r, key, default: r.get(key, kind, default, nullable=nullable)


integer, number, flag, string = _json_kind(int), _json_kind(float), _json_kind(bool), _json_kind(str)
integer_or_null = token_id = _json_kind(int, nullable=True)


def count(r: Reader, key: str, default: Any) -> int:
    """An integer > 0."""
    return r.positive(key, default)


def token_ids(r: Reader, key: str, default: Any) -> int | tuple[int, ...] | None:
    """A token id, null, or (eos in some files) a non-empty list of ids, kept as a tuple."""
    value = r.get(key, (int, list), default, nullable=True)
    if isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise r.fail(key, "a token id or a non-empty list of token ids", f"{value!r:.80}")
        return tuple(value)
    return value


def count_pair(r: Reader, key: str, default: Any) -> tuple[int, int]:
    value = r.get(key, list, default)
    if len(value) != 2 or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in value):
        raise r.fail(key, "two positive integers", repr(value))
    return value[0], value[1]


def three_numbers(r: Reader, key: str, default: Any) -> tuple[float, float, float]:
    value = r.get(key, list, default)
    if len(value) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise r.fail(key, "three numbers", repr(value))
    return tuple(float(x) for x in value)  # type: ignore[return-value]


def square(r: Reader, key: str, default: Any) -> int:
    """A side, written as one integer or as a square [k, k]."""
    value = r.get(key, (int, list), default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ConfigError(f"{r.source}: '{r.keypath(key)}' must be square, found {value!r}")
        value = value[0]
    return value


# ----------------------------------------------------------------------------------------------------------
# Declaring a field: its key, its kind, its meaning
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Declared:
    """How one dataclass field is stored in a JSON config: under ``key`` (default: the field's name), read by
    ``kind``, ``default`` when absent (none: required); ``also_top``: in the nested layout it may sit at the
    top level as well as, or instead of, in ``text_config`` (both copies are checked, text_config's wins; it
    is written to both); ``write``: whether ``to_dict`` writes it."""

    kind: Kind
    key: str | None = None
    default: Any = _MISSING
    also_top: bool = False
    write: bool = True


def config_key(kind: Kind, meaning: str, *, key: str | None = None, default: Any = _MISSING, also_top: bool = False,
               write: bool = True) -> Any:
    """A dataclass field read from and written to a config file by the loops below (see the module doc)."""
    return field(metadata={"meaning": meaning, "declared": Declared(kind, key, default, also_top, write)})


def about(meaning: str, **kw: Any) -> Any:
    """A field read by explicit code; ``meaning`` goes into the class's listing all the same."""
    return field(metadata={"meaning": meaning}, **kw)


def declared(cls: type) -> Iterator[tuple[str, str, Declared]]:
    """(field name, JSON key, declaration) of every declared field of the dataclass ``cls``, in order."""
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("declared")
        if spec is not None:
            yield f.name, spec.key or f.name, spec


def read_declared(cls: type, r: Reader, top: Reader | None = None,
                  defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{field: value} of every declared field of ``cls``, read from ``r`` (``also_top`` fields from ``top`` when
    ``r`` lacks them; checked in both when both hold them); ``defaults`` overrides declared defaults by field name."""
    values = {}
    for name, key, spec in declared(cls):
        default = (defaults or {}).get(name, spec.default)
        if spec.also_top and top is not None and top is not r and top.has(key):
            top_value = spec.kind(top, key, default)  # checked even where text_config's copy wins
            if not r.has(key):
                values[name] = top_value
                continue
        values[name] = spec.kind(r, key, default)
    return values


def write_declared(obj: Any, only_top: bool = False) -> dict[str, Any]:
    """{JSON key: value} of the declared fields of ``obj`` (tuples as lists); ``only_top``: the ``also_top`` ones."""
    return {key: list(v) if isinstance(v := getattr(obj, name), tuple) else v
            for name, key, spec in declared(type(obj)) if spec.write and (spec.also_top or not only_top)}


def documented(cls: type) -> type:
    """Append the listing of every field and its meaning (and JSON key, where it differs) to ``cls.__doc__``."""
    lines = []
    for f in dataclasses.fields(cls):
        if "meaning" in f.metadata:
            spec = f.metadata.get("declared")
            key = f" (``{spec.key}``)" if spec is not None and spec.key else ""
            lines.append(f"    {f.name}{key}: {f.metadata['meaning']}")
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Fields:\n" + "\n".join(lines) + "\n"
    return cls


def read_json(path: str | Path, error: type[Exception] | None = None, where: str | None = None) -> Any:
    """A JSON file's value; a missing or unreadable file, non-UTF-8 bytes or broken JSON raise ``error``
    (default :class:`ConfigError`) as one line naming ``where`` (default: the path). Every JSON file kimi_ref
    reads from a checkpoint (config, index, tokenizer and generation configs, tool lists) comes through here."""
    error, where = error or ConfigError, where or str(path)
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise error(f"{where}: cannot read the file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise error(f"{where}: not valid JSON ({e})") from None
