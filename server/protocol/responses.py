"""Responses API (`/v1/responses`) shapes: the request model, input items -> chat messages, and
the response object.

Input items map onto the chat-completions message dicts that `harmony_bridge.chat_to_harmony`
takes, so the harmony side of both APIs is one mapping:

| Responses input item                        | chat message                                     |
|---------------------------------------------|--------------------------------------------------|
| `instructions`                              | a developer message, first                       |
| `message` system / developer / user         | the same role; input_text/output_text parts      |
| `reasoning` (content, else summary)         | assistant `reasoning`                            |
| `message` assistant                         | assistant `content`                              |
| `function_call` {call_id, name, arguments}  | assistant `tool_calls` [{id: call_id, ...}]      |
| `function_call_output` {call_id, output}    | `tool` message with tool_call_id = call_id       |

A run of assistant items in the order reasoning, message, function calls becomes one assistant
message, so that text written before a call is the call's preamble (commentary), as in chat.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.errors import InvalidRequestError
from server.harmony_output import ChatDelta

# Documented OpenAI fields this server cannot honour: a 400 that names them.
UNSUPPORTED = ("conversation", "prompt", "max_tool_calls", "top_logprobs", "stream_options")

_TEXT_PARTS = ("input_text", "output_text", "text")
# Rank of an assistant-side item within one assistant message: reasoning, content, calls.
_RANK = {"reasoning": 0, "message": 1, "function_call": 2}


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    effort: Literal["low", "medium", "high"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    reasoning: ReasoningConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: TextConfig | None = None
    stream: bool = False
    background: bool = False
    store: bool = True
    metadata: dict[str, str] | None = None
    # Accepted, no effect here.
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Refused by name (see UNSUPPORTED).
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
    top_logprobs: Any = None
    stream_options: Any = None

    def input_items(self) -> list[dict[str, Any]]:
        """The input as items (a string is one user message)."""
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return list(self.input)

    def chat_tools(self) -> list[dict[str, Any]] | None:
        """Flat Responses tools -> chat's `{type, function: {...}}` shape."""
        if self.tools is None:
            return None
        out = []
        for i, tool in enumerate(self.tools):
            if tool.get("type") != "function":
                raise InvalidRequestError(
                    f"tools[{i}]: only function tools are supported, found type "
                    f"{tool.get('type')!r}",
                    param=f"tools[{i}].type",
                )
            name = tool.get("name")
            if not isinstance(name, str) or not name:
                raise InvalidRequestError(
                    f"tools[{i}].name must be a non-empty string", param=f"tools[{i}].name"
                )
            keys = ("name", "description", "parameters", "strict")
            function = {k: tool[k] for k in keys if k in tool}
            out.append({"type": "function", "function": function})
        return out

    def chat_tool_choice(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function":
            return {"type": "function", "function": {"name": choice.get("name")}}
        return choice

    def response_format(self) -> dict[str, Any] | None:
        """`text.format` in chat's `response_format` shape (json_schema is shown to the model)."""
        fmt = self.text.format if self.text is not None else None
        if not fmt or fmt.get("type") != "json_schema":
            return fmt
        if not isinstance(fmt.get("name"), str) or not fmt["name"]:
            raise InvalidRequestError(
                "text.format.name is required for a json_schema format", param="text.format.name"
            )
        spec = {k: fmt[k] for k in ("name", "schema", "description", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}


# Chat-shaped names in errors from the shared chat mapping -> where the Responses request has them.
_CHAT_PARAMS = (
    (re.compile(r"\bresponse_format\.json_schema\."), "text.format."),
    (re.compile(r"\btools\[(\d+)\]\.function\."), r"tools[\1]."),
)


def responses_error(error: InvalidRequestError) -> InvalidRequestError:
    """`error` (raised by the chat mapping) naming the parts of the Responses request instead."""

    def rename(text: str) -> str:
        for pattern, replacement in _CHAT_PARAMS:
            text = pattern.sub(replacement, text)
        return text

    param = None if error.param is None else rename(error.param)
    return InvalidRequestError(rename(error.message), param=param, code=error.code)


# --- input items -> chat messages -----------------------------------------------------------------


def items_to_chat_messages(
    items: Sequence[dict[str, Any]], instructions: str | None = None
) -> list[dict[str, Any]]:
    """The chat messages for `instructions` and a list of input items (see the module table)."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "developer", "content": instructions})
    open_rank = -1  # the rank of the last item folded into messages[-1], -1 when none is open
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{param} must be an object", param=param)
        kind = item.get("type", "message" if "role" in item else None)
        role = item.get("role")
        if kind == "message" and role != "assistant":
            if role not in ("user", "system", "developer"):
                raise InvalidRequestError(
                    f"{param}.role: unknown role {role!r}", param=f"{param}.role"
                )
            messages.append({"role": role, "content": _text(item.get("content"), param)})
            open_rank = -1
        elif kind in _RANK:
            rank = _RANK[kind]
            if open_rank < 0 or rank < open_rank or (rank == open_rank and rank < 2):
                messages.append({"role": "assistant", "content": None})
            _fold_assistant(messages[-1], kind, item, param)
            open_rank = rank
        elif kind == "function_call_output":
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": _string(item, "call_id", param),
                    "content": _text(item.get("output"), f"{param}.output"),
                }
            )
            open_rank = -1
        else:
            raise InvalidRequestError(
                f"{param}.type: input items of type {kind!r} are not supported",
                param=f"{param}.type",
            )
    return messages


def _fold_assistant(message: dict[str, Any], kind: str, item: dict[str, Any], param: str) -> None:
    if kind == "reasoning":
        message["reasoning"] = _reasoning_text(item, param)
    elif kind == "message":
        message["content"] = _text(item.get("content"), f"{param}.content")
    else:
        call = {
            "id": _string(item, "call_id", param),
            "type": "function",
            "function": {
                "name": _string(item, "name", param),
                "arguments": _string(item, "arguments", param),
            },
        }
        message.setdefault("tool_calls", []).append(call)


def _reasoning_text(item: dict[str, Any], param: str) -> str:
    parts = item.get("content") or item.get("summary") or []
    if not isinstance(parts, list):
        raise InvalidRequestError(f"{param}.content must be a list", param=f"{param}.content")
    texts = []
    for j, part in enumerate(parts):
        text = part.get("text") if isinstance(part, dict) else None
        if not isinstance(text, str):
            raise InvalidRequestError(
                f"{param}.content[{j}].text must be a string", param=f"{param}.content[{j}].text"
            )
        texts.append(text)
    return "".join(texts)


def _text(content: Any, param: str) -> str:
    """A string, or text parts (input_text / output_text) concatenated; anything else is refused."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"{param} must be a string or a list of content parts", param=param
        )
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise InvalidRequestError(
                f"{param}[{j}]: {kind!r} content is not supported: gpt-oss takes text only",
                param=f"{param}[{j}].type",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequestError(
                f"{param}[{j}].text must be a string", param=f"{param}[{j}].text"
            )
        texts.append(text)
    return "".join(texts)


def _string(item: dict[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidRequestError(f"{param}.{key} must be a string", param=f"{param}.{key}")
    return value


# --- the response object --------------------------------------------------------------------------


def response_object(
    body: ResponsesRequest,
    *,
    response_id: str,
    created_at: int,
    model: str,
    status: str,
    output: list[dict[str, Any]],
) -> dict[str, Any]:
    """A `response` object in OpenAI's field order; usage and details are filled in by the run."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": body.background,
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": True
        if body.parallel_tool_calls is None
        else body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
        "service_tier": "default",
        "store": body.store,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {"format": (body.text.format if body.text else None) or {"type": "text"}},
        "tool_choice": body.tool_choice or "auto",
        "tools": [_tool_object(t) for t in body.tools or ()],
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": body.truncation or "disabled",
        "usage": None,
        "user": body.user,
        "metadata": body.metadata or {},
    }


def _tool_object(tool: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "name": tool.get("name"),
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict", True),
    }


# --- output items and their streaming events -----------------------------------------------------


class OutputItems:
    """Chat deltas (`harmony_output.ChatOutputMapper`) -> output items and their stream events.

    Each change of kind (reasoning, text, a new tool call) closes the open item and opens the next.
    `feed` and `close` return the item events (without `sequence_number`, which the sender adds);
    `items` is the output so far, an open item holding its text only once it is closed.
    """

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._kind: str | None = None  # "reasoning", "message" or "function_call" when one is open
        self._text: list[str] = []

    def feed(self, deltas: Sequence[ChatDelta]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for delta in deltas:
            if delta.content is not None:
                self._ensure("message", events)
                events.append(self._event("response.output_text.delta", delta.content))
            elif delta.reasoning is not None:
                self._ensure("reasoning", events)
                events.append(self._event("response.reasoning_text.delta", delta.reasoning))
            else:
                call = delta.tool_call
                assert call is not None
                if call.id is not None:  # the first piece of a new call
                    events.extend(self.close())
                    self._open(_function_call(call.id, call.name or ""), events)
                if call.arguments:
                    events.append(
                        self._event("response.function_call_arguments.delta", call.arguments)
                    )
        return events

    def close(self, status: str = "completed") -> list[dict[str, Any]]:
        """Close the open item (if any) with this status; return its closing events."""
        kind = self._kind
        if kind is None:
            return []
        item = self.items[-1]
        text = "".join(self._text)
        self._kind, self._text = None, []
        item["status"] = status
        index = len(self.items) - 1
        head = {"item_id": item["id"], "output_index": index}
        if kind == "function_call":
            item["arguments"] = text
            events = [{"type": "response.function_call_arguments.done", **head, "arguments": text}]
        else:
            part = _part(kind, text)
            item["content"] = [part]
            done_type = (
                "response.output_text.done"
                if kind == "message"
                else ("response.reasoning_text.done")
            )
            extra = {"logprobs": []} if kind == "message" else {}
            events = [
                {"type": done_type, **head, "content_index": 0, "text": text, **extra},
                {"type": "response.content_part.done", **head, "content_index": 0, "part": part},
            ]
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        return events

    def _ensure(self, kind: str, events: list[dict[str, Any]]) -> None:
        if self._kind == kind:
            return
        events.extend(self.close())
        item = _reasoning() if kind == "reasoning" else _message()
        self._open(item, events)
        events.append(
            {
                "type": "response.content_part.added",
                "item_id": item["id"],
                "output_index": len(self.items) - 1,
                "content_index": 0,
                "part": _part(kind, ""),
            }
        )

    def _open(self, item: dict[str, Any], events: list[dict[str, Any]]) -> None:
        self.items.append(item)
        self._kind = item["type"]
        added = {**item, "content": []} if "content" in item else dict(item)
        events.append(
            {
                "type": "response.output_item.added",
                "output_index": len(self.items) - 1,
                "item": added,
            }
        )

    def _event(self, type_: str, delta: str) -> dict[str, Any]:
        self._text.append(delta)
        item = self.items[-1]
        event = {"type": type_, "item_id": item["id"], "output_index": len(self.items) - 1}
        if item["type"] != "function_call":
            event["content_index"] = 0
        event["delta"] = delta
        if item["type"] == "message":
            event["logprobs"] = []
        return event


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def _reasoning() -> dict[str, Any]:
    return {
        "id": _item_id("rs"),
        "type": "reasoning",
        "summary": [],
        "content": [],
        "status": "in_progress",
    }


def _message() -> dict[str, Any]:
    return {
        "id": _item_id("msg"),
        "type": "message",
        "role": "assistant",
        "status": "in_progress",
        "content": [],
    }


def _function_call(call_id: str, name: str) -> dict[str, Any]:
    return {
        "id": _item_id("fc"),
        "type": "function_call",
        "status": "in_progress",
        "call_id": call_id,
        "name": name,
        "arguments": "",
    }


def _part(kind: str, text: str) -> dict[str, Any]:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
