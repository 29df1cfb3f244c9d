"""JSON Schema -> the TypeScript-like type syntax that harmony uses to declare function tools.

The output matches openai-harmony's rendering character for character, including its quirks
(oneOf variants indented by three spaces, nested objects by four, `integer` shown as `number`,
constructs it does not know shown as `any`): the model was trained on exactly this text.
Schemas are JSON values, so every lookup tolerates a non-object where an object is expected, as
openai-harmony does. Only a schema that is not a JSON object at all, or holds values JSON cannot
carry, is rejected, with an error naming the tool and the offending part.
"""

from __future__ import annotations

import json
import math
from typing import Any

_MISSING: Any = object()


class ToolSchemaError(ValueError):
    """A tool's parameter schema cannot be rendered."""

    def __init__(self, tool_name: str, location: str, problem: str) -> None:
        super().__init__(f"tool {tool_name!r}: parameters{location}: {problem}")
        self.tool_name = tool_name
        self.location = location
        self.problem = problem


def validate_parameters(tool_name: str, parameters: Any) -> None:
    """Raise ToolSchemaError unless `parameters` is None or a JSON object made of JSON values."""
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise ToolSchemaError(
            tool_name, "", f"expected a JSON Schema object, found {_json_type(parameters)}"
        )
    _check_json_value(tool_name, parameters, "")


def _check_json_value(tool_name: str, value: Any, location: str) -> None:
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolSchemaError(tool_name, location, f"{value} is not a JSON number")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_value(tool_name, item, f"{location}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ToolSchemaError(tool_name, location, f"object key {key!r} is not a string")
            _check_json_value(tool_name, item, f"{location}.{key}")
        return
    raise ToolSchemaError(tool_name, location, f"{type(value).__name__} is not a JSON value")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _get(schema: Any, key: str) -> Any:
    """A key of a JSON object, or _MISSING (also when `schema` is not an object)."""
    if isinstance(schema, dict):
        return schema.get(key, _MISSING)
    return _MISSING


def _str(schema: Any, key: str) -> str | None:
    value = _get(schema, key)
    return value if isinstance(value, str) else None


def _is_enum(schema: Any) -> bool:
    values = _get(schema, "enum")
    return isinstance(values, list) and len(values) > 0


def _is_nullable(schema: Any) -> bool:
    return _get(schema, "nullable") is True


def json_display(value: Any) -> str:
    """A JSON value as compact JSON, formatted the way serde_json prints it."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        # serde_json keeps 64-bit integers exact; larger ones arrive as f64.
        return str(value) if -(2**63) <= value < 2**64 else _format_f64(float(value))
    if isinstance(value, float):
        return _format_f64(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(json_display(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ",".join(f"{json_display(k)}:{json_display(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def _format_f64(x: float) -> str:
    """Shortest round-trip digits laid out as the ryu crate (used by serde_json) lays them out."""
    if not math.isfinite(x):
        return "null"
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sign = "-" if x < 0 else ""
    mantissa, _, exp = repr(abs(x)).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    digits = int_part + frac_part
    point = len(int_part) + int(exp or 0)  # decimal point position within `digits`
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    n = len(digits)
    if n <= point <= 16:
        body = digits + "0" * (point - n) + ".0"
    elif 0 < point <= 16:
        body = digits[:point] + "." + digits[point:]
    elif -5 < point <= 0:
        body = "0." + "0" * (-point) + digits
    elif n == 1:
        body = f"{digits}e{point - 1}"
    else:
        body = f"{digits[0]}.{digits[1:]}e{point - 1}"
    return sign + body


def _default_comment(schema: Any, default: Any) -> str:
    """`default: ...` as shown beside a property: strings quoted raw, enum strings bare."""
    if isinstance(default, str):
        return f'default: "{default}"' if not _is_enum(schema) else f"default: {default}"
    return f"default: {json_display(default)}"


def _with_null(type_str: str, schema: Any) -> str:
    if _is_nullable(schema) and "null" not in type_str:
        return f"{type_str} | null"
    return type_str


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """Render one JSON Schema as a TypeScript type, exactly as openai-harmony does."""
    one_of = _get(schema, "oneOf")
    if isinstance(one_of, list):
        return _render_top_level_one_of(one_of, indent)
    types = _get(schema, "type")
    if isinstance(types, list):
        names = ["number" if t == "integer" else t for t in types if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if not isinstance(types, str):
        return "any"
    if types == "object":
        return _render_object(schema, indent)
    if types == "string":
        values = _get(schema, "enum")
        if isinstance(values, list):
            quoted = [f'"{v}"' for v in values if isinstance(v, str)]
            if quoted:
                return " | ".join(quoted)
        return "string"
    if types in ("number", "integer"):
        return "number"
    if types == "boolean":
        return "boolean"
    if types == "array":
        items = _get(schema, "items")
        return "Array<any>" if items is _MISSING else f"{schema_to_typescript(items, indent)}[]"
    return "any"


def _render_top_level_one_of(variants: list[Any], indent: str) -> str:
    out: list[str] = []
    for variant in variants:
        out.append(f"\n{indent} | ")
        out.append(_with_null(schema_to_typescript(variant, indent + "   "), variant))
        comments = []
        description = _str(variant, "description")
        if description is not None:
            comments.append(description)
        default = _get(variant, "default")
        if default is not _MISSING:
            if isinstance(default, str) and not _is_enum(variant):
                comments.append(f'default: "{default}"')
            else:
                comments.append(f"default: {json_display(default)}")
        if comments:
            out.append(" // " + " ".join(comments))
    return "".join(out)


def _render_object(schema: dict[str, Any], indent: str) -> str:
    out: list[str] = []
    description = _str(schema, "description")
    if description is not None:
        out.append(f"{indent}// {description}\n")
    out.append("{\n")
    properties = _get(schema, "properties")
    if isinstance(properties, dict):
        required_list = _get(schema, "required")
        required = (
            {r for r in required_list if isinstance(r, str)}
            if isinstance(required_list, list)
            else set()
        )
        for key, prop in properties.items():
            optional = "" if key in required else "?"
            _render_property_comments(out, prop, indent)
            one_of = _get(prop, "oneOf")
            if isinstance(one_of, list):
                _render_one_of_property(out, key, optional, prop, one_of, indent)
                continue
            out.append(f"{indent}{key}{optional}: ")
            out.append(_with_null(schema_to_typescript(prop, indent + "    "), prop))
            out.append(",")
            default = _get(prop, "default")
            if one_of is _MISSING and default is not _MISSING:
                out.append(" // " + _default_comment(prop, default))
            out.append("\n")
    out.append(f"{indent}}}")
    return "".join(out)


def _render_property_comments(out: list[str], prop: Any, indent: str) -> None:
    """Title, description (unless the property is a oneOf) and string examples above a property."""
    title = _str(prop, "title")
    if title is not None:
        out.append(f"{indent}// {title}\n{indent}//\n")
    if _get(prop, "oneOf") is _MISSING:
        description = _str(prop, "description")
        if description is not None:
            out.append(f"{indent}// {description}\n")
    examples = _get(prop, "examples")
    if isinstance(examples, list) and examples:
        out.append(f"{indent}// Examples:\n")
        for example in examples:
            if isinstance(example, str):
                out.append(f'{indent}// - "{example}"\n')


def _render_one_of_property(
    out: list[str], key: str, optional: str, prop: Any, variants: list[Any], indent: str
) -> None:
    property_description = _str(prop, "description")
    # The property's description is dropped when the first variant repeats it.
    first_repeats = (
        property_description is not None
        and bool(variants)
        and _str(variants[0], "description") == property_description
    )
    described_above = False
    if property_description is not None and not first_repeats:
        out.append(f"{indent}// {property_description}\n")
        described_above = True
    default = _get(prop, "default")
    if default is not _MISSING:
        out.append(f"{indent}// {_default_comment(prop, default)}\n")
    out.append(f"{indent}{key}{optional}:\n")
    for i, variant in enumerate(variants):
        out.append(f"{indent} | ")
        out.append(_with_null(schema_to_typescript(variant, indent + "   "), variant))
        comments = []
        variant_description = _str(variant, "description")
        if (
            not (i == 0 and described_above)
            and variant_description is not None
            and variant_description != property_description
        ):
            comments.append(variant_description)
        variant_default = _get(variant, "default")
        if variant_default is not _MISSING:
            comments.append(_default_comment(variant, variant_default))
        if comments:
            out.append(" // " + " ".join(comments))
        out.append("\n")
    out.append(f"{indent},\n")
