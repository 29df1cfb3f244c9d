"""`server.harmony_output`: the model's harmony tokens -> chat-completions content, reasoning and tool calls.

Completions are built by rendering assistant messages with `harmony.Renderer` and stripping the
leading `<|start|>assistant` (which sits in the prompt), or from harmony text where a header must be
written another way than the renderer writes it. Every case runs on the synthetic vocabulary and on
the official o200k vocabulary (skipped without ../shared/tiktoken).

- Routing table: `route_message` for every channel, recipient form and role.
- Whole replies: analysis then final (reasoning, content, 'stop', reasoning_tokens); analysis then a
  call (id format, name, arguments, 'tool_calls'); two calls; a preamble then a call; the recipient
  in the role part and after the channel; a browser.search call and other roles dropped; output cut
  off mid-message ('length', partial text kept, a cut character as U+FFFD in the tail deltas).
- Streaming: token by token and in random chunks (hypothesis), the deltas concatenate to the
  non-streaming result; a call's first delta carries id and name, later ones only arguments; text of
  one kind within one feed() is one delta.
- Garbage (hypothesis: random ids, gap and out-of-range ids, stray control tokens) never raises and
  still streams consistently.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harmony import Author, HarmonyEncoding, Message, Renderer, Role, TextContent
from server.harmony_output import (
    ChatDelta,
    ChatOutputMapper,
    ChatResult,
    Route,
    ToolCallDelta,
    new_tool_call_id,
    parse_completion,
    route_message,
)
from tests.harmony.synthetic_vocab import synthetic_encoding

SYN = synthetic_encoding()
CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")
_SPECIAL_RE = re.compile(r"(<\|[a-z_0-9]+\|>)")
WEATHER_CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"location":"Paris"}<|call|>'
HYPOTHESIS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(params=["synthetic", "o200k"])
def enc(request: pytest.FixtureRequest) -> HarmonyEncoding:
    if request.param == "synthetic":
        return SYN
    return request.getfixturevalue("o200k_encoding")


# --- helpers --------------------------------------------------------------------------------------


def assistant(text: str, channel: str | None, **kwargs: str) -> Message:
    return Message(Author(Role.ASSISTANT), (TextContent(text),), channel=channel, **kwargs)


def call(name: str, arguments: str, *, channel: str = "commentary") -> Message:
    return assistant(
        arguments, channel, recipient=f"functions.{name}", content_type="<|constrain|>json"
    )


def completion(enc: HarmonyEncoding, messages: Sequence[Message]) -> list[int]:
    """The tokens the model writes after `<|start|>assistant`; a closing final message ends with
    `<|return|>`, as the model ends its turn."""
    tokens = Renderer(enc).render_conversation(messages, auto_drop_analysis=False)
    head = [enc.ids.start, *enc.encode("assistant")]
    assert tokens[: len(head)] == head
    tokens = tokens[len(head) :]
    if messages[-1].channel == "final":
        assert tokens[-1] == enc.ids.end
        tokens[-1] = enc.ids.return_
    return tokens


def toks(enc: HarmonyEncoding, text: str) -> list[int]:
    """Tokens of `text` where `<|name|>` is the control token and everything else ordinary text."""
    out: list[int] = []
    for piece in _SPECIAL_RE.split(text):
        if piece in enc.special_tokens:
            out.append(enc.token(piece))
        elif piece:
            out.extend(enc.encode(piece))
    return out


def stream(
    enc: HarmonyEncoding,
    tokens: Sequence[int],
    chunks: Sequence[int] = (),
    finish_reason: str | None = None,
) -> tuple[list[list[ChatDelta]], ChatResult]:
    """Feed the tokens in chunks of the given sizes (the rest one chunk); the deltas of each feed."""
    mapper = ChatOutputMapper(enc)
    steps, i = [], 0
    for size in chunks:
        steps.append(mapper.feed(tokens[i : i + size]))
        i += size
    steps.append(mapper.feed(tokens[i:]))
    result = mapper.finish(finish_reason)
    steps.append(list(result.tail_deltas))
    return steps, result


def check_stream(steps: list[list[ChatDelta]], result: ChatResult) -> None:
    """The deltas have OpenAI's streaming shape and concatenate to the result."""
    content, reasoning = [], []
    calls: dict[int, list[str]] = {}
    for step in steps:
        for a, b in itertools.pairwise(step):
            same_text = (a.content is not None and b.content is not None) or (
                a.reasoning is not None and b.reasoning is not None
            )
            same_call = a.tool_call and b.tool_call and a.tool_call.index == b.tool_call.index
            assert not (same_text or same_call), f"unmerged deltas in one step: {step}"
        for delta in step:
            fields = [delta.content, delta.reasoning, delta.tool_call]
            assert sum(f is not None for f in fields) == 1, delta
            assert delta.content != "" and delta.reasoning != ""
            if delta.content is not None:
                content.append(delta.content)
            elif delta.reasoning is not None:
                reasoning.append(delta.reasoning)
            else:
                tc = delta.tool_call
                assert tc is not None
                first = tc.index not in calls
                if first:
                    assert tc.index == len(calls), "tool calls are indexed in order from 0"
                    calls[tc.index] = [tc.id or "", tc.name or "", tc.arguments]
                    call_ = result.tool_calls[tc.index]
                    assert (tc.id, tc.name) == (call_.id, call_.name)
                else:
                    assert tc.id is None and tc.name is None, "only the first delta names the call"
                    calls[tc.index][2] += tc.arguments
    assert ("".join(content) or None) == result.content
    assert ("".join(reasoning) or None) == result.reasoning
    assert [list(calls[i]) for i in sorted(calls)] == [
        [c.id, c.name, c.arguments] for c in result.tool_calls
    ]
    for c in result.tool_calls:
        assert CALL_ID.fullmatch(c.id), c.id
    assert len({c.id for c in result.tool_calls}) == len(result.tool_calls)


# --- routing --------------------------------------------------------------------------------------

A = Role.ASSISTANT


@pytest.mark.parametrize(
    ("role", "channel", "recipient", "expected"),
    [
        (A, "final", None, (Route.CONTENT, None)),
        (A, "commentary", None, (Route.CONTENT, None)),
        (A, None, None, (Route.CONTENT, None)),
        (A, "analysis", None, (Route.REASONING, None)),
        (A, "commentary", "functions.get_weather", (Route.TOOL_CALL, "get_weather")),
        (A, "analysis", "functions.lookup", (Route.TOOL_CALL, "lookup")),
        (A, "commentary", "functions.a.b", (Route.TOOL_CALL, "a.b")),
        (A, "commentary", "functions.", (Route.DROPPED, None)),
        (A, "analysis", "browser.search", (Route.DROPPED, None)),
        (A, "analysis", "python", (Route.DROPPED, None)),
        (A, "commentary", "container.exec", (Route.DROPPED, None)),
        (A, "mystery", None, (Route.DROPPED, None)),
        (A, "final", "json", (Route.CONTENT, None)),
        (A, "commentary", "<|constrain|>json", (Route.CONTENT, None)),
        (A, "final", "all", (Route.CONTENT, None)),
        (A, "analysis", "json", (Route.REASONING, None)),
        (Role.USER, "final", None, (Route.DROPPED, None)),
        (Role.TOOL, "commentary", "assistant", (Route.DROPPED, None)),
        (Role.SYSTEM, None, None, (Route.DROPPED, None)),
        (None, "final", None, (Route.DROPPED, None)),
    ],
)
def test_route_message(role, channel, recipient, expected):
    assert route_message(role, channel, recipient) == expected


def test_tool_call_ids_are_random_and_well_formed():
    ids = {new_tool_call_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(CALL_ID.fullmatch(i) for i in ids)


# --- whole replies --------------------------------------------------------------------------------


def test_analysis_then_final(enc):
    tokens = completion(
        enc, [assistant("Think about it.", "analysis"), assistant("The answer is 42.", "final")]
    )
    result = parse_completion(enc, tokens, "stop")
    assert result.reasoning == "Think about it."
    assert result.content == "The answer is 42."
    assert result.tool_calls == ()
    assert result.finish_reason == "stop"
    # The analysis message is every token before the final message's <|start|>, <|end|> included.
    assert result.reasoning_tokens == tokens.index(enc.ids.start)
    assert result.completion_tokens == len(tokens)
    assert result.dropped_messages == 0


def test_reasoning_tokens_count_every_analysis_message(enc):
    messages = [
        assistant("One.", "analysis"),
        assistant("Two.", "analysis"),
        assistant("x", "final"),
    ]
    tokens = completion(enc, messages)
    result = parse_completion(enc, tokens)
    starts = [i for i, t in enumerate(tokens) if t == enc.ids.start]
    assert result.reasoning == "One.Two."  # concatenated as streamed, no separator
    assert result.reasoning_tokens == starts[1]
    assert result.finish_reason == "stop"


@pytest.mark.parametrize("engine_reason", ["stop", None])
def test_analysis_then_tool_call(enc, engine_reason):
    tokens = completion(enc, [assistant("Need weather.", "analysis")])
    tokens += toks(enc, "<|start|>assistant" + WEATHER_CALL)
    result = parse_completion(enc, tokens, engine_reason)
    assert result.reasoning == "Need weather."
    assert result.content is None
    assert len(result.tool_calls) == 1
    (tool_call,) = result.tool_calls
    assert CALL_ID.fullmatch(tool_call.id)
    assert tool_call.name == "get_weather"
    assert tool_call.arguments == '{"location":"Paris"}'
    assert result.finish_reason == "tool_calls"
    assert result.reasoning_tokens == tokens.index(enc.ids.start)


def test_two_tool_calls(enc):
    tokens = completion(enc, [call("get_weather", '{"location":"Paris"}'), call("get_time", "{}")])
    result = parse_completion(enc, tokens, "stop")
    assert [(c.name, c.arguments) for c in result.tool_calls] == [
        ("get_weather", '{"location":"Paris"}'),
        ("get_time", "{}"),
    ]
    assert result.tool_calls[0].id != result.tool_calls[1].id
    assert result.finish_reason == "tool_calls"
    steps, streamed = stream(enc, tokens, [1] * len(tokens))
    indexes = [d.tool_call.index for step in steps for d in step if d.tool_call]
    assert sorted(set(indexes)) == [0, 1]
    check_stream(steps, streamed)


def test_preamble_then_call(enc):
    tokens = completion(
        enc,
        [
            assistant("Think.", "analysis"),
            assistant("Let me check the weather.", "commentary"),
            call("get_weather", '{"location":"Paris"}'),
        ],
    )
    result = parse_completion(enc, tokens, "stop")
    assert result.reasoning == "Think."
    assert result.content == "Let me check the weather."
    assert [c.name for c in result.tool_calls] == ["get_weather"]
    assert result.finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "header",
    [
        " to=functions.get_weather<|channel|>commentary <|constrain|>json",  # the renderer's form
        "<|channel|>commentary to=functions.get_weather <|constrain|>json",
        "<|channel|>commentary to=functions.get_weather<|constrain|>json",
        "<|channel|>commentary to=functions.get_weather json",
        "<|channel|>commentary to=functions.get_weather",
        " to=functions.get_weather<|channel|>commentary",
    ],
)
def test_recipient_in_role_part_or_after_channel(enc, header):
    tokens = toks(enc, header + '<|message|>{"location":"Paris"}<|call|>')
    result = parse_completion(enc, tokens)
    assert [(c.name, c.arguments) for c in result.tool_calls] == [
        ("get_weather", '{"location":"Paris"}')
    ]
    assert result.finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "header", ["<|channel|>final", "<|channel|>final json", "<|channel|>final <|constrain|>json"]
)
def test_content_types_on_final(enc, header):
    result = parse_completion(enc, toks(enc, header + '<|message|>{"a": 1}<|return|>'))
    assert result.content == '{"a": 1}'
    assert result.finish_reason == "stop"


def test_builtin_tool_call_is_dropped(enc, caplog):
    tokens = completion(enc, [assistant("Search it.", "analysis")])
    tokens += toks(
        enc,
        '<|start|>assistant<|channel|>analysis to=browser.search <|constrain|>json<|message|>{"query":"x"}<|call|>',
    )
    with caplog.at_level(logging.DEBUG, logger="server.harmony_output"):
        result = parse_completion(enc, tokens, "stop")
    assert result.reasoning == "Search it."  # the call's text is not reasoning
    assert result.content is None
    assert result.tool_calls == ()
    assert result.dropped_messages == 1
    assert result.finish_reason == "stop"
    assert "browser.search" in caplog.text
    # Only the analysis message without a recipient counts as reasoning.
    assert result.reasoning_tokens == tokens.index(enc.ids.start)


def test_other_roles_are_dropped(enc):
    tokens = toks(
        enc,
        "<|channel|>final<|message|>Hi<|end|><|start|>user<|message|>more<|end|>"
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>sunny<|end|>",
    )
    result = parse_completion(enc, tokens, "length")
    assert result.content == "Hi"
    assert result.dropped_messages == 2
    assert result.finish_reason == "length"


def test_truncated_final_keeps_partial_content(enc):
    full = completion(enc, [assistant("Hmm.", "analysis"), assistant("The answer is 42.", "final")])
    cut = full[:-3]  # engine stopped on max_tokens inside the final message
    result = parse_completion(enc, cut, "length")
    assert result.reasoning == "Hmm."
    assert result.content
    assert "The answer is 42.".startswith(result.content)
    assert result.content != "The answer is 42."
    assert result.finish_reason == "length"


def test_truncated_analysis_counts_its_tokens(enc):
    tokens = completion(enc, [assistant("A long thought", "analysis")])[:-2]
    result = parse_completion(enc, tokens, "length")
    assert result.reasoning and "A long thought".startswith(result.reasoning)
    assert result.content is None
    assert result.reasoning_tokens == len(tokens)
    assert result.finish_reason == "length"


def test_truncated_tool_call_reports_length(enc):
    tokens = toks(enc, WEATHER_CALL)[:-3]
    result = parse_completion(enc, tokens, "length")
    (tool_call,) = result.tool_calls
    assert '{"location":"Paris"}'.startswith(tool_call.arguments)
    assert result.finish_reason == "length"


def test_cut_character_arrives_in_tail_deltas():
    # The synthetic vocabulary has no merges for é: its two bytes are two tokens.
    tokens = toks(SYN, "<|channel|>final<|message|>café")[:-1]
    steps, result = stream(SYN, tokens, [1] * len(tokens), "length")
    assert result.content == "caf\ufffd"
    assert result.tail_deltas == (ChatDelta(content="\ufffd"),)
    check_stream(steps, result)


def test_headerless_output_is_content_and_logged(enc, caplog):
    tokens = toks(enc, "Hello world<|return|><|return|>")
    with caplog.at_level(logging.DEBUG, logger="server.harmony_output"):
        steps, result = stream(enc, tokens, [1] * len(tokens))
    assert result.content == "Hello world"
    assert result.finish_reason == "stop"
    assert "raw tokens" in caplog.text
    check_stream(steps, result)


@pytest.mark.parametrize(
    "text",
    [
        "<|channel|>commentary to=functions.get_wea",
        "<|channel|>fin",
        "<|channel|>final<|message|>Hi<|end|><|start|>assistant<|channel|>ana",
    ],
)
def test_header_cut_off_by_end_of_output_is_dropped(enc, text):
    tokens = toks(enc, text)
    steps, result = stream(enc, tokens, [1] * len(tokens), "length")
    assert result.content == ("Hi" if "Hi" in text else None)
    assert (result.reasoning, result.tool_calls, result.finish_reason) == (None, (), "length")
    assert result.dropped_messages == 1
    check_stream(steps, result)


def test_stray_stop_token_is_logged(enc, caplog):
    tokens = toks(enc, "<|channel|>final<|message|>Hi<|return|><|return|>")
    with caplog.at_level(logging.DEBUG, logger="server.harmony_output"):
        result = parse_completion(enc, tokens, "stop")
    assert (result.content, result.finish_reason) == ("Hi", "stop")
    assert "raw tokens" in caplog.text


def test_well_formed_output_logs_no_raw_tokens(enc, caplog):
    tokens = completion(enc, [assistant("Hmm.", "analysis"), assistant("Hi.", "final")])
    with caplog.at_level(logging.DEBUG, logger="server.harmony_output"):
        parse_completion(enc, tokens, "stop")
    assert "raw tokens" not in caplog.text


def test_empty_output(enc):
    result = parse_completion(enc, [], "length")
    assert (result.content, result.reasoning, result.tool_calls) == (None, None, ())
    assert result.finish_reason == "length"
    assert result.reasoning_tokens == 0


def test_finish_is_idempotent_and_feed_after_finish_raises(enc):
    mapper = ChatOutputMapper(enc)
    mapper.feed(toks(enc, "<|channel|>final<|message|>Hi<|return|>"))
    result = mapper.finish("stop")
    assert mapper.finish("length") is result
    with pytest.raises(RuntimeError):
        mapper.feed([enc.ids.start])


# --- streaming ------------------------------------------------------------------------------------


def scenarios(enc: HarmonyEncoding) -> list[list[int]]:
    weather = call("get_weather", '{"location": "Paris, café ☕"}')
    return [
        completion(
            enc, [assistant("Think, é 日本.", "analysis"), assistant("Answer 😀.", "final")]
        ),
        completion(enc, [assistant("Think.", "analysis"), weather]),
        completion(enc, [assistant("Preamble.", "commentary"), weather, call("get_time", "{}")]),
        completion(enc, [assistant("a", "analysis"), assistant("b", "analysis"), weather]),
        toks(enc, WEATHER_CALL),
        completion(enc, [assistant("x", "analysis")])
        + toks(
            enc, '<|start|>assistant<|channel|>analysis to=browser.search<|message|>{"q":1}<|call|>'
        )
        + toks(enc, "<|start|>assistant<|channel|>final<|message|>Done.<|return|>"),
    ]


def test_token_by_token_equals_whole(enc):
    for tokens in scenarios(enc):
        whole = parse_completion(enc, tokens, "stop")
        steps, streamed = stream(enc, tokens, [1] * len(tokens), "stop")
        check_stream(steps, streamed)
        assert (streamed.content, streamed.reasoning, streamed.finish_reason) == (
            whole.content,
            whole.reasoning,
            whole.finish_reason,
        )
        assert [(c.name, c.arguments) for c in streamed.tool_calls] == [
            (c.name, c.arguments) for c in whole.tool_calls
        ]
        assert streamed.reasoning_tokens == whole.reasoning_tokens


def test_first_tool_call_delta_names_the_call(enc):
    tokens = completion(enc, [assistant("Think.", "analysis"), call("get_weather", '{"a": 1}')])
    steps, result = stream(enc, tokens, [1] * len(tokens))
    tool_deltas = [d.tool_call for step in steps for d in step if d.tool_call]
    first, *rest = tool_deltas
    assert first == ToolCallDelta(0, result.tool_calls[0].id, "get_weather", "")
    assert rest and all(d.id is None and d.name is None and d.index == 0 for d in rest)
    assert "".join(d.arguments for d in rest) == '{"a": 1}'
    # The call's first delta comes as soon as its header is complete, before any argument.
    message_at = max(i for i, t in enumerate(tokens) if t == enc.ids.message)
    assert steps[message_at] == [ChatDelta(tool_call=first)]


def test_one_feed_merges_text_of_one_kind(enc):
    tokens = completion(
        enc,
        [
            assistant("Think.", "analysis"),
            assistant("More.", "analysis"),
            assistant("Pre.", "commentary"),
            call("f", '{"x": 1}'),
        ],
    )
    mapper = ChatOutputMapper(enc)
    deltas = mapper.feed(tokens)
    result = mapper.finish("stop")
    assert deltas == [
        ChatDelta(reasoning="Think.More."),
        ChatDelta(content="Pre."),
        ChatDelta(tool_call=ToolCallDelta(0, result.tool_calls[0].id, "f", '{"x": 1}')),
    ]
    assert result.tail_deltas == ()


@HYPOTHESIS
@given(data=st.data())
def test_random_chunks_equal_whole(enc, data):
    tokens = data.draw(st.sampled_from(scenarios(enc)))
    chunks = data.draw(st.lists(st.integers(0, 8), max_size=len(tokens)))
    reason = data.draw(st.sampled_from(["stop", "length", None]))
    whole = parse_completion(enc, tokens, reason)
    steps, streamed = stream(enc, tokens, chunks, reason)
    check_stream(steps, streamed)
    assert streamed.content == whole.content
    assert streamed.reasoning == whole.reasoning
    assert [(c.name, c.arguments) for c in streamed.tool_calls] == [
        (c.name, c.arguments) for c in whole.tool_calls
    ]
    assert (streamed.finish_reason, streamed.reasoning_tokens) == (
        whole.finish_reason,
        whole.reasoning_tokens,
    )


# --- garbage --------------------------------------------------------------------------------------


def garbage(enc: HarmonyEncoding) -> st.SearchStrategy[list[int]]:
    controls = [
        enc.token(name)
        for name in (
            "<|start|>",
            "<|end|>",
            "<|message|>",
            "<|channel|>",
            "<|constrain|>",
            "<|return|>",
            "<|call|>",
        )
    ]
    ids = st.one_of(
        st.integers(0, enc.n_vocab - 1),
        st.sampled_from(controls),
        st.sampled_from(controls),
        st.integers(enc.n_vocab, enc.n_vocab + 3),  # out of the vocabulary
        st.sampled_from(enc.encode("assistant analysis final commentary to=functions.f json")),
    )
    return st.lists(ids, max_size=60)


@HYPOTHESIS
@given(data=st.data())
def test_garbage_never_raises(enc, data):
    tokens = data.draw(garbage(enc))
    chunks = data.draw(st.lists(st.integers(0, 8), max_size=len(tokens)))
    reason = data.draw(st.sampled_from(["stop", "length", None]))
    steps, result = stream(enc, tokens, chunks, reason)
    check_stream(steps, result)
    assert result.finish_reason in {"stop", "length", "tool_calls"}
    assert 0 <= result.reasoning_tokens <= len(tokens)
    assert result.completion_tokens == len(tokens)
    whole = parse_completion(enc, tokens, reason)
    assert (whole.content, whole.reasoning, whole.finish_reason) == (
        result.content,
        result.reasoning,
        result.finish_reason,
    )
