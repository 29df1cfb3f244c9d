"""JSON Schema -> TypeScript on hand-picked schemas, each checked against openai-harmony's rendering
(the hypothesis suite in test_differential.py covers generated ones)."""

from __future__ import annotations

import openai_harmony as oh
import pytest

from harmony import DeveloperContent, Message, Renderer, Role, ToolDescription
from harmony.tool_schema import json_display, schema_to_typescript

SCHEMAS = {
    "floats_as_serde_prints_them": {
        "type": "object",
        "properties": {
            name: {"type": "number", "default": value}
            for name, value in {
                "tiny": 1e-5,
                "small": 0.0001,
                "neg_zero": -0.0,
                "big": 1e16,
                "huger": 1e21,
                "sci": 1.5e-7,
                "max": 1e300,
                "u64_overflow": 2**64,
                "plain": 12345678.9,
                "int": 7,
                "negative": -3,
                "whole_float": 10.0,
                "half": 0.5,
            }.items()
        },
    },
    "strings_and_escapes": {
        "type": "object",
        "properties": {
            "quoted": {"type": "string", "default": 'say "hi"\n'},
            "enum_default": {"type": "string", "enum": ["a b", 'c"d'], "default": "a b"},
            "json_default": {"default": {"k": ["\u0001", "é", "\\"]}},
            "examples": {"type": "string", "examples": ["x", 3, "y"]},
        },
    },
    "one_of_property": {
        "type": "object",
        "properties": {
            "target": {
                "description": "Where to send it",
                "default": "home",
                "oneOf": [
                    {"type": "string", "description": "Where to send it"},
                    {"type": "object", "properties": {"lat": {"type": "number"}}, "nullable": True},
                    {"type": "integer", "description": "an id", "default": 3},
                ],
            },
            "mode": {
                "description": "the mode",
                "oneOf": [{"type": "string", "enum": ["a", "b"], "default": "a"}, {"type": "null"}],
            },
        },
        "required": ["target"],
    },
    "top_level_one_of": {
        "oneOf": [
            {"type": "object", "properties": {"a": {"type": "string"}}, "description": "A"},
            {"type": "string", "nullable": True, "default": "x"},
        ]
    },
    "nested_objects_and_arrays": {
        "type": "object",
        "description": "outer",
        "properties": {
            "inner": {
                "type": "object",
                "title": "Inner",
                "description": "an inner object",
                "properties": {
                    "deep": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"leaf": {"type": ["string", "integer", "null"]}},
                        },
                    },
                    "any_array": {"type": "array"},
                    "nullable_num": {"type": "integer", "nullable": True},
                },
                "required": ["deep"],
            },
            "unknown": {"type": "whatever"},
            "ref": {"$ref": "#/$defs/Thing"},
            "bool_schema": True,
        },
    },
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_renders_like_openai_harmony(o200k_encoding, oracle, name: str) -> None:
    schema = SCHEMAS[name]
    ours = Renderer(o200k_encoding).render_message(
        Message.from_role(
            Role.DEVELOPER,
            DeveloperContent().with_function_tools([ToolDescription("f", "does f", schema)]),
        )
    )
    developer = oh.DeveloperContent.new().with_function_tools(
        [oh.ToolDescription.new("f", "does f", schema)]
    )
    theirs = oracle.render(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    assert o200k_encoding.decode(ours) == oracle.decode_utf8(theirs)
    assert ours == theirs


def test_known_renderings() -> None:
    # Spot checks that do not need the oracle: the format guide's conventions.
    assert schema_to_typescript({"type": "integer"}) == "number"
    assert schema_to_typescript({"type": "array"}) == "Array<any>"
    assert schema_to_typescript({"type": "array", "items": {"type": "string"}}) == "string[]"
    assert schema_to_typescript({"type": "string", "enum": ["a", "b"]}) == '"a" | "b"'
    assert schema_to_typescript({"type": ["integer", "null"]}) == "number | null"
    assert schema_to_typescript({}) == "any"
    assert (
        schema_to_typescript(
            {"type": "object", "properties": {"x": {"type": "string", "default": "d"}}}
        )
        == '{\nx?: string, // default: "d"\n}'
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1e-5, "0.00001"),
        (0.0001, "0.0001"),
        (1e16, "1e16"),
        (1e15, "1000000000000000.0"),
        (1.5e-7, "1.5e-7"),
        (-0.0, "-0.0"),
        (2.5, "2.5"),
        (10.0, "10.0"),
        (1e21, "1e21"),
        (123.456e20, "1.23456e22"),
        (2**64, "1.8446744073709552e19"),
        (True, "true"),
        (None, "null"),
        ([1, "a"], '[1,"a"]'),
        ({"k": "\n"}, '{"k":"\\n"}'),
    ],
)
def test_json_display_matches_serde_json(value: object, text: str) -> None:
    assert json_display(value) == text
