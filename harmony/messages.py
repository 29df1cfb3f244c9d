"""The nouns of the harmony format: roles, authors, messages, and the structured system/developer content.

These mirror openai-harmony's types (Role, Author, Message, SystemContent, DeveloperContent,
ToolNamespaceConfig, ToolDescription, ChannelConfig, ReasoningEffort) as plain frozen dataclasses, so
the renderer and parser stay free of any I/O and the server maps OpenAI requests onto them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any


class Role(enum.StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"
    DEVELOPER = "developer"
    TOOL = "tool"


class ReasoningEffort(enum.StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


@dataclass(frozen=True, slots=True)
class Author:
    role: Role
    # For tool messages the name is what the header shows (e.g. "functions.get_weather").
    name: str | None = None


@dataclass(frozen=True, slots=True)
class TextContent:
    text: str


@dataclass(frozen=True, slots=True)
class ToolDescription:
    name: str
    description: str = ""
    # A JSON Schema object for the arguments; None renders `() => any`.
    parameters: Any = None


@dataclass(frozen=True, slots=True)
class ToolNamespace:
    """A namespace of tools (`functions`, `browser`, `python`) rendered in a `# Tools` section."""

    name: str
    description: str | None = None
    tools: tuple[ToolDescription, ...] = ()


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    valid_channels: tuple[str, ...] = ("analysis", "commentary", "final")
    channel_required: bool = True


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """A structured-output format, rendered in the developer message's `# Response Formats`."""

    name: str
    schema: Any
    description: str | None = None


DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"


@dataclass(frozen=True, slots=True)
class SystemContent:
    """The system message: identity, dates, reasoning effort, built-in tools, channel config."""

    model_identity: str | None = DEFAULT_MODEL_IDENTITY
    reasoning_effort: ReasoningEffort | None = ReasoningEffort.MEDIUM
    # Namespaces render in name order, as openai-harmony keeps them in a sorted map.
    tools: tuple[ToolNamespace, ...] = ()
    conversation_start_date: str | None = None
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF
    channel_config: ChannelConfig | None = field(default_factory=ChannelConfig)

    def with_tools(self, namespace: ToolNamespace) -> SystemContent:
        return replace(self, tools=_put_namespace(self.tools, namespace))

    def with_browser_tool(self) -> SystemContent:
        return self.with_tools(browser_namespace())

    def with_python_tool(self) -> SystemContent:
        return self.with_tools(python_namespace())


@dataclass(frozen=True, slots=True)
class DeveloperContent:
    """The developer message: instructions (the "system prompt"), function tools, response formats."""

    instructions: str | None = None
    tools: tuple[ToolNamespace, ...] = ()
    response_formats: tuple[ResponseFormat, ...] = ()

    def with_tools(self, namespace: ToolNamespace) -> DeveloperContent:
        return replace(self, tools=_put_namespace(self.tools, namespace))

    def with_function_tools(self, tools: list[ToolDescription]) -> DeveloperContent:
        return self.with_tools(ToolNamespace("functions", None, tuple(tools)))

    @property
    def has_function_tools(self) -> bool:
        return any(ns.name == "functions" and ns.tools for ns in self.tools)


Content = TextContent | SystemContent | DeveloperContent


def _put_namespace(
    namespaces: tuple[ToolNamespace, ...], namespace: ToolNamespace
) -> tuple[ToolNamespace, ...]:
    """Insert or replace a namespace by name, keeping name order (openai-harmony's BTreeMap)."""
    kept = {ns.name: ns for ns in namespaces}
    kept[namespace.name] = namespace
    return tuple(kept[name] for name in sorted(kept))


@dataclass(frozen=True, slots=True)
class Message:
    author: Author
    content: tuple[Content, ...]
    channel: str | None = None
    # None (or "all") renders no recipient; a tool call names the tool ("functions.get_weather").
    recipient: str | None = None
    # e.g. "<|constrain|>json" for JSON tool arguments.
    content_type: str | None = None

    @classmethod
    def from_role(cls, role: Role, content: str | Content, *, name: str | None = None) -> Message:
        item = TextContent(content) if isinstance(content, str) else content
        return cls(Author(role, name), (item,))

    def with_channel(self, channel: str | None) -> Message:
        return replace(self, channel=channel)

    def with_recipient(self, recipient: str | None) -> Message:
        return replace(self, recipient=recipient)

    def with_content_type(self, content_type: str | None) -> Message:
        return replace(self, content_type=content_type)

    @property
    def text(self) -> str:
        """The concatenated text of all text content items."""
        return "".join(c.text for c in self.content if isinstance(c, TextContent))


def browser_namespace() -> ToolNamespace:
    """The built-in browser tool exactly as gpt-oss was trained on it."""
    description = (
        "Tool for browsing.\n"
        "The `cursor` appears in brackets before each browsing display: `[{cursor}]`.\n"
        "Cite information from the tool using the following format:\n"
        "`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.\n"
        "Do not quote more than 10 words directly from the tool output.\n"
        "sources=web (default: web)"
    )
    search = ToolDescription(
        "search",
        "Searches for information related to `query` and displays `topn` results.",
        {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "topn": {"type": "number", "default": 10},
                "source": {"type": "string"},
            },
            "required": ["query"],
        },
    )
    open_ = ToolDescription(
        "open",
        "Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, "
        "showing `num_lines` lines.\n"
        "Valid link ids are displayed with the formatting: `【{id}†.*】`.\n"
        "If `cursor` is not provided, the most recent page is implied.\n"
        "If `id` is a string, it is treated as a fully qualified URL associated with `source`.\n"
        "If `loc` is not provided, the viewport will be positioned at the beginning of the document "
        "or centered on the most relevant passage, if available.\n"
        "Use this function without `id` to scroll to a new location of an opened page.",
        {
            "type": "object",
            "properties": {
                "id": {"type": ["number", "string"], "default": -1},
                "cursor": {"type": "number", "default": -1},
                "loc": {"type": "number", "default": -1},
                "num_lines": {"type": "number", "default": -1},
                "view_source": {"type": "boolean", "default": False},
                "source": {"type": "string"},
            },
        },
    )
    find = ToolDescription(
        "find",
        "Finds exact matches of `pattern` in the current page, or the page given by `cursor`.",
        {
            "type": "object",
            "properties": {
                "pattern": {"type": "string"},
                "cursor": {"type": "number", "default": -1},
            },
            "required": ["pattern"],
        },
    )
    return ToolNamespace("browser", description, (search, open_, find))


def python_namespace() -> ToolNamespace:
    """The built-in python tool exactly as gpt-oss was trained on it."""
    description = (
        "Use this tool to execute Python code in your chain of thought. The code will not be shown "
        "to the user. This tool should be used for internal reasoning, but not for code that is "
        "intended to be visible to the user (e.g. when creating plots, tables, or files).\n\n"
        "When you send a message containing Python code to python, it will be executed in a "
        "stateful Jupyter notebook environment. python will respond with the output of the "
        "execution or time out after 120.0 seconds. The drive at '/mnt/data' can be used to save "
        "and persist user files. Internet access for this session is UNKNOWN. Depends on the "
        "cluster."
    )
    return ToolNamespace("python", description, ())
