"""Token-by-token harmony parser: model output -> messages with role, channel, recipient and content.

An explicit state machine with three states:

    EXPECT_START --<|start|>--> HEADER --<|message|>--> CONTENT --stop token--> EXPECT_START

`<|return|>`, `<|call|>` and `<|end|>` are the stop tokens. Header text is parsed as openai-harmony
parses it: `<|channel|>NAME` anywhere, the recipient (`to=...`) in the role part or after the channel,
the content type last, `<|constrain|>` spaced or adjacent. Content is decoded incrementally: a
character split across tokens is emitted once, when complete, and invalid bytes become U+FFFD exactly
where openai-harmony puts them. The per-token content path is a few list and dict lookups.

Strict mode raises HarmonyParseError wherever openai-harmony's strict parser fails. Tolerant mode (the
default) gives the same messages wherever openai-harmony's non-strict parser succeeds, and where it
would fail it recovers instead: stray text outside a message opens an implicit message, an unparsable
header keeps what it can, a header cut off by a stop token or the end of output keeps its text as
content. A model that emits garbage never makes the tolerant parser raise.
"""

from __future__ import annotations

import enum
import logging

from harmony.messages import Author, Message, Role, TextContent
from harmony.tokens import HarmonyEncoding

logger = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"
CHANNEL_MARKER = "<|channel|>"
CONSTRAIN_MARKER = "<|constrain|>"
# Rust's `char::is_whitespace` (Unicode White_Space), which openai-harmony uses to end a channel name
# and to trim headers; Python's str.isspace() also counts U+001C..U+001F, so it cannot be used.
_UNICODE_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)
_UNICODE_WHITESPACE_SET = frozenset(_UNICODE_WHITESPACE)
_ROLES = {role.value: role for role in Role}


class HarmonyParseError(ValueError):
    """Model output that is not well-formed harmony (raised in strict mode only)."""


class StreamState(enum.IntEnum):
    EXPECT_START = 0
    HEADER = 1
    CONTENT = 2


class _Header:
    __slots__ = ("author", "channel", "content_type", "recipient")

    def __init__(
        self, author: Author, recipient: str | None, channel: str | None, content_type: str | None
    ) -> None:
        self.author = author
        self.recipient = recipient
        self.channel = channel
        self.content_type = content_type


_EXPECT_START = StreamState.EXPECT_START
_HEADER = StreamState.HEADER
_CONTENT = StreamState.CONTENT


class StreamParser:
    """Parses one completion (or a whole rendered conversation) token by token.

    `role` is the role of the first message when the prompt already ended with `<|start|>{role}`
    (the usual case for a completion: `Role.ASSISTANT`); None when the tokens start with `<|start|>`.
    """

    def __init__(
        self, encoding: HarmonyEncoding, role: Role | None = None, *, strict: bool = False
    ) -> None:
        self.encoding = encoding
        self.strict = strict
        ids = encoding.ids
        self._start = ids.start
        self._message = ids.message
        self._stop = encoding.stop_token_ids
        self._text = encoding.token_text_table()
        self._bytes = encoding.token_bytes_table()
        self._n_vocab = len(self._text)
        # Where tolerant recovery opens an implicit message, it gives it this role.
        self._fallback_role = role or Role.ASSISTANT
        self.tokens: list[int] = []
        self.messages: list[Message] = []
        self.state = _HEADER if role is not None else _EXPECT_START
        self._next_role: Role | None = role
        self._header_tokens: list[int] = []
        self._header: _Header | None = None
        self._content: list[str] = []
        self._undecoded_tokens: list[int] = []
        self._undecoded_bytes = bytearray()
        self.last_content_delta: str | None = None

    # --- feeding ------------------------------------------------------------------------------
    def process(self, token: int) -> str | None:
        """Consume one token; return the content text it completed (also `last_content_delta`)."""
        self.tokens.append(token)
        if self.state is _CONTENT:
            if token in self._stop:
                self._close_message()
                return None
            if (
                not self._undecoded_bytes
                and not self._undecoded_tokens
                and 0 <= token < self._n_vocab
            ):
                text = self._text[token]
                if text is not None:
                    self._content.append(text)
                    self.last_content_delta = text
                    return text
            return self._process_content_slow(token)
        self.last_content_delta = None
        if self.state is _HEADER:
            self._process_header(token)
        elif token == self._start:
            self.state = _HEADER
            self._header_tokens = []
        else:
            self._stray_token(token)
        return None

    def process_many(self, tokens: list[int]) -> None:
        for token in tokens:
            self.process(token)

    def process_eos(self) -> None:
        """End of output: close the message being written, if any."""
        self.last_content_delta = None
        if self.state is _CONTENT:
            self._close_message()
        elif self.state is _HEADER:
            if self.strict:
                raise HarmonyParseError(
                    "unexpected end of output while the message header is incomplete"
                )
            self._recover_headerless(self._next_role)

    # --- streaming view -----------------------------------------------------------------------
    @property
    def current_role(self) -> Role | None:
        if self._header is not None:
            return self._header.author.role
        return self._next_role

    @property
    def current_channel(self) -> str | None:
        return self._header.channel if self._header is not None else None

    @property
    def current_recipient(self) -> str | None:
        return self._header.recipient if self._header is not None else None

    @property
    def current_content_type(self) -> str | None:
        return self._header.content_type if self._header is not None else None

    @property
    def current_content(self) -> str:
        return "".join(self._content) if self._header is not None else ""

    # --- content --------------------------------------------------------------------------------
    def _process_content_slow(self, token: int) -> str | None:
        """openai-harmony's incremental UTF-8 decoding, for tokens that are not whole characters."""
        self._undecoded_tokens.append(token)
        chunks = []
        for t in self._undecoded_tokens:
            token_bytes = self._bytes[t] if 0 <= t < self._n_vocab else None
            if token_bytes is None:
                # An id outside the vocabulary: wait (openai-harmony keeps it pending until the end).
                self.last_content_delta = None
                return None
            chunks.append(token_bytes)
        self._undecoded_tokens.clear()
        pending = self._undecoded_bytes
        pending += b"".join(chunks)
        try:
            delta = pending.decode("utf-8")
        except UnicodeDecodeError as error:
            delta = pending[: error.start].decode("utf-8")
            del pending[: error.start]
            if error.reason != "unexpected end of data":
                # An invalid sequence: one replacement character for it; the bytes after it wait.
                delta += REPLACEMENT
                del pending[: error.end - error.start]
        else:
            pending.clear()
        if not delta:
            self.last_content_delta = None
            return None
        self._content.append(delta)
        self.last_content_delta = delta
        return delta

    def _close_message(self) -> None:
        header = self._header
        assert header is not None
        text = "".join(self._content)
        if self._undecoded_tokens:
            text += REPLACEMENT
        if self._undecoded_bytes:
            text += self._undecoded_bytes.decode("utf-8", errors="replace")
        self._push(header, text)
        self.state = _EXPECT_START
        self._header = None
        self._content = []
        self._undecoded_tokens.clear()
        self._undecoded_bytes.clear()
        self.last_content_delta = None

    def _push(self, header: _Header, text: str) -> None:
        self.messages.append(
            Message(
                author=header.author,
                content=(TextContent(text),),
                channel=header.channel,
                recipient=header.recipient,
                content_type=header.content_type,
            )
        )

    # --- header ---------------------------------------------------------------------------------
    def _process_header(self, token: int) -> None:
        if token == self._message:
            header = self._parse_header(self._header_tokens, self._next_role)
            self._next_role = None
            self._header = header
            self._content = []
            self.state = _CONTENT
        elif not self.strict and token in self._stop:
            # A stop token before <|message|>: openai-harmony keeps a headerless first message.
            if self._next_role is not None:
                self._recover_headerless(self._next_role)
            self.state = _EXPECT_START
            self._next_role = None
        else:
            self._header_tokens.append(token)

    def _recover_headerless(self, role: Role | None) -> None:
        """Keep a message whose header never reached `<|message|>`: its leftover text is content."""
        if self._header_tokens:
            text = self._decode_header(self._header_tokens)
            header, rest = self._parse_header_text(text, role, parse_recipient_and_type=False)
            self._push(header, rest or "")
        self._header_tokens = []
        self.state = _EXPECT_START
        self._next_role = None

    def _stray_token(self, token: int) -> None:
        """A token outside any message, where only <|start|> may come."""
        if self.strict:
            raise HarmonyParseError(
                f"unexpected token {token} while expecting the start token {self._start}"
            )
        if token in self._stop:
            return  # e.g. a doubled <|end|>: nothing to recover
        logger.debug("harmony: token %d outside a message opens an implicit message", token)
        self.state = _HEADER
        self._next_role = self._fallback_role
        self._header_tokens = [token]

    def _decode_header(self, tokens: list[int]) -> str:
        try:
            return self.encoding.decode_bytes(tokens).decode("utf-8")
        except (KeyError, UnicodeDecodeError) as error:
            if self.strict:
                raise HarmonyParseError(f"could not decode the message header: {error}") from error
            chunks = [self._bytes[t] for t in tokens if 0 <= t < self._n_vocab]
            return b"".join(c for c in chunks if c is not None).decode("utf-8", errors="replace")

    def _parse_header(self, tokens: list[int], role: Role | None) -> _Header:
        text = self._decode_header(tokens)
        header, rest = self._parse_header_text(text, role, parse_recipient_and_type=True)
        if rest is not None:
            if self.strict:
                raise HarmonyParseError(f"unexpected text remaining in message header: {rest!r}")
            logger.debug("harmony: ignoring extra header text %r", rest)
        return header

    def _parse_header_text(
        self, text: str, role: Role | None, *, parse_recipient_and_type: bool
    ) -> tuple[_Header, str | None]:
        channel = None
        marker = text.find(CHANNEL_MARKER)
        if marker >= 0:
            after = text[marker + len(CHANNEL_MARKER) :]
            end = next(
                (i for i, c in enumerate(after) if c in _UNICODE_WHITESPACE_SET or c == "<"),
                len(after),
            )
            if end == 0 and self.strict:
                raise HarmonyParseError("channel marker present but no channel value in header")
            if end > 0 or not self.strict:
                channel = after[:end] or None
                text = text[:marker] + after[end:]
        text = text.strip(_UNICODE_WHITESPACE)
        if CONSTRAIN_MARKER in text:
            text = text.replace(CONSTRAIN_MARKER, " " + CONSTRAIN_MARKER).strip(_UNICODE_WHITESPACE)
        parts = _split_ascii_whitespace(text)

        role_name = None
        if role is None:
            if not parts:
                if self.strict:
                    raise HarmonyParseError("message header did not contain a role")
                parts = [self._fallback_role.value]
            role_name = parts[0]
            role = _ROLES.get(role_name)
            if role is None:
                if len(parts) > 1 or parts[0].startswith("to="):
                    parts.pop(0)  # an unknown role before a recipient: a tool's name
                    role = Role.TOOL
                elif self.strict:
                    raise HarmonyParseError(f"unknown role {role_name!r} in message header")
                else:
                    parts.pop(0)
                    role = Role.TOOL
        if parts and parts[0] == role.value:
            parts.pop(0)

        recipient = content_type = None
        if parse_recipient_and_type and parts:
            n_parts = len(parts)
            last = parts.pop()
            if last.startswith("to="):
                recipient = last[3:]
            elif n_parts == 1:
                recipient = last
            else:
                content_type = last
                if parts:
                    raw = parts.pop()
                    recipient = raw[3:] if raw.startswith("to=") else raw
        rest = " ".join(parts) if parts else None
        author = Author(role, role_name if role is Role.TOOL else None)
        return _Header(author, recipient, channel, content_type), rest


def _split_ascii_whitespace(text: str) -> list[str]:
    """Rust's `split_ascii_whitespace`: space, tab, LF, FF and CR separate; nothing else does."""
    for c in "\t\n\x0c\r":
        if c in text:
            text = text.replace(c, " ")
    return [part for part in text.split(" ") if part]


def parse_messages(
    encoding: HarmonyEncoding,
    tokens: list[int],
    role: Role | None = None,
    *,
    strict: bool = False,
) -> list[Message]:
    """Parse a whole token sequence (then end of output) into messages."""
    parser = StreamParser(encoding, role, strict=strict)
    for token in tokens:
        parser.process(token)
    parser.process_eos()
    return parser.messages
