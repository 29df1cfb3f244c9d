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
from harmony.messages import DEFAULT_KNOWLEDGE_CUTOFF, DEFAULT_MODEL_IDENTITY
from harmony.tool_schema import validate_parameters

JSON_CONTENT_TYPE = "<|constrain|>json"


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


def forced_function(
    tool_choice: str | dict[str, Any] | None, tools: Sequence[dict[str, Any]] | None
) -> str | None:
    """The function a named `tool_choice` forces (its call header is then prefilled), or None.

    "auto", "none" and "required" force no header here ("required" leaves the model the choice
    of function, which only constrained decoding can enforce).
    """
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
    declared = [t.name for t in function_tools(tools)]
    if name not in declared:
        raise BridgeError(
            f"tool_choice names the function {name!r}, which is not among the tools {declared}",
            "tool_choice",
        )
    return name


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
