"""OpenAI chat messages and tools -> harmony messages: the prompt side of the API mapping.

One pure function per API; the table it implements (issue "server/" and CONTRACT.md):

| chat completions                          | harmony                                              |
|-------------------------------------------|------------------------------------------------------|
| (always, first)                           | system: default identity and knowledge cutoff,       |
|                                           | `Current date:` today (UTC), `Reasoning:` effort     |
| `system` / `developer` (anywhere)         | one developer message right after the system one:    |
|                                           | their texts, in order, joined by a blank line, plus  |
|                                           | function `tools` (unless tool_choice is "none") and  |
|                                           | a json_schema `response_format`; none if all empty   |
| `user`                                    | user message; text parts concatenated                |
| `assistant` `reasoning`/`reasoning_content` | analysis message first (`reasoning` wins)          |
| `assistant` `content` (no tool calls)     | final-channel message (empty content: no message)    |
| `assistant` `content` with `tool_calls`   | commentary preamble (no recipient), then the calls   |
| `assistant` `tool_calls`                  | commentary, to=functions.NAME, <|constrain|>json     |
| `tool`                                    | author functions.NAME (from the call with that id,   |
|                                           | else `name`), to=assistant, commentary               |

A trailing assistant message is history, never a prefill. Earlier turns' analysis is dropped by the
renderer, exactly as openai-harmony drops it.

`reply_constraint` maps the fields that constrain the reply to harmony's `ReplyConstraint` (the
grammar for constrained decoding), or None when nothing constrains it:

| chat completions                               | constraint on the reply (after free analysis) |
|------------------------------------------------|-----------------------------------------------|
| `tool_choice: "required"`                      | a call to one of the tools                    |
| `tool_choice: {"type": "function", ...}`       | a call to that function                       |
| `tool_choice: "auto"` (tools given)            | a call or a final answer, when another row    |
|                                                | applies (a strict tool, a response format)    |
| `tools[i].function.strict: true` (or the       | that tool's arguments match its `parameters`  |
| server's strict flag)                          | (else: any JSON object)                       |
| `response_format` json_schema / json_object    | the final answer is that schema's JSON / any  |
|                                                | JSON object                                   |
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harmony import (
    Author,
    DeveloperContent,
    Message,
    ReasoningEffort,
    ResponseFormat,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
    ToolNamespace,
    ToolSchemaError,
)
from harmony.grammar import (
    ANY_JSON_OBJECT,
    FunctionConstraint,
    ReplyConstraint,
    SchemaError,
    check_json_schema,
)
from harmony.messages import DEFAULT_KNOWLEDGE_CUTOFF, DEFAULT_MODEL_IDENTITY
from harmony.tool_schema import validate_parameters

JSON_CONTENT_TYPE = "<|constrain|>json"
# The arguments of a strict function that declares no parameters: it takes none.
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


class BridgeError(ValueError):
    """A request that cannot be expressed in harmony; `param` names the offending part."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class PromptDefaults:
    model_identity: str = DEFAULT_MODEL_IDENTITY
    knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF
    reasoning_effort: ReasoningEffort = ReasoningEffort.MEDIUM


def text_of(content: Any, param: str) -> str:
    """A message's text: a string, None, or text parts (concatenated); anything else is refused."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BridgeError(f"{param} must be a string or a list of content parts", param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise BridgeError(
                f"{param}[{j}]: {kind!r} content is not supported: gpt-oss takes text only",
                f"{param}[{j}]",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise BridgeError(f"{param}[{j}].text must be a string", f"{param}[{j}].text")
        texts.append(text)
    return "".join(texts)


def function_tools(tools: Sequence[dict[str, Any]] | None) -> list[ToolDescription]:
    result = []
    for i, tool in enumerate(tools or ()):
        if tool.get("type") != "function":
            raise BridgeError(
                f"tools[{i}]: only function tools are supported, found type {tool.get('type')!r}",
                f"tools[{i}].type",
            )
        function = tool.get("function") or {}
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise BridgeError(
                f"tools[{i}].function.name must be a non-empty string", f"tools[{i}].function.name"
            )
        parameters = function.get("parameters")
        try:
            validate_parameters(name, parameters)
        except ToolSchemaError as exc:
            raise BridgeError(str(exc), f"tools[{i}].function.parameters") from exc
        result.append(ToolDescription(name, function.get("description") or "", parameters))
    return result


def named_function(tool_choice: str | dict[str, Any] | None, declared: Sequence[str]) -> str | None:
    """The function a named `tool_choice` asks for, or None for "auto", "none" and "required"."""
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        return None
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function":
        raise BridgeError(
            "tool_choice must be 'auto', 'none', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    name = function.get("name") if isinstance(function, dict) else None
    if name not in declared:
        raise BridgeError(
            f"tool_choice names the function {name!r}, which is not among the tools "
            f"{list(declared)}",
            "tool_choice",
        )
    return name


def reply_constraint(
    tools: Sequence[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    response_format: dict[str, Any] | None,
    *,
    strict_tools: bool = False,
) -> ReplyConstraint | None:
    """What constrained decoding must enforce on the reply (the table above), or None when the
    reply runs free. Every schema it enforces is checked to compile: a 400 names the one that does
    not (`strict_tools`: every tool counts as strict)."""
    declared = function_tools(tools)
    name = named_function(tool_choice, [t.name for t in declared])
    if tool_choice == "required" and not declared:
        raise BridgeError("tool_choice 'required' needs at least one function tool", "tool_choice")
    final_schema = _final_schema(response_format)
    functions: list[FunctionConstraint] = []
    any_strict = False
    if tool_choice != "none":
        for i, (tool, description) in enumerate(zip(tools or (), declared, strict=True)):
            if name is not None and description.name != name:
                continue
            strict = strict_tools or (tool.get("function") or {}).get("strict") is True
            parameters = None
            if strict:
                parameters = description.parameters or NO_ARGUMENTS
                _check(parameters, f"tools[{i}].function.parameters")
                any_strict = True
            functions.append(FunctionConstraint(description.name, parameters))
    require_call = name is not None or tool_choice == "required"
    if not require_call and not any_strict and final_schema is None:
        return None
    return ReplyConstraint(tuple(functions), require_call, final_schema)


def _final_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    kind = (response_format or {}).get("type")
    if kind == "json_object":
        return dict(ANY_JSON_OBJECT)
    if kind != "json_schema":
        return None
    spec = (response_format or {}).get("json_schema") or {}
    schema = spec.get("schema", {})
    _check(schema, "response_format.json_schema.schema")
    return schema


def _check(schema: Any, param: str) -> None:
    try:
        check_json_schema(schema)
    except SchemaError as exc:
        where = exc.where(param)
        raise BridgeError(
            f"{where}: this JSON Schema cannot be enforced: {exc.message}", where
        ) from exc


def response_formats(response_format: dict[str, Any] | None) -> tuple[ResponseFormat, ...]:
    """A json_schema response format is shown to the model; json_object and text add nothing."""
    if not response_format or response_format.get("type") != "json_schema":
        return ()
    spec = response_format.get("json_schema") or {}
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise BridgeError(
            "response_format.json_schema.name is required", "response_format.json_schema.name"
        )
    return (ResponseFormat(name, spec.get("schema", {}), spec.get("description")),)


def chat_to_harmony(
    messages: Sequence[dict[str, Any]],
    *,
    today: datetime.date,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
    reasoning_effort: str | None = None,
    response_format: dict[str, Any] | None = None,
    defaults: PromptDefaults = PromptDefaults(),
) -> list[Message]:
    """The harmony conversation for a chat completions request (ready to render for completion)."""
    effort = ReasoningEffort(reasoning_effort) if reasoning_effort else defaults.reasoning_effort
    system = SystemContent(
        model_identity=defaults.model_identity,
        reasoning_effort=effort,
        conversation_start_date=today.isoformat(),
        knowledge_cutoff=defaults.knowledge_cutoff,
    )
    instructions: list[str] = []
    turns: list[Message] = []
    call_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        role = message.get("role")
        param = f"messages[{i}]"
        if role in ("system", "developer"):
            instructions.append(text_of(message.get("content"), f"{param}.content"))
        elif role == "user":
            text = text_of(message.get("content"), f"{param}.content")
            turns.append(Message(Author(Role.USER), (TextContent(text),)))
        elif role == "assistant":
            turns.extend(_assistant_turn(message, param, call_names))
        elif role == "tool":
            turns.append(_tool_result(message, param, call_names))
        else:
            raise BridgeError(f"{param}.role: unknown role {role!r}", f"{param}.role")

    declared = [] if tool_choice == "none" else function_tools(tools)
    developer = DeveloperContent(
        instructions="\n\n".join(instructions) if instructions else None,
        tools=(ToolNamespace("functions", None, tuple(declared)),) if declared else (),
        response_formats=response_formats(response_format),
    )
    prompt = [Message(Author(Role.SYSTEM), (system,))]
    if developer.instructions is not None or developer.tools or developer.response_formats:
        prompt.append(Message(Author(Role.DEVELOPER), (developer,)))
    return prompt + turns


def _assistant_turn(
    message: dict[str, Any], param: str, call_names: dict[str, str]
) -> list[Message]:
    out = []
    reasoning = message.get("reasoning")
    if reasoning is None:
        reasoning = message.get("reasoning_content")
    if reasoning:
        out.append(_assistant(reasoning, "analysis"))
    content = text_of(message.get("content"), f"{param}.content")
    calls = message.get("tool_calls") or []
    if content:
        # Beside tool calls, the text was a preamble on the commentary channel (CONTRACT.md).
        out.append(_assistant(content, "commentary" if calls else "final"))
    for j, call in enumerate(calls):
        function = call.get("function") or {}
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise BridgeError(
                f"{param}.tool_calls[{j}].function.name must be a non-empty string",
                f"{param}.tool_calls[{j}].function.name",
            )
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise BridgeError(
                f"{param}.tool_calls[{j}].function.arguments must be a string",
                f"{param}.tool_calls[{j}].function.arguments",
            )
        if isinstance(call.get("id"), str):
            call_names[call["id"]] = name
        out.append(
            _assistant(
                arguments,
                "commentary",
                recipient=f"functions.{name}",
                content_type=JSON_CONTENT_TYPE,
            )
        )
    return out


def _tool_result(message: dict[str, Any], param: str, call_names: dict[str, str]) -> Message:
    name = call_names.get(message.get("tool_call_id") or "") or message.get("name")
    if not name:
        raise BridgeError(
            f"{param}: tool message's tool_call_id {message.get('tool_call_id')!r} matches no "
            "earlier assistant tool call, and it has no name",
            f"{param}.tool_call_id",
        )
    text = text_of(message.get("content"), f"{param}.content")
    return Message(
        Author(Role.TOOL, f"functions.{name}"), (TextContent(text),), "commentary", "assistant"
    )


def _assistant(
    text: str, channel: str, *, recipient: str | None = None, content_type: str | None = None
) -> Message:
    return Message(Author(Role.ASSISTANT), (TextContent(text),), channel, recipient, content_type)
