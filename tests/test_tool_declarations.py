"""Tool declarations (kimi_ref.tool_declarations): golden TypeScript-style texts, key order, the prompt, refusals.

The golden files in fixtures/tools_ts were written by HF's ``tool_declaration_ts.py`` (Kimi-K2.5); the
prompt test renders the genuine K2.5 template with jinja2 (see test_chat_template.py).
"""

from __future__ import annotations

import json

import pytest

from kimi_ref.chat_template import render
from kimi_ref.tool_declarations import ToolDeclarationError, deep_sort, encode_tools_ts
from test_chat_template import FIXTURES, _fixture_tools, jinja_render

FIXTURE_NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))


def test_enough_fixtures():
    assert len(FIXTURE_NAMES) >= 25


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_tools_ts_golden(name):
    expected = (FIXTURES / f"{name}.txt").read_text(encoding="utf-8")
    assert encode_tools_ts(_fixture_tools(name)) == expected


def test_tools_ts_key_order_does_not_matter():
    tools = _fixture_tools("27_three_tools_unsorted_keys")
    reordered = json.loads(json.dumps(deep_sort(tools)))
    assert encode_tools_ts(tools) == encode_tools_ts(reordered)


def test_tools_ts_in_the_prompt(reference):
    tools = _fixture_tools("20_defs_described")
    text = render([{"role": "user", "content": "go"}], tools, variant="k2.5")
    assert text.startswith("<|im_system|>tool_declare<|im_middle|># Tools\n\n## functions\nnamespace functions {\n")
    assert text == jinja_render(reference, "k2.5", [{"role": "user", "content": "go"}], tools)
    assert encode_tools_ts([]) == "" and encode_tools_ts(None) == ""
    assert encode_tools_ts([{"type": "builtin_function", "function": {"name": "$web_search"}}]) == ""


@pytest.mark.parametrize("schema, match", [
    ({"oneOf": [{"type": "string"}]}, "not \\['oneOf'\\]"),
    ({"type": "array", "items": [{"type": "string"}]}, "items must be a JSON Schema object"),
    ({"$ref": "#/$defs/Missing"}, "names no definition"),
    ({"$ref": "http://x/schema"}, "unsupported \\$ref"),
    ({"enum": [1, "a"], "type": "integer"}, "enum value 'a' is not a integer"),
    ({"enum": ["a"], "type": ["string", "integer"]}, "enum with type"),
    ({"type": ["string", "date"]}, "'date' cannot be part of a type list"),
    ({"type": "string", "description": 5}, "description must be a string"),
])
def test_tools_ts_rejects_what_the_format_cannot_say(schema, match):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": schema}}}}]
    with pytest.raises(ToolDeclarationError, match=match) as info:
        encode_tools_ts(tools)
    assert "tools[0].function(f).parameters.properties.x" in str(info.value)
    with pytest.warns(UserWarning, match="declaring the tools as JSON"):
        text = render([{"role": "user", "content": "x"}], tools, variant="k2.5")
    assert '<|im_system|>tool_declare<|im_middle|>[{"function":{"name":"f"' in text
