"""Chat completions -> harmony: the mapping table row by row, its errors, and whole prompts rendered
token-identical to the same conversation built by hand with openai-harmony."""

from __future__ import annotations

import datetime

import openai_harmony as oh
import pytest

from harmony import Author, Message, ReasoningEffort, Renderer, Role, TextContent
from harmony.grammar import ReplyConstraint
from server.harmony_bridge import NO_ARGUMENTS, BridgeError, chat_to_harmony, reply_constraint

TODAY = datetime.date(2026, 11, 21)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the weather.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string"},
                "unit": {"enum": ["c", "f"], "type": "string"},
            },
            "required": ["location"],
        },
    },
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
}


def roles(messages: list[Message]) -> list[tuple]:
    return [
        (m.author.role.value, m.author.name, m.channel, m.recipient, m.content_type)
        for m in messages
    ]


def test_system_message_first_with_today_and_effort() -> None:
    [system, user] = chat_to_harmony(
        [{"role": "user", "content": "hi"}], today=TODAY, reasoning_effort="high"
    )
    content = system.content[0]
    assert system.author.role is Role.SYSTEM
    assert content.conversation_start_date == "2026-11-21"
    assert content.reasoning_effort is ReasoningEffort.HIGH
    assert user == Message(Author(Role.USER), (TextContent("hi"),))


def test_system_and_developer_messages_merge_in_order_after_the_system_message() -> None:
    messages = chat_to_harmony(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {
                "role": "developer",
                "content": [{"type": "text", "text": "Use "}, {"type": "text", "text": "French."}],
            },
        ],
        today=TODAY,
        tools=[WEATHER],
    )
    assert [m.author.role for m in messages] == [Role.SYSTEM, Role.DEVELOPER, Role.USER]
    developer = messages[1].content[0]
    assert developer.instructions == "Be brief.\n\nUse French."
    assert [t.name for t in developer.tools[0].tools] == ["get_weather"]


def test_no_developer_message_without_instructions_or_tools_and_tool_choice_none_hides_tools() -> (
    None
):
    messages = chat_to_harmony(
        [{"role": "user", "content": "hi"}], today=TODAY, tools=[WEATHER], tool_choice="none"
    )
    assert [m.author.role for m in messages] == [Role.SYSTEM, Role.USER]


def test_assistant_history_reasoning_preamble_calls_and_tool_results() -> None:
    messages = chat_to_harmony(
        [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "reasoning_content": "old name",
                "reasoning": "Need the weather.",
                "content": "Let me check.",
                "tool_calls": [CALL],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
            {"role": "assistant", "content": "It is 20 C."},
            {"role": "assistant", "content": ""},
        ],
        today=TODAY,
        tools=[WEATHER],
    )
    assert roles(messages[2:]) == [
        ("user", None, None, None, None),
        ("assistant", None, "analysis", None, None),
        ("assistant", None, "commentary", None, None),
        ("assistant", None, "commentary", "functions.get_weather", "<|constrain|>json"),
        ("tool", "functions.get_weather", "commentary", "assistant", None),
        ("assistant", None, "final", None, None),
    ]
    assert messages[3].text == "Need the weather."  # `reasoning` wins over `reasoning_content`
    assert messages[5].text == '{"location":"Paris"}'


def test_tool_message_falls_back_to_its_name() -> None:
    messages = chat_to_harmony(
        [{"role": "tool", "tool_call_id": "nope", "name": "lookup", "content": "x"}], today=TODAY
    )
    assert messages[-1].author == Author(Role.TOOL, "functions.lookup")


@pytest.mark.parametrize(
    ("kwargs", "param", "match"),
    [
        (
            {"messages": [{"role": "tool", "tool_call_id": "x", "content": "r"}]},
            "messages[0].tool_call_id",
            "matches no",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "messages[0].content[0]",
            "text only",
        ),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "unknown role"),
        (
            {
                "messages": [],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}],
            },
            "tools[0].function.parameters",
            "tool 'f'",
        ),
        (
            {"messages": [], "tools": [{"type": "web_search"}]},
            "tools[0].type",
            "only function tools",
        ),
    ],
)
def test_errors_name_the_offending_part(kwargs: dict, param: str, match: str) -> None:
    messages = kwargs.pop("messages")
    with pytest.raises(BridgeError, match=match) as error:
        chat_to_harmony(messages, today=TODAY, **kwargs)
    assert error.value.param == param


def test_full_chat_renders_like_openai_harmony(o200k_encoding, oracle) -> None:
    chat = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning": "Call the tool.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
        {"role": "assistant", "reasoning": "Answer.", "content": "20 C."},
        {"role": "user", "content": "And <|start|>tomorrow?"},
    ]
    ours = Renderer(o200k_encoding).render_for_completion(
        chat_to_harmony(chat, today=TODAY, tools=[WEATHER], reasoning_effort="low")
    )
    system = (
        oh.SystemContent.new()
        .with_reasoning_effort(oh.ReasoningEffort.LOW)
        .with_conversation_start_date("2026-11-21")
    )
    developer = (
        oh.DeveloperContent.new()
        .with_instructions("You are terse.")
        .with_function_tools(
            [
                oh.ToolDescription.new(
                    "get_weather", "Gets the weather.", WEATHER["function"]["parameters"]
                )
            ]
        )
    )
    assistant = oh.Role.ASSISTANT
    conversation = oh.Conversation.from_messages(
        [
            oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
            oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer),
            oh.Message.from_role_and_content(oh.Role.USER, "Weather in Paris?"),
            oh.Message.from_role_and_content(assistant, "Call the tool.").with_channel("analysis"),
            oh.Message.from_role_and_content(assistant, '{"location":"Paris"}')
            .with_channel("commentary")
            .with_recipient("functions.get_weather")
            .with_content_type("<|constrain|>json"),
            oh.Message.from_author_and_content(
                oh.Author.new(oh.Role.TOOL, "functions.get_weather"), '{"temp": 20}'
            )
            .with_channel("commentary")
            .with_recipient("assistant"),
            oh.Message.from_role_and_content(assistant, "Answer.").with_channel("analysis"),
            oh.Message.from_role_and_content(assistant, "20 C.").with_channel("final"),
            oh.Message.from_role_and_content(oh.Role.USER, "And <|start|>tomorrow?"),
        ]
    )
    theirs = oracle.render_conversation_for_completion(conversation, oh.Role.ASSISTANT)
    assert ours == theirs
    # The first turn's CoT is dropped (its answer was final), as openai-harmony drops it.
    assert "Call the tool." not in o200k_encoding.decode(ours)


# --- the reply's constraint (constrained decoding) ---------------------------------------------------

ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
STRICT_ADD = {"type": "function", "function": {**ADD["function"], "strict": True}}
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def functions_of(constraint) -> list[tuple[str, object]]:
    return [(f.name, f.parameters) for f in constraint.functions]


def test_required_allows_every_tool_and_enforces_only_strict_schemas() -> None:
    constraint = reply_constraint([WEATHER, STRICT_ADD], "required", None)
    assert constraint == ReplyConstraint(constraint.functions, require_call=True)
    assert functions_of(constraint) == [("get_weather", None), ("add", {"type": "object"})]
    # The server's flag makes every tool strict.
    flagged = reply_constraint([WEATHER, ADD], "required", None, strict_tools=True)
    assert functions_of(flagged) == [
        ("get_weather", WEATHER["function"]["parameters"]),
        ("add", {"type": "object"}),
    ]
    # A strict function with no parameters takes none.
    bare = {"type": "function", "function": {"name": "now", "strict": True}}
    assert functions_of(reply_constraint([bare], "required", None)) == [("now", NO_ARGUMENTS)]


def test_a_named_choice_requires_that_function_only() -> None:
    named = {"type": "function", "function": {"name": "add"}}
    constraint = reply_constraint([WEATHER, ADD], named, None)
    assert constraint is not None and constraint.require_call
    assert functions_of(constraint) == [("add", None)]


def test_auto_is_free_unless_a_tool_is_strict_or_a_format_is_asked() -> None:
    assert reply_constraint(None, None, None) is None
    assert reply_constraint([WEATHER], "auto", None) is None
    assert reply_constraint([WEATHER], None, {"type": "text"}) is None
    strict = reply_constraint([WEATHER, STRICT_ADD], "auto", None)
    assert strict is not None and not strict.require_call and strict.final_schema is None
    assert functions_of(strict) == [("get_weather", None), ("add", {"type": "object"})]


@pytest.mark.parametrize(
    ("response_format", "final_schema"),
    [
        ({"type": "json_object"}, {"type": "object"}),
        ({"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}, SCHEMA),
    ],
)
def test_a_response_format_constrains_the_final_answer(response_format, final_schema) -> None:
    constraint = reply_constraint(None, None, response_format)
    assert constraint == ReplyConstraint(final_schema=final_schema)
    # With tools (auto) the reply may still be a call; with tool_choice "none" it may not.
    with_tools = reply_constraint([WEATHER], "auto", response_format)
    assert with_tools is not None and functions_of(with_tools) == [("get_weather", None)]
    assert reply_constraint([WEATHER], "none", response_format).functions == ()


@pytest.mark.parametrize(
    ("args", "param", "match"),
    [
        (([], "required", None), "tool_choice", "needs at least one function tool"),
        (
            (None, None, {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"when": {"type": "string", "format": "nope"}}}}}),
            "response_format.json_schema.schema.properties.when",
            "cannot be enforced: Unknown format: nope",
        ),
        (
            ([WEATHER, {"type": "function", "function": {"name": "f", "strict": True,
              "parameters": {"type": "object", "properties": {"x": {"not": {}}}}}}], "auto", None),
            "tools[1].function.parameters.properties.x",
            "not",
        ),
    ],
)  # fmt: skip
def test_what_cannot_be_enforced_is_a_400_naming_the_part(args, param, match) -> None:
    with pytest.raises(BridgeError, match=match) as caught:
        reply_constraint(*args)
    assert caught.value.param == param
    assert str(caught.value).startswith(param) or param == "tool_choice"
