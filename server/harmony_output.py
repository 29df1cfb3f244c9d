"""Model output (harmony tokens) -> OpenAI chat-completions fields, while streaming and at the end.

The server feeds a `ChatOutputMapper` the token ids the engine generates after a prompt that ended
with `<|start|>assistant`; each `feed()` returns the deltas for one SSE step and `finish()` gives the
whole reply. `parse_completion` is the same for the non-streaming path, so the two agree by
construction: the result is built from exactly the text the deltas carried.

Where each message goes (`route_message`, decided once per message, when its header is complete):
- a message from any role but the assistant (the model imagining a user or a tool reply): dropped;
- a recipient `functions.NAME` on any channel: a tool call named NAME, the message text its arguments
  (the model is meant to use commentary; a call it writes on another channel is still a call);
- any other recipient (`browser.search`, `python`, ...): dropped (built-in tools the API cannot run);
- no recipient: `analysis` is reasoning; `final`, `commentary` (a preamble) and no channel at all are
  content; any other channel is dropped.
Dropped messages are counted and logged at debug level, never shown. A header with one word after
the channel and no `to=` (`<|channel|>final json`) reads, as in openai-harmony, as a recipient
`json`; a "recipient" that is a content type (`json`, `<|constrain|>...`) is treated as none.

Texts of one kind are concatenated as generated, without separators (two analysis messages give one
reasoning string), because that is what a streaming client sees. Consecutive text of one kind within
one `feed()` is merged into one delta; a tool call's first delta carries its index, id and name (sent
as soon as the header is complete, so clients see the call early), later ones index and arguments.

`finish_reason`: 'tool_calls' if a tool call was made, unless the output was cut off (engine
'length') inside a call; otherwise 'stop' if the output ended with `<|return|>` or `<|call|>` or the
engine said 'stop'; otherwise 'length' if the engine said 'length'; otherwise the engine's reason
(or 'stop' when it gave none).

`reasoning_tokens` counts every output token of the assistant's analysis messages without a
recipient, from the first token of its header (the `<|start|>`; for the first message, the first
output token, its `<|start|>assistant` being in the prompt) through the token that ends it (its stop
token, or the last token when the output was cut off). Tokens outside any message are not counted.

Garbage never raises: the tolerant parser keeps what is complete, and the raw tokens of malformed
output are logged at debug level. Text written where a header should be and ended by a stop token
(`Hello<|return|>`: the model skipped the header) is a message, routed as the parser reads it; a
header cut off by the end of output is dropped (counted), as its text is header, not answer. Text
that only the end of output completes (a character cut in half becomes U+FFFD) comes in
`ChatResult.tail_deltas`, which a streaming caller sends before its finish chunk.
"""

from __future__ import annotations

import enum
import logging
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass

from harmony.messages import Role, TextContent
from harmony.parser import StreamParser, StreamState
from harmony.tokens import HarmonyEncoding

logger = logging.getLogger(__name__)

TOOL_CALL_ID_PREFIX = "call_"
TOOL_CALL_ID_LENGTH = 24
_ID_ALPHABET = string.ascii_letters + string.digits
FUNCTIONS_PREFIX = "functions."
CONSTRAIN_MARKER = "<|constrain|>"
# Content types that the header parser reports as a recipient when they are the only word.
_CONTENT_TYPE_WORDS = frozenset({"json"})

_EXPECT_START = StreamState.EXPECT_START
_HEADER = StreamState.HEADER
_CONTENT = StreamState.CONTENT

# Where the text of the message being read goes; a tool call uses its index (>= 0) instead.
_TO_CONTENT = -1
_TO_REASONING = -2
_DROPPED = -3


class Route(enum.Enum):
    CONTENT = "content"
    REASONING = "reasoning"
    TOOL_CALL = "tool_call"
    DROPPED = "dropped"


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """One streamed piece of a tool call: id and name on its first piece only (OpenAI's shape)."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatDelta:
    """One step's worth of output; exactly one field is set."""

    content: str | None = None
    reasoning: str | None = None
    tool_call: ToolCallDelta | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatResult:
    content: str | None  # None when the reply has no content text
    reasoning: str | None
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str
    reasoning_tokens: int  # usage.completion_tokens_details.reasoning_tokens
    completion_tokens: int  # every token fed
    dropped_messages: int  # messages the API does not show (built-in tool calls, other roles)
    # Deltas that only the end of output completed; the streaming path sends them last.
    tail_deltas: tuple[ChatDelta, ...] = ()


def new_tool_call_id() -> str:
    """`call_` and 24 random letters and digits, as OpenAI's ids look."""
    return TOOL_CALL_ID_PREFIX + "".join(
        secrets.choice(_ID_ALPHABET) for _ in range(TOOL_CALL_ID_LENGTH)
    )


def route_message(
    role: Role | None, channel: str | None, recipient: str | None
) -> tuple[Route, str | None]:
    """Where a message of the model's output goes in the API, and the tool name for a tool call."""
    if role is not Role.ASSISTANT:
        return Route.DROPPED, None
    if recipient is not None and (
        recipient == "all"
        or recipient in _CONTENT_TYPE_WORDS
        or recipient.startswith(CONSTRAIN_MARKER)
    ):
        recipient = None
    if recipient is not None:
        if recipient.startswith(FUNCTIONS_PREFIX) and len(recipient) > len(FUNCTIONS_PREFIX):
            return Route.TOOL_CALL, recipient[len(FUNCTIONS_PREFIX) :]
        return Route.DROPPED, None
    if channel == "analysis":
        return Route.REASONING, None
    if channel in (None, "final", "commentary"):
        return Route.CONTENT, None
    return Route.DROPPED, None


class _CallParts:
    __slots__ = ("arguments", "id", "name")

    def __init__(self, call_id: str, name: str) -> None:
        self.id = call_id
        self.name = name
        self.arguments: list[str] = []


class ChatOutputMapper:
    """Maps one completion's tokens to chat deltas step by step, then to the whole result."""

    def __init__(self, encoding: HarmonyEncoding) -> None:
        self._parser = StreamParser(encoding, Role.ASSISTANT)
        self._start = encoding.ids.start
        self._stop_ids = encoding.assistant_stop_token_ids
        # The message being read: where its text goes, where it started, how much text it gave.
        self._kind = _DROPPED
        self._sink: list[str] | None = None  # the pending pieces its text goes to; None if dropped
        self._msg_start = 0
        self._msg_chars = 0
        self._n_routed = 0  # parser messages already routed
        # Text not yet made into a delta: all of one kind (and for a call, of one index).
        self._pending_kind = _DROPPED
        self._pending: list[str] = []
        self._pending_head: tuple[str, str] | None = None  # a new call's (id, name), not yet sent
        # What the deltas carried so far, for the result.
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._calls: list[_CallParts] = []
        self._reasoning_tokens = 0
        self._dropped = 0
        self._malformed = False
        self._result: ChatResult | None = None

    def feed(self, token_ids: Sequence[int]) -> list[ChatDelta]:
        """Consume the next generated tokens; return the deltas they completed, merged by kind."""
        if self._result is not None:
            raise RuntimeError("feed() after finish()")
        out: list[ChatDelta] = []
        self._consume(token_ids, out)
        self._flush(out)
        return out

    def _consume(self, token_ids: Sequence[int], out: list[ChatDelta]) -> None:
        parser = self._parser
        process = parser.process
        # The per-token path: the parser call, then an append for text or two state comparisons.
        for token in token_ids:
            before = parser.state
            text = process(token)
            if text is not None:
                sink = self._sink
                if sink is not None:
                    sink.append(text)
                self._msg_chars += len(text)
            elif parser.state is not before:
                self._transition(before, out)
            elif before is _EXPECT_START:
                self._malformed = True  # a stray stop token outside any message

    def finish(self, engine_finish_reason: str | None = None) -> ChatResult:
        """End of output: close what is open and return the whole reply (idempotent)."""
        if self._result is not None:
            return self._result
        parser = self._parser
        out: list[ChatDelta] = []
        before = parser.state
        parser.process_eos()
        cut_call = before is _CONTENT and self._kind >= 0
        if before is _CONTENT:
            self._close(out)
        elif before is _HEADER and len(parser.messages) > self._n_routed:
            # The output was cut inside a header: its text is a header, not an answer, even where
            # the parser keeps it as content (`<|channel|>commentary to=functions.get_wea`).
            self._n_routed = len(parser.messages)
            self._dropped += 1
            logger.debug("harmony: dropping a message header cut off by the end of output")
        self._flush(out)
        if self._malformed:
            logger.debug("harmony: malformed output; raw tokens %s", parser.tokens)
        tool_calls = tuple(ToolCall(c.id, c.name, "".join(c.arguments)) for c in self._calls)
        self._result = ChatResult(
            content="".join(self._content) or None,
            reasoning="".join(self._reasoning) or None,
            tool_calls=tool_calls,
            finish_reason=self._finish_reason(engine_finish_reason, cut_call),
            reasoning_tokens=self._reasoning_tokens,
            completion_tokens=len(parser.tokens),
            dropped_messages=self._dropped,
            tail_deltas=tuple(out),
        )
        return self._result

    # --- messages -------------------------------------------------------------------------------
    def _transition(self, before: StreamState, out: list[ChatDelta]) -> None:
        parser = self._parser
        state = parser.state
        if state is _CONTENT:  # the header is complete
            self._open(parser.current_role, parser.current_channel, parser.current_recipient, out)
        elif before is _CONTENT:  # a stop token closed the message
            self._close(out)
        elif state is _HEADER:  # a message starts
            self._msg_start = len(parser.tokens) - 1
            if parser.tokens[-1] != self._start:
                self._malformed = True  # text outside a message opened an implicit one
        else:  # a stop token before <|message|>
            self._malformed = True
            self._route_recovered(out)

    def _open(
        self, role: Role | None, channel: str | None, recipient: str | None, out: list[ChatDelta]
    ) -> None:
        route, name = route_message(role, channel, recipient)
        self._msg_chars = 0
        if route is Route.DROPPED:
            self._dropped += 1
            logger.debug(
                "harmony: dropping a %s message to %r on channel %r from the API output",
                role,
                recipient,
                channel,
            )
            self._kind = _DROPPED
            self._sink = None
            return
        if route is Route.TOOL_CALL:
            assert name is not None
            kind = len(self._calls)
            call = _CallParts(new_tool_call_id(), name)
            self._calls.append(call)
            self._flush(out)
            self._pending_kind = kind
            self._pending_head = (call.id, call.name)
        else:
            kind = _TO_CONTENT if route is Route.CONTENT else _TO_REASONING
            if kind != self._pending_kind:
                self._flush(out)
                self._pending_kind = kind
        self._kind = kind
        self._sink = self._pending

    def _close(self, out: list[ChatDelta]) -> None:
        """The parser closed the message being read: route what its text has beyond the deltas."""
        parser = self._parser
        self._n_routed = len(parser.messages)
        item = parser.messages[-1].content[0]
        assert isinstance(item, TextContent)
        text = item.text
        if len(text) > self._msg_chars and self._sink is not None:
            # Pending bytes or an unknown id at the stop token: U+FFFD the deltas did not carry.
            self._sink.append(text[self._msg_chars :])
        if self._kind == _TO_REASONING:
            self._reasoning_tokens += len(parser.tokens) - self._msg_start
        self._kind = _DROPPED
        self._sink = None

    def _route_recovered(self, out: list[ChatDelta]) -> None:
        """A stop token before `<|message|>`: the parser may keep the header's text as a message."""
        parser = self._parser
        if len(parser.messages) > self._n_routed:
            message = parser.messages[-1]
            self._open(message.author.role, message.channel, message.recipient, out)
            self._close(out)

    def _flush(self, out: list[ChatDelta]) -> None:
        """Make the pending text one delta (pieces is cleared in place: the sink stays valid)."""
        pieces = self._pending
        head = self._pending_head
        if not pieces and head is None:
            return
        text = "".join(pieces)
        pieces.clear()
        kind = self._pending_kind
        if kind >= 0:
            if not text and head is None:
                return
            self._calls[kind].arguments.append(text)
            call_id, name = head if head is not None else (None, None)
            out.append(ChatDelta(tool_call=ToolCallDelta(kind, call_id, name, text)))
            self._pending_head = None
        elif not text:
            return
        elif kind == _TO_CONTENT:
            self._content.append(text)
            out.append(ChatDelta(content=text))
        else:
            self._reasoning.append(text)
            out.append(ChatDelta(reasoning=text))

    def _finish_reason(self, engine_finish_reason: str | None, cut_call: bool) -> str:
        tokens = self._parser.tokens
        ended_on_stop = bool(tokens) and tokens[-1] in self._stop_ids
        if self._calls and not (cut_call and engine_finish_reason == "length"):
            return "tool_calls"
        if ended_on_stop or engine_finish_reason == "stop":
            return "stop"
        return engine_finish_reason or "stop"


def parse_completion(
    encoding: HarmonyEncoding, token_ids: Sequence[int], finish_reason: str | None = None
) -> ChatResult:
    """The whole reply of a finished completion (the non-streaming path)."""
    mapper = ChatOutputMapper(encoding)
    mapper.feed(token_ids)
    return mapper.finish(finish_reason)
