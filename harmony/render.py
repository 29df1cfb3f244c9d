"""Conversation -> prompt token ids, token-identical to openai-harmony's renderer.

A message renders as `<|start|>{header}<|message|>{content}<|end|>` where the header is the role
(or, for tools, the author name), ` to={recipient}`, `<|channel|>{channel}` and ` {content_type}`
(a leading `<|constrain|>` becomes the control token). Every piece of text is encoded on its own as
ordinary text, exactly as openai-harmony splits it, so token boundaries match and a user who types
`<|start|>` gets plain text tokens. Assistant messages with a recipient end with `<|call|>`.

Earlier turns' analysis is dropped by openai-harmony 0.0.8's rule: when the last assistant message is
on the final channel, analysis messages before the first final-channel message are left out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache

from harmony.messages import (
    DeveloperContent,
    Message,
    ResponseFormat,
    Role,
    SystemContent,
    TextContent,
    ToolNamespace,
)
from harmony.tokens import HarmonyEncoding
from harmony.tool_schema import schema_to_typescript, validate_parameters

CONSTRAIN_MARKER = "<|constrain|>"


class RenderError(ValueError):
    """A message cannot be rendered in the harmony format."""


def rust_lines(text: str) -> list[str]:
    """Split like Rust's `str::lines`: on `\\n` (dropping one `\\r` before it), no trailing empty line."""
    lines = []
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        if end == -1:
            lines.append(text[start:])
            break
        line = text[start:end]
        lines.append(line[:-1] if line.endswith("\r") else line)
        start = end + 1
    return lines


def tools_section(namespaces: Sequence[ToolNamespace]) -> str:
    """The `# Tools` section: one `## name` block per namespace, in name order."""
    by_name = {ns.name: ns for ns in namespaces}
    sections = ["# Tools"]
    for name in sorted(by_name):
        ns = by_name[name]
        lines = [f"## {ns.name}\n"]
        if ns.description is not None:
            prefix = "// " if ns.tools else ""
            lines.extend(prefix + line for line in rust_lines(ns.description))
        if ns.tools:
            lines.append(f"namespace {ns.name} {{\n")
            for tool in ns.tools:
                lines.extend(f"// {line}" for line in rust_lines(tool.description))
                if tool.parameters is None:
                    lines.append(f"type {tool.name} = () => any;\n")
                else:
                    validate_parameters(tool.name, tool.parameters)
                    params = schema_to_typescript(tool.parameters, "")
                    lines.append(f"type {tool.name} = (_: {params}) => any;\n")
            lines.append(f"}} // namespace {ns.name}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def system_text(system: SystemContent, *, has_function_tools: bool) -> str:
    sections = []
    top = []
    if system.model_identity is not None:
        top.append(system.model_identity)
    if system.knowledge_cutoff is not None:
        top.append(f"Knowledge cutoff: {system.knowledge_cutoff}")
    if system.conversation_start_date is not None:
        top.append(f"Current date: {system.conversation_start_date}")
    if top:
        sections.append("\n".join(top))
    if system.reasoning_effort is not None:
        sections.append(f"Reasoning: {system.reasoning_effort.value}")
    if system.tools:
        sections.append(tools_section(system.tools))
    config = system.channel_config
    if config is not None and config.valid_channels:
        header = f"# Valid channels: {', '.join(config.valid_channels)}."
        if config.channel_required:
            header += " Channel must be included for every message."
        if has_function_tools:
            header += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(header)
    return "\n\n".join(sections)


def response_formats_section(formats: Sequence[ResponseFormat]) -> str:
    """`# Response Formats`, in the form the harmony format guide documents (no openai-harmony API)."""
    blocks = []
    for fmt in formats:
        comment = f"// {fmt.description}\n" if fmt.description else ""
        schema = json.dumps(fmt.schema, ensure_ascii=False, separators=(",", ":"))
        blocks.append(f"## {fmt.name}\n\n{comment}{schema}")
    return "# Response Formats\n\n" + "\n\n".join(blocks)


def developer_text(developer: DeveloperContent) -> str:
    sections = []
    if developer.instructions is not None:
        sections += ["# Instructions", developer.instructions]
    if developer.tools:
        sections.append(tools_section(developer.tools))
    if developer.response_formats:
        sections.append(response_formats_section(developer.response_formats))
    return "\n\n".join(sections)


class Renderer:
    """Renders harmony messages into token ids of one vocabulary."""

    def __init__(self, encoding: HarmonyEncoding) -> None:
        self.encoding = encoding
        ids = encoding.ids
        self._start, self._message, self._channel = ids.start, ids.message, ids.channel
        self._constrain, self._end, self._call, self._return = (
            ids.constrain,
            ids.end,
            ids.call,
            ids.return_,
        )
        # Header pieces (roles, names, recipients, channels) repeat endlessly: encode each once.
        self._piece = lru_cache(maxsize=8192)(self._encode_piece)

    def _encode_piece(self, text: str) -> tuple[int, ...]:
        return tuple(self.encoding.encode(text))

    # --- one message ---------------------------------------------------------------------------
    def render_message(self, message: Message, *, has_function_tools: bool = False) -> list[int]:
        out: list[int] = []
        self._render_into(message, out, has_function_tools)
        return out

    def _render_into(self, message: Message, out: list[int], has_function_tools: bool) -> None:
        piece = self._piece
        role = message.author.role
        out.append(self._start)
        if role is Role.TOOL:
            if message.author.name is None:
                raise RenderError(
                    "a tool message needs an author name, e.g. 'functions.get_weather'"
                )
            out += piece(message.author.name)
        else:
            out += piece(role.value)
            if message.author.name is not None:
                out += piece(f":{message.author.name}")
        if message.recipient is not None and message.recipient != "all":
            out += piece(f" to={message.recipient}")
        if message.channel is not None:
            out.append(self._channel)
            out += piece(message.channel)
        if message.content_type is not None:
            if message.content_type.startswith(CONSTRAIN_MARKER):
                out += piece(" ")
                out.append(self._constrain)
                rest = message.content_type[len(CONSTRAIN_MARKER) :]
                if rest:
                    out += piece(rest)
            else:
                out += piece(f" {message.content_type}")
        out.append(self._message)
        encode = self.encoding.encode
        for item in message.content:
            if isinstance(item, TextContent):
                out += encode(item.text)
            elif isinstance(item, SystemContent):
                if role is not Role.SYSTEM:
                    raise RenderError(
                        f"system content may only appear in system messages, not {role}"
                    )
                out += encode(system_text(item, has_function_tools=has_function_tools))
            elif isinstance(item, DeveloperContent):
                if role is not Role.DEVELOPER:
                    raise RenderError(
                        f"developer content may only appear in developer messages, not {role}"
                    )
                out += encode(developer_text(item))
            else:
                raise RenderError(f"unknown content item {type(item).__name__}")
        is_call = role is Role.ASSISTANT and message.recipient is not None
        out.append(self._call if is_call else self._end)

    # --- conversations -------------------------------------------------------------------------
    def render_conversation(
        self, messages: Sequence[Message], *, auto_drop_analysis: bool = True
    ) -> list[int]:
        has_function_tools = any(
            isinstance(item, DeveloperContent) and item.has_function_tools
            for message in messages
            for item in message.content
        )
        kept = _drop_earlier_analysis(messages) if auto_drop_analysis else messages
        out: list[int] = []
        for message in kept:
            self._render_into(message, out, has_function_tools)
        return out

    def render_for_completion(
        self,
        messages: Sequence[Message],
        next_role: Role = Role.ASSISTANT,
        *,
        auto_drop_analysis: bool = True,
    ) -> list[int]:
        """The prompt for sampling the next turn: the conversation, then `<|start|>{role}`."""
        out = self.render_conversation(messages, auto_drop_analysis=auto_drop_analysis)
        out.append(self._start)
        out += self._piece(next_role.value)
        return out

    def render_for_training(
        self, messages: Sequence[Message], *, auto_drop_analysis: bool = True
    ) -> list[int]:
        """The conversation as a training target: a closing final answer ends with `<|return|>`."""
        out = self.render_conversation(messages, auto_drop_analysis=auto_drop_analysis)
        if messages and out:
            last = messages[-1]
            if last.author.role is Role.ASSISTANT and last.channel == "final":
                out[-1] = self._return
        return out


def _drop_earlier_analysis(messages: Sequence[Message]) -> Sequence[Message]:
    last_assistant_is_final = next(
        (m.channel == "final" for m in reversed(messages) if m.author.role is Role.ASSISTANT), False
    )
    if not last_assistant_is_final:
        return messages
    first_final = next(i for i, m in enumerate(messages) if m.channel == "final")
    return [m for i, m in enumerate(messages) if not (i < first_final and m.channel == "analysis")]
