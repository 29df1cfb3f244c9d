"""Hypothesis strategies for harmony conversations: every role, channel, recipient and content type,
reasoning efforts, dates, tool sets with generated JSON Schemas, multi-turn tool use with CoT."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from harmony import (
    Author,
    ChannelConfig,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
    ToolNamespace,
    browser_namespace,
    python_namespace,
)

# Snippets that stress the format: control-token look-alikes, whitespace, multi-byte text.
_TRICKY = [
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|constrain|>",
    "<|return|>",
    "<|call|>",
    "<|endoftext|>",
    " to=functions.x",
    "\n",
    "\r\n",
    "\n\n",
    "  ",
    "\t",
    "é",
    "😀",
    "日本語",
    "‍",
    "```python\nprint('hi')\n```",
    '{"a": [1, 2.5, null]}',
    "2 + 2 = 4",
    " ",
    "'s",
    "123456",
]

words = st.from_regex(r"[a-z][a-z_0-9]{0,11}", fullmatch=True)
_any_text = st.text(st.characters(codec="utf-8"), max_size=40)
text = st.lists(st.one_of(st.sampled_from(_TRICKY), _any_text, words), max_size=6).map("".join)
short_text = st.one_of(words, st.text(st.characters(codec="utf-8"), max_size=16))

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    # Six significant digits and modest exponents: serde_json (inside openai-harmony) parses other
    # floats inexactly, which would test its JSON parser rather than the rendering.
    st.floats(-1e15, 1e15).map(lambda x: float(f"{x:.6g}") if abs(x) >= 1e-10 else 0.0),
    short_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(words, inner, max_size=3)),
    max_leaves=6,
)
_type_names = st.sampled_from(
    ["string", "number", "integer", "boolean", "object", "array", "null", "whatever"]
)

_leaf_keys = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(_type_names, _type_names, st.lists(_type_names, max_size=3)),
        "description": short_text,
        "title": short_text,
        "default": json_values,
        "nullable": st.one_of(st.booleans(), st.just(1)),
        "enum": st.lists(st.one_of(words, st.integers(-5, 5), st.none()), max_size=4),
        "examples": st.lists(st.one_of(words, st.integers(0, 9)), max_size=3),
        "$ref": st.just("#/$defs/Thing"),
        "const": json_scalars,
        "format": st.sampled_from(["date-time", "uri", "email"]),
    },
)


def _assemble(
    keys: dict[str, Any],
    properties: dict[str, Any] | None,
    required: list[str] | None,
    items: Any,
    one_of: list[Any] | None,
    any_of: list[Any] | None,
) -> Any:
    schema = dict(keys)
    if properties is not None:
        schema["properties"] = properties
        schema.setdefault("type", "object")
    if required is not None:
        schema["required"] = required
    if items is not None:
        schema["items"] = items
    if one_of is not None:
        schema["oneOf"] = one_of
    if any_of is not None:
        schema["anyOf"] = any_of
    return schema


def _node(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.builds(
        _assemble,
        _leaf_keys,
        st.one_of(st.none(), st.dictionaries(words, children, max_size=4)),
        st.one_of(st.none(), st.lists(words, max_size=3)),
        st.one_of(st.none(), children),
        st.one_of(st.none(), st.none(), st.lists(children, max_size=3)),
        st.one_of(st.none(), st.none(), st.lists(children, max_size=2)),
    )


# Non-object values stand where a schema is expected now and then: openai-harmony tolerates them.
json_schemas = st.recursive(st.one_of(_leaf_keys, st.booleans()), _node, max_leaves=10)


@st.composite
def parameter_schemas(draw: st.DrawFn) -> dict[str, Any] | None:
    """A function's parameters: usually an object schema with properties, sometimes odd."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return None
    if kind == 1:
        return draw(st.dictionaries(st.sampled_from(["type", "description"]), short_text))
    properties = draw(st.dictionaries(words, json_schemas, max_size=5))
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if properties and draw(st.booleans()):
        schema["required"] = draw(st.lists(st.sampled_from(sorted(properties)), max_size=3))
    if draw(st.integers(0, 4)) == 0:
        schema["description"] = draw(short_text)
    return schema


tools = st.builds(
    ToolDescription,
    name=words,
    description=st.one_of(text, words),
    parameters=parameter_schemas(),
)
function_namespace = st.builds(
    ToolNamespace,
    name=st.just("functions"),
    description=st.one_of(st.none(), st.none(), text),
    tools=st.lists(tools, max_size=4).map(tuple),
)
other_namespace = st.builds(
    ToolNamespace,
    name=words,
    description=st.one_of(st.none(), text),
    tools=st.lists(tools, max_size=2).map(tuple),
)
efforts = st.one_of(st.none(), st.sampled_from(list(ReasoningEffort)))
dates = st.one_of(st.none(), st.dates().map(str), short_text)
channel_configs = st.one_of(
    st.just(ChannelConfig()),
    st.none(),
    st.builds(
        ChannelConfig,
        valid_channels=st.lists(words, max_size=3).map(tuple),
        channel_required=st.booleans(),
    ),
)


@st.composite
def system_contents(draw: st.DrawFn) -> SystemContent:
    namespaces = []
    if draw(st.integers(0, 3)) == 0:
        namespaces.append(browser_namespace())
    if draw(st.integers(0, 3)) == 0:
        namespaces.append(python_namespace())
    if draw(st.integers(0, 5)) == 0:
        namespaces.append(draw(other_namespace))
    return SystemContent(
        model_identity=draw(st.one_of(st.just(SystemContent().model_identity), st.none(), text)),
        reasoning_effort=draw(efforts),
        tools=tuple(namespaces),
        conversation_start_date=draw(dates),
        knowledge_cutoff=draw(st.one_of(st.just("2024-06"), st.none(), short_text)),
        channel_config=draw(channel_configs),
    )


@st.composite
def developer_contents(draw: st.DrawFn) -> DeveloperContent:
    namespaces = []
    if draw(st.integers(0, 3)) > 0:
        namespaces.append(draw(function_namespace))
    if draw(st.integers(0, 6)) == 0:
        namespaces.append(draw(other_namespace))
    return DeveloperContent(instructions=draw(st.one_of(st.none(), text)), tools=tuple(namespaces))


def _assistant(body: str, channel: str | None, recipient: str | None = None,
               content_type: str | None = None) -> Message:  # fmt: skip
    return Message(Author(Role.ASSISTANT), (TextContent(body),), channel, recipient, content_type)


@st.composite
def turns(draw: st.DrawFn, tool_names: list[str]) -> list[Message]:
    """One step of a conversation: a user turn, CoT, a tool call and its result, an answer, ..."""
    kind = draw(st.integers(0, 8))
    name = draw(st.sampled_from(tool_names)) if tool_names else draw(words)
    if kind == 0:
        user_name = draw(st.one_of(st.none(), st.none(), words))
        return [Message(Author(Role.USER, user_name), (TextContent(draw(text)),))]
    if kind == 1:
        return [_assistant(draw(text), "analysis")]
    if kind == 2:
        return [_assistant(draw(text), "final")]
    if kind == 3:  # CoT, then a function call, then its result
        content_type = draw(st.sampled_from(["<|constrain|>json", "json", None, "<|constrain|>"]))
        call = _assistant(draw(text), "commentary", f"functions.{name}", content_type)
        result = Message(
            Author(Role.TOOL, f"functions.{name}"), (TextContent(draw(text)),), "commentary",
            "assistant",
        )  # fmt: skip
        return [_assistant(draw(text), "analysis"), call, result]
    if kind == 4:  # a preamble on the commentary channel
        return [_assistant(draw(text), "commentary")]
    if kind == 5:  # a built-in tool call on the analysis channel
        call = _assistant(draw(text), "analysis", "browser.search", None)
        result = Message(
            Author(Role.TOOL, "browser.search"), (TextContent(draw(text)),), "analysis", "assistant"
        )
        return [call, result]
    if kind == 6:  # several content items in one message
        contents = tuple(TextContent(t) for t in draw(st.lists(text, min_size=1, max_size=3)))
        return [Message(Author(Role.USER), contents)]
    # Anything at all in the header.
    role = draw(
        st.sampled_from([Role.USER, Role.ASSISTANT, Role.DEVELOPER, Role.SYSTEM, Role.TOOL])
    )
    author_name = draw(words) if role is Role.TOOL else draw(st.one_of(st.none(), words))
    return [
        Message(
            Author(role, author_name),
            (TextContent(draw(text)),),
            draw(st.one_of(st.none(), words, short_text)),
            draw(st.one_of(st.none(), st.just("all"), words, short_text)),
            draw(st.one_of(st.none(), words, st.just("<|constrain|>json"), short_text)),
        )
    ]


@st.composite
def conversations(draw: st.DrawFn) -> list[Message]:
    messages: list[Message] = []
    if draw(st.integers(0, 9)) > 0:
        messages.append(Message.from_role(Role.SYSTEM, draw(system_contents())))
    developer = None
    if draw(st.integers(0, 3)) > 0:
        developer = draw(developer_contents())
        messages.append(Message.from_role(Role.DEVELOPER, developer))
    tool_names = [t.name for ns in (developer.tools if developer else ()) for t in ns.tools]
    for _ in range(draw(st.integers(1, 7))):
        messages.extend(draw(turns(tool_names)))
    return messages
