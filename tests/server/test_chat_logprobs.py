"""Chat logprobs of coalesced outputs: one entry per content token, never for header tokens.

The async engine hands a consumer that fell behind several steps' tokens as one output
(`RequestOutput.followed_by`), so one output can hold a header's last token and the first content
tokens. The chat route must give logprob entries to exactly the content tokens, whatever the
outputs' boundaries, streaming or not.
"""

from __future__ import annotations

from types import SimpleNamespace

from engine.engine import RequestOutput
from engine.runner import TokenLogprobs
from server.harmony_output import ChatOutputMapper
from server.routes.chat_completions import Choice, _feed
from server.stop_strings import StopStringMatcher


def _output(tokens: list[int]) -> RequestOutput:
    logprobs = tuple(TokenLogprobs(-0.5 - i, ()) for i in range(len(tokens)))
    return RequestOutput("r", tuple(tokens), logprobs, 3, 0, len(tokens))


def _entries_by_split(encoding, tokens: list[int], split: list[int]) -> tuple[list[str], str]:
    svc = SimpleNamespace(encoding=encoding)
    choice = Choice(0, ChatOutputMapper(encoding), StopStringMatcher(()))
    entries: list[dict] = []
    start = 0
    for end in [*split, len(tokens)]:
        _, new = _feed(svc, choice, _output(tokens[start:end]), logprobs=True)
        entries += new
        start = end
    return [e["token"] for e in entries], "".join(choice.content)


def test_coalesced_output_gets_entries_for_content_tokens_only(o200k_encoding) -> None:
    enc = o200k_encoding
    header = enc.encode_with_special_tokens("<|channel|>final<|message|>")
    content = enc.encode("Hello there, world")
    tokens = header + content
    one_by_one = _entries_by_split(enc, tokens, list(range(1, len(tokens))))
    # The header's last token and the first content tokens in one output; then the rest at once.
    coalesced = _entries_by_split(enc, tokens, [len(header) - 1, len(header) + 2])
    whole = _entries_by_split(enc, tokens, [])
    assert one_by_one[1] == "Hello there, world"
    assert len(one_by_one[0]) == len(content)
    assert coalesced == one_by_one
    assert whole == one_by_one
    assert "".join(one_by_one[0]) == one_by_one[1]


def test_no_logprobs_asked_no_entries(o200k_encoding) -> None:
    enc = o200k_encoding
    svc = SimpleNamespace(encoding=enc)
    choice = Choice(0, ChatOutputMapper(enc), StopStringMatcher(()))
    tokens = enc.encode_with_special_tokens("<|channel|>final<|message|>Hi")
    deltas, entries = _feed(svc, choice, _output(tokens), logprobs=False)
    assert entries == []
    assert [d.content for d in deltas if d.content] == ["Hi"]
