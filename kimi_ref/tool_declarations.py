"""Tool declarations: OpenAI-style JSON-schema tools -> the TypeScript-style text Kimi K2.5+ reads.

Place in the pipeline: :func:`kimi_ref.chat_template.render` puts this text in the ``tool_declare`` system
turn (K2.5, K2.6, K2.7-Code; the older K2 templates declare tools as JSON instead). Facts: sources §9.

One tool, declared::

    # Tools

    ## functions
    namespace functions {
    // Get the weather.                         <- the function's description, one `//` per line
    type get_weather = (_: {
      // The city.                               <- a property's description ...
      // maxLength: 80                           <- ... and its constraints, sorted by key
      city: string,                              <- required properties first, each group sorted by name
      // Default: "celsius"
      unit?: "celsius" | "fahrenheit"            <- optional ones get `?`; enums are unions of literals
    }) => any;
    }

The rules are those of HF's ``tool_declaration_ts.py`` (Kimi-K2.5 repository), which Kimi's tokenizer runs
on the deep-sorted tools. What it rejects (``oneOf``, tuple ``items``, an unknown ``$ref``, ...) raises
:class:`ToolDeclarationError` here; ``render`` then declares the tools as JSON, as the tokenizer does.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

__all__ = ["ToolDeclarationError", "encode_tools_ts", "deep_sort"]


class ToolDeclarationError(ValueError):
    """A tool schema the TypeScript-style format cannot express (named by its path in ``tools``)."""


_INDENT = "  "
_CONSTRAINT_KEYS = {  # which JSON Schema keywords are shown as a `// key: value` comment, by type
    "string": ("maxLength", "minLength", "pattern"),
    "number": ("maximum", "minimum"),
    "integer": ("maximum", "minimum"),
    "array": ("maxItems", "minItems"),
}
_UNION_MEMBER_TS = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
                    "null": "null", "object": "{}", "array": "Array<any>"}


def deep_sort(value: Any) -> Any:
    """Every dict's keys sorted, recursively (HF's ``deep_sort_dict``), so that the same tools in another
    key order give the same prompt bytes (and the same prefix-cache hit)."""
    if isinstance(value, Mapping):
        return {key: deep_sort(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [deep_sort(item) for item in value]
    return value


def encode_tools_ts(tools: Sequence[Mapping[str, Any]] | None) -> str:
    """The TypeScript-style declaration of OpenAI-format ``tools``, as Kimi K2.5+ sees them.

    Tools whose ``type`` is not ``"function"`` (Moonshot's built-ins) are not declared; with no function
    tools at all the result is ``""``. Raises :class:`ToolDeclarationError` for a schema the format cannot
    express.
    """
    if not tools:
        return ""
    if not isinstance(tools, (list, tuple)):
        raise ToolDeclarationError(f"tools must be a list of tool definitions, found {type(tools).__name__}")
    declarations = []
    for i, tool in enumerate(deep_sort(list(tools))):
        if not isinstance(tool, dict):
            raise ToolDeclarationError(f"tools[{i}] must be a dict like {{'type': 'function', 'function': {{...}}}}, "
                                    f"found {type(tool).__name__}")
        function = tool.get("function")
        if tool.get("type") != "function" or not function:
            continue
        if not isinstance(function, dict):
            raise ToolDeclarationError(f"tools[{i}].function must be a dict, found {type(function).__name__}")
        declarations.append(_declare_function(function, f"tools[{i}].function"))
    if not declarations:
        return ""
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(declarations) + "\n}\n"


class _Definitions:
    """The ``$defs`` seen so far (in the order first seen) and whether the parameters refer to themselves."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}
        self.self_reference = False

    def resolve(self, ref: Any, where: str) -> None:
        if ref == "#":
            self.self_reference = True
        elif isinstance(ref, str) and ref.startswith("#/$defs/"):
            if ref.split("/")[-1] not in self.schemas:
                raise ToolDeclarationError(f"{where}: $ref {ref!r} names no definition in $defs seen so far")
        else:
            raise ToolDeclarationError(f"{where}: unsupported $ref {ref!r}; only '#' and '#/$defs/NAME' are understood")


def _declare_function(function: dict, where: str) -> str:
    name = function.get("name", "function")
    if not isinstance(name, str):
        raise ToolDeclarationError(f"{where}.name must be a string, found {name!r}")
    where = f"{where}({name})"
    parameters = function.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ToolDeclarationError(f"{where}.parameters must be a JSON Schema object, found {parameters!r}")

    # Pass 1: walk the schema in the encoder's order, collecting $defs and checking every $ref
    # (a $ref may only name a definition registered before it).
    definitions = _Definitions()
    _walk_object(parameters, definitions, f"{where}.parameters")

    blocks = []
    # Decided by the parameters alone, before the definitions are walked: a `$ref: "#"` met only inside a
    # definition does not turn the signature into `parameters` (the encoder checks at this point too).
    self_reference = definitions.self_reference
    if self_reference:  # `$ref: "#"` -> the parameters become `interface parameters`,
        # with fields in key order (no required-first sorting) and no additionalProperties line.
        properties, required = _properties(parameters, f"{where}.parameters")
        fields = [_field_ts(key, schema, key not in required, _INDENT, f"{where}.parameters.properties.{key}")
                  for key, schema in properties.items()]
        body = "\n" + ",\n".join(fields) + "\n" if fields else ""
        blocks.append("interface parameters {" + body + "}")
    for def_name, schema in list(definitions.schemas.items()):
        def_where = f"{where}.$defs.{def_name}"
        _walk(schema, definitions, def_where)
        description = schema.get("description", "") if isinstance(schema, dict) else ""
        prefix = _comment_lines(description, "", def_where) + "\n" if description else ""
        blocks.append(f"{prefix}interface {def_name} {_type_ts(schema, '', def_where)}")

    description = function.get("description")
    if description:
        blocks.append(_comment_lines(description, "", where))
    signature = "parameters" if self_reference else _object_ts(parameters, "", f"{where}.parameters")
    blocks.append(f"type {name} = (_: {signature}) => any;")
    return "\n".join(block for block in blocks if block)


def _kind(schema: Any, where: str) -> str:
    """Which TypeScript form a schema takes; the order of the tests is the encoder's."""
    if isinstance(schema, bool):
        return "any" if schema else "null"  # `true` accepts anything; `false` is shown as null
    if not isinstance(schema, dict):
        raise ToolDeclarationError(f"{where} must be a JSON Schema object, found {type(schema).__name__}")
    if "$ref" in schema:
        return "ref"
    if "anyOf" in schema:
        return "anyOf"
    if "enum" in schema:
        return "enum"
    if "type" in schema:
        kind = schema["type"]
        if isinstance(kind, list):
            return "union"
        if not isinstance(kind, str):
            raise ToolDeclarationError(f"{where}.type must be a string or a list, found {kind!r}")
        return kind if kind in ("object", "array") else "scalar"
    if not schema:
        return "any"
    raise ToolDeclarationError(f"{where}: the declaration format understands type, enum, anyOf and $ref, "
                            f"not {sorted(schema)} (oneOf/allOf are not part of it)")


def _walk(schema: Any, definitions: _Definitions, where: str) -> None:
    kind = _kind(schema, where)
    if kind == "ref":
        definitions.resolve(schema["$ref"], where)
    elif kind == "anyOf":
        options = schema["anyOf"]
        if not isinstance(options, list):
            raise ToolDeclarationError(f"{where}.anyOf must be a list of schemas, found {options!r}")
        for k, option in enumerate(options):
            _walk(option, definitions, f"{where}.anyOf[{k}]")
    elif kind == "enum":
        _check_enum(schema, where)
    elif kind == "union":
        for member in schema["type"]:
            if member not in _UNION_MEMBER_TS:
                raise ToolDeclarationError(f"{where}.type: {member!r} cannot be part of a type list; expected "
                                        f"{', '.join(_UNION_MEMBER_TS)}")
    elif kind == "object":
        _walk_object(schema, definitions, where)
    elif kind == "array" and schema.get("items"):
        _walk(schema["items"], definitions, f"{where}.items")


def _walk_object(schema: dict, definitions: _Definitions, where: str) -> None:
    if not schema:
        return
    defs = schema.get("$defs")
    if defs:
        if not isinstance(defs, dict):
            raise ToolDeclarationError(f"{where}.$defs must be an object of named schemas, found {defs!r}")
        definitions.schemas.update(defs)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        _walk(extra, definitions, f"{where}.additionalProperties")
    elif extra is not None and not isinstance(extra, bool):
        raise ToolDeclarationError(f"{where}.additionalProperties must be a boolean or a schema, found {extra!r}")
    properties, _ = _properties(schema, where)
    for key, prop in properties.items():
        _walk(prop, definitions, f"{where}.properties.{key}")


def _properties(schema: dict, where: str) -> tuple[dict, set]:
    properties = schema.get("properties", {}) if schema else {}
    required = schema.get("required", []) if schema else []
    if not isinstance(properties, dict):
        raise ToolDeclarationError(f"{where}.properties must be an object, found {properties!r}")
    if not isinstance(required, list) or not all(isinstance(key, str) for key in required):
        raise ToolDeclarationError(f"{where}.required must be a list of property names, found {required!r}")
    return properties, set(required)


def _check_enum(schema: dict, where: str) -> None:
    """Enum values must match a declared type (a type list may be one type plus "null")."""
    values = schema["enum"]
    if not isinstance(values, list):
        raise ToolDeclarationError(f"{where}.enum must be a list, found {values!r}")
    declared = schema.get("type")
    if declared is None:
        return
    if isinstance(declared, list):
        if len(declared) == 1:
            declared = declared[0]
        elif len(declared) == 2 and "null" in declared:
            declared = declared[0] if declared[0] != "null" else declared[1]
        else:
            raise ToolDeclarationError(f"{where}: enum with type {declared!r} is not supported "
                                    "(one type, or one type and 'null')")
    # bool is an int in Python, and the encoder accepts it for number/integer: kept.
    expected = {"string": str, "number": (int, float), "integer": int, "boolean": bool}.get(declared)
    for value in values:
        if expected is not None and value is not None and not isinstance(value, expected):
            raise ToolDeclarationError(f"{where}: enum value {value!r} is not a {declared}")


def _type_ts(schema: Any, indent: str, where: str) -> str:
    """The TypeScript type of a schema written at ``indent`` (objects span lines, closing at ``indent``)."""
    kind = _kind(schema, where)
    if kind in ("any", "null"):
        return kind
    if kind == "ref":
        return "parameters" if schema["$ref"] == "#" else schema["$ref"].split("/")[-1]
    if kind == "anyOf":
        return " | ".join(_type_ts(option, indent, f"{where}.anyOf[{k}]")
                          for k, option in enumerate(schema["anyOf"]))
    if kind == "enum":
        # Python's str(): strings are quoted as they are (no escaping), True/None print as Python spells them.
        return " | ".join(f'"{value}"' if isinstance(value, str) else str(value) for value in schema["enum"])
    if kind == "union":
        return " | ".join(_UNION_MEMBER_TS[member] for member in schema["type"])
    if kind == "object":
        return _object_ts(schema, indent, where)
    if kind == "array":
        item = schema.get("items") or {}
        inner = indent + _INDENT
        item_comments = _comments(item, inner, f"{where}.items")
        if item_comments:  # a described item gets its own lines
            return f"Array<\n{item_comments}{inner}{_type_ts(item, inner, f'{where}.items')}\n{indent}>"
        return f"Array<{_type_ts(item, indent, f'{where}.items')}>"
    return "number" if schema["type"] == "integer" else schema["type"]


def _object_ts(schema: dict, indent: str, where: str) -> str:
    properties, required = _properties(schema, where)
    inner = indent + _INDENT
    order = sorted(key for key in properties if key in required) + sorted(key for key in properties
                                                                          if key not in required)
    fields = [_field_ts(key, properties[key], key not in required, inner, f"{where}.properties.{key}")
              for key in order]
    extra = schema.get("additionalProperties") if schema else None
    if extra is not None:
        extra_ts = ("any" if extra is True else "never" if extra is False
                    else _type_ts(extra, inner, f"{where}.additionalProperties"))
        fields.append(f"{inner}[k: string]: {extra_ts}")
    if not fields:
        return "{}"
    return "{\n" + ",\n".join(fields) + f"\n{indent}}}"


def _field_ts(name: str, schema: Any, optional: bool, indent: str, where: str) -> str:
    """``// comments`` + ``name?: type`` for one property."""
    text = _comments(schema, indent, where)
    default = schema.get("default") if isinstance(schema, dict) else None
    if default is not None:
        # Numbers and booleans as Python prints them (True, 1.5); everything else as JSON.
        shown = repr(default) if isinstance(default, (int, float)) else json.dumps(default, ensure_ascii=False)
        text += f"{indent}// Default: {shown}\n"
    return f"{text}{indent}{name}{'?' if optional else ''}: {_type_ts(schema, indent, where)}"


def _comments(schema: Any, indent: str, where: str) -> str:
    """The description lines and the constraint line shown above a type (each ending in a newline)."""
    if not isinstance(schema, dict):
        return ""
    lines = []
    description = schema.get("description", "")
    if description:
        lines.append(_comment_lines(description, indent, where))
    kind = _kind(schema, where)
    type_name = schema["type"] if kind in ("scalar", "array") else None
    shown = {key: schema[key] for key in _CONSTRAINT_KEYS.get(type_name, ()) if key in schema}
    if shown:
        lines.append(indent + "// " + ", ".join(f"{key}: {shown[key]}" for key in sorted(shown)))
    return "".join(line + "\n" for line in lines)


def _comment_lines(description: Any, indent: str, where: str) -> str:
    """A description as ``// line`` comments; an empty line stays empty (no ``//``)."""
    if not isinstance(description, str):
        raise ToolDeclarationError(f"{where}.description must be a string, found {description!r}")
    return "\n".join(f"{indent}// {line}" if line else "" for line in description.split("\n"))
