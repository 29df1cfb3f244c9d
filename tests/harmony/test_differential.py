"""Differential tests against openai-harmony, the official renderer and parser.

Hypothesis generates conversations over every role, channel, recipient and content type, reasoning
efforts, dates, tool sets with generated JSON Schemas, and multi-turn tool use with CoT. Both
libraries must render them to identical token ids, and parse every render, and random truncations
of it, to identical messages (strict: the same failures too; tolerant: the same messages wherever
openai-harmony's non-strict parser succeeds, and no exception anywhere).
"""

from __future__ import annotations

import os

import openai_harmony as oh
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harmony import HarmonyParseError, Message, Renderer, RenderError, Role, StreamParser
from harmony.parser import parse_messages
from tests.harmony.oracle_bridge import (
    message_key,
    oracle_message_key,
    oracle_role,
    to_oracle_conversation,
)
from tests.harmony.strategies import conversations

# Enough to cover the strategy space; HARMONY_DIFF_EXAMPLES raises it for a longer soak.
N_CONVERSATIONS = int(os.environ.get("HARMONY_DIFF_EXAMPLES", "500"))


@pytest.fixture(scope="module")
def renderer(o200k_encoding):
    return Renderer(o200k_encoding)


def _ours_or_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs), None
    except (RenderError, HarmonyParseError, ValueError) as error:
        return None, error


def _oracle_or_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs), None
    except Exception as error:  # openai-harmony raises its own HarmonyError types
        return None, error


def assert_renders_match(renderer: Renderer, oracle, messages: list[Message], next_role: Role):
    conversation = to_oracle_conversation(messages)
    for drop in (True, False):
        config = oh.RenderConversationConfig(auto_drop_analysis=drop)
        cases = [
            (
                renderer.render_conversation,
                (messages,),
                oracle.render_conversation,
                (conversation, config),
            ),
            (
                renderer.render_for_completion,
                (messages, next_role),
                oracle.render_conversation_for_completion,
                (conversation, oracle_role(next_role), config),
            ),
            (
                renderer.render_for_training,
                (messages,),
                oracle.render_conversation_for_training,
                (conversation, config),
            ),
        ]
        for ours_fn, ours_args, oracle_fn, oracle_args in cases:
            ours, our_error = _ours_or_error(ours_fn, *ours_args, auto_drop_analysis=drop)
            theirs, their_error = _oracle_or_error(oracle_fn, *oracle_args)
            assert (our_error is None) == (their_error is None), (ours_fn, our_error, their_error)
            assert ours == theirs, (ours_fn.__name__, drop)


def assert_parses_match(encoding, oracle, tokens: list[int], role: Role | None) -> None:
    for strict in (True, False):
        ours, our_error = _ours_or_error(parse_messages, encoding, tokens, role, strict=strict)
        theirs, their_error = _oracle_or_error(
            oracle.parse_messages_from_completion_tokens, tokens, oracle_role(role), strict=strict
        )
        if strict:
            assert (our_error is None) == (their_error is None), (tokens, our_error, their_error)
        else:
            assert our_error is None, f"tolerant parser raised {our_error!r}"
        if their_error is None:
            assert [message_key(m) for m in ours] == [oracle_message_key(m) for m in theirs]


def assert_stream_matches(encoding, oracle, tokens: list[int], role: Role | None) -> None:
    """Per token: the content delta and the current header fields, as a server streams them."""
    ours = StreamParser(encoding, role)
    theirs = oh.StreamableParser(oracle, oracle_role(role), strict=False)
    for token in tokens:
        try:
            theirs.process(token)
        except Exception:
            return  # openai-harmony gives up here; the tolerant parser goes on (tested elsewhere)
        delta = ours.process(token)
        assert delta == theirs.last_content_delta
        assert ours.current_channel == theirs.current_channel
        assert ours.current_recipient == theirs.current_recipient
        assert ours.current_content_type == theirs.current_content_type
        their_role = theirs.current_role
        assert ours.current_role == (None if their_role is None else Role(their_role.value))
        assert ours.current_content == theirs.current_content
        assert (
            ours.state.name.replace("_", "").lower() == theirs.state.name.replace("_", "").lower()
        )


@settings(
    max_examples=N_CONVERSATIONS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(messages=conversations(), data=st.data())
def test_render_and_parse_match_openai_harmony(
    renderer: Renderer, oracle, messages: list[Message], data: st.DataObject
) -> None:
    encoding = renderer.encoding
    next_role = data.draw(st.sampled_from([Role.ASSISTANT, Role.USER, Role.ASSISTANT]))
    assert_renders_match(renderer, oracle, messages, next_role)

    tokens = renderer.render_conversation(messages)
    assert_parses_match(encoding, oracle, tokens, None)
    assert_stream_matches(encoding, oracle, tokens, None)
    for cut in data.draw(st.lists(st.integers(0, len(tokens)), max_size=3)):
        assert_parses_match(encoding, oracle, tokens[:cut], None)

    # As a completion: the prompt ended with `<|start|>assistant`, the model wrote the rest.
    first = next((i for i, m in enumerate(messages) if m.author.role is Role.ASSISTANT), None)
    if first is not None:
        reply = renderer.render_conversation(messages[first:], auto_drop_analysis=False)
        prefix = [encoding.ids.start, *encoding.encode("assistant")]
        if reply[: len(prefix)] == prefix:
            completion = reply[len(prefix) :]
            assert_parses_match(encoding, oracle, completion, Role.ASSISTANT)
            assert_stream_matches(encoding, oracle, completion, Role.ASSISTANT)
