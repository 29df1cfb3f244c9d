"""Grammars for constrained decoding of the assistant's reply, each constraint where harmony puts it.

This module owns the grammar text (llguidance's Lark dialect) for what the model writes after the
prompt's `<|start|>assistant`, and the check that a JSON Schema compiles. It knows the harmony
format and nothing of the engine: the engine runs the text as an opaque grammar over token ids.

Every grammar has one shape:

    start:     analysis* reply
    analysis:  <|channel|> "analysis" <|message|> free <|end|> <|start|> "assistant"
    free:      any ordinary token, any number of times

The analysis channel always runs free: its mask is every ordinary token plus `<|end|>`, exactly
what unconstrained decoding allows there (only the control tokens that would break the message are
out). Then `reply` is one of:

- a call is required (tool_choice "required", or one named function):
      <|channel|> "commentary to=functions.NAME " <|constrain|> "json" <|message|> ARGS <|call|>
  with NAME one of the allowed functions;
- calls are allowed (tool_choice "auto"): free commentary preambles (among the analysis), then
  that call or the final answer;
- no calls: the final answer, `<|channel|> "final" <|message|> ANSWER <|return|>`.

ARGS is the function's JSON Schema (or any JSON object when it has none to enforce); ANSWER is a
JSON Schema's JSON or free text. JSON is compact (no whitespace between tokens): gpt-oss writes
its arguments that way, and free whitespace lets a model spin in blanks without end.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from llguidance import LLMatcher

from harmony.tokens import HarmonyEncoding

# What any JSON object means where the content type is `json` but no schema is enforced.
ANY_JSON_OBJECT: Mapping[str, Any] = MappingProxyType({"type": "object"})

# llguidance's JSON options, set in each schema's "x-guidance" (they override the caller's).
_JSON_OPTIONS = {"whitespace_flexible": False}

# Keywords whose values are subschemas: a map of them, a list of them, or one.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONES = (
    "items",
    "additionalProperties",
    "not",
    "contains",
    "if",
    "then",
    "else",
    "propertyNames",
)
_MAX_LOCATE_CHECKS = 64  # sub-schemas compiled to find where an error lies (the error path only)


class SchemaError(ValueError):
    """A JSON Schema the grammar library cannot compile; `path` leads to the offending sub-schema
    (keys and indexes from the schema's root; empty when it is the whole schema)."""

    def __init__(self, message: str, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def where(self, root: str) -> str:
        """`root` followed by the path: `tools[0].function.parameters.properties.when`."""
        out = root
        for part in self.path:
            out += f"[{part}]" if isinstance(part, int) else f".{part}"
        return out


@dataclass(frozen=True, slots=True)
class FunctionConstraint:
    """A function the model may call, and the JSON Schema its arguments must match (None: any
    JSON object)."""

    name: str
    parameters: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ReplyConstraint:
    """What the reply after the free analysis must be.

    `functions`: those the model may call (none: no call); `require_call`: a call and nothing else
    (there must then be functions); `final_schema`: the JSON Schema of the final answer (None: free
    text).
    """

    functions: tuple[FunctionConstraint, ...] = ()
    require_call: bool = False
    final_schema: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.require_call and not self.functions:
            raise ValueError("ReplyConstraint: require_call needs at least one function")


class ReplyGrammars:
    """Builds reply grammars for one vocabulary (the free-text rule is computed once)."""

    def __init__(self, encoding: HarmonyEncoding) -> None:
        self.encoding = encoding
        ordinary = sorted(encoding.mergeable_ranks.values())
        self._free = f"<[{_ranges(ordinary)}]>*"
        # Control tokens by name, as the grammar library resolves them in the vocabulary.
        names = encoding.special_token_names
        ids = encoding.ids
        self._tok = {
            "start": names[ids.start],
            "end": names[ids.end],
            "message": names[ids.message],
            "channel": names[ids.channel],
            "constrain": names[ids.constrain],
            "return": names[ids.return_],
            "call": names[ids.call],
        }

    def build(self, constraint: ReplyConstraint) -> str:
        """The grammar of a reply under `constraint` (Lark text for llguidance)."""
        t = self._tok
        between = f'{t["end"]} {t["start"]} "assistant"'
        rules = [
            f"start: {self._start_rule(constraint)}",
            f'analysis: {t["channel"]} "analysis" {t["message"]} free {between}',
            f"free: {self._free}",
        ]
        if constraint.functions and not constraint.require_call:
            rules.append(f'preamble: {t["channel"]} "commentary" {t["message"]} free {between}')
        if constraint.functions:
            rules.append(
                "call: " + " | ".join(f"call_{i}" for i in range(len(constraint.functions)))
            )
            for i, function in enumerate(constraint.functions):
                header = _literal(f"commentary to=functions.{function.name} ")
                rules.append(
                    f"call_{i}: {t['channel']} {header} {t['constrain']} "
                    f'"json" {t["message"]} {_json(function.parameters or ANY_JSON_OBJECT)} {t["call"]}'
                )
        if not constraint.require_call:
            answer = "free" if constraint.final_schema is None else _json(constraint.final_schema)
            rules.append(f'final: {t["channel"]} "final" {t["message"]} {answer} {t["return"]}')
        return "\n".join(rules) + "\n"

    @staticmethod
    def _start_rule(constraint: ReplyConstraint) -> str:
        if constraint.require_call:
            return "analysis* call"
        if constraint.functions:
            return "(analysis | preamble)* (final | call)"
        return "analysis* final"


def check_json_schema(schema: Any) -> None:
    """Raise SchemaError unless the grammar library compiles `schema` (as this module uses it)."""
    message = _schema_error(schema)
    if message is not None:
        raise SchemaError(message, _locate(schema, message, (), [_MAX_LOCATE_CHECKS]))


def _schema_error(schema: Any) -> str | None:
    if not isinstance(schema, Mapping | bool):
        return f"a JSON Schema must be an object or a boolean, found {type(schema).__name__}"
    try:
        text = json.dumps(_with_options(schema), sort_keys=True)
    except (TypeError, ValueError) as exc:
        return f"the schema is not JSON: {exc}"
    return _compile_error(text)


@lru_cache(maxsize=512)
def _compile_error(schema_json: str) -> str | None:
    # Clients send the same tools request after request (agent loops): check each schema once.
    grammar = LLMatcher.grammar_from_json_schema(schema_json)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    return (messages[0] if messages else "the schema does not compile") if is_error else None


def _locate(
    schema: Any, message: str, path: tuple[str | int, ...], budget: list[int]
) -> tuple[str | int, ...]:
    """The deepest sub-schema that fails alone with the same message (a sub-schema that needs the
    root, through `$ref`, fails differently: the search stops above it)."""
    for child_path, child in _children(schema, path):
        if budget[0] <= 0:
            break
        budget[0] -= 1
        if _schema_error(child) == message:
            return _locate(child, message, child_path, budget)
    return path


def _children(schema: Any, path: tuple[str | int, ...]) -> list[tuple[tuple, Any]]:
    if not isinstance(schema, Mapping):
        return []
    out: list[tuple[tuple, Any]] = []
    for key in _SCHEMA_MAPS:
        value = schema.get(key)
        if isinstance(value, Mapping):
            out += [((*path, key, name), sub) for name, sub in value.items()]
    for key in _SCHEMA_LISTS:
        value = schema.get(key)
        if isinstance(value, list):
            out += [((*path, key, i), sub) for i, sub in enumerate(value)]
    for key in _SCHEMA_ONES:
        value = schema.get(key)
        if isinstance(value, Mapping):
            out.append(((*path, key), value))
    return out


def _with_options(schema: Mapping[str, Any] | bool) -> Mapping[str, Any] | bool:
    if isinstance(schema, bool):
        return schema
    return {**schema, "x-guidance": _JSON_OPTIONS}


def _json(schema: Mapping[str, Any]) -> str:
    return "%json " + json.dumps(_with_options(schema), ensure_ascii=False)


def _literal(text: str) -> str:
    """A Lark string literal of `text` (JSON's escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


def _ranges(ids: Sequence[int]) -> str:
    """Sorted ids as llguidance token ranges: `0-292,300,305-310`."""
    parts: list[str] = []
    start = prev = ids[0]
    for token_id in ids[1:]:
        if token_id != prev + 1:
            parts.append(f"{start}-{prev}" if prev > start else str(start))
            start = token_id
        prev = token_id
    parts.append(f"{start}-{prev}" if prev > start else str(start))
    return ",".join(parts)
