"""harmony/grammar.py: the reply grammars put each constraint where harmony puts that part.

Each grammar is compiled by llguidance over the synthetic vocabulary (special tokens at unusual
ids) and driven token by token: what it accepts and rejects, and the exact mask where the analysis
runs free. One test repeats the header check on the official o200k vocabulary (skipped without it).
"""

from __future__ import annotations

import pytest
from llguidance import LLMatcher, LLTokenizer

from harmony import HarmonyEncoding, Role, parse_messages
from harmony.grammar import (
    FunctionConstraint,
    ReplyConstraint,
    ReplyGrammars,
    SchemaError,
    check_json_schema,
)
from tests.harmony.synthetic_vocab import synthetic_encoding

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
CALL_HEADER = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
ANALYSIS = "<|channel|>analysis<|message|>Let me think.<|end|><|start|>assistant"


def tokenizer_for(enc: HarmonyEncoding) -> LLTokenizer:
    return LLTokenizer.from_tiktoken(  # type: ignore[attr-defined]
        encoder=dict(enc.mergeable_ranks),
        special_tokens=dict(enc.special_tokens),
        pattern=enc.pattern,
        eos_token=enc.ids.return_,
        n_vocab=enc.n_vocab,
    )


@pytest.fixture(scope="module")
def enc() -> HarmonyEncoding:
    return synthetic_encoding()


@pytest.fixture(scope="module")
def tokenizer(enc: HarmonyEncoding) -> LLTokenizer:
    return tokenizer_for(enc)


def matcher(enc: HarmonyEncoding, tokenizer: LLTokenizer, constraint: ReplyConstraint):
    m = LLMatcher(tokenizer, ReplyGrammars(enc).build(constraint), log_level=0)
    assert not m.is_error(), m.get_error()
    return m


def feed(enc: HarmonyEncoding, m: LLMatcher, text: str) -> bool:
    """Consume `text` (control tokens by name); whether every token was accepted."""
    return all(m.consume_token(t) for t in enc.encode_with_special_tokens(text))


def allowed(m: LLMatcher, n_vocab: int) -> set[int]:
    mask = m.compute_bitmask()
    return {i for i in range(n_vocab) if mask[i // 8] >> (i % 8) & 1}


def accepts(enc, tokenizer, constraint: ReplyConstraint, text: str) -> bool:
    """Whether the whole of `text` is a complete reply under `constraint`."""
    m = matcher(enc, tokenizer, constraint)
    return feed(enc, m, text) and m.is_stopped()


REQUIRED = ReplyConstraint(
    functions=(FunctionConstraint("get_weather", WEATHER), FunctionConstraint("add")),
    require_call=True,
)


def test_a_required_call_after_any_analysis_parses_as_that_call(enc, tokenizer) -> None:
    arguments = '{"city":"Paris","unit":"celsius"}'
    for analysis in ("", ANALYSIS, ANALYSIS + ANALYSIS):
        reply = analysis + CALL_HEADER + arguments + "<|call|>"
        assert accepts(enc, tokenizer, REQUIRED, reply)
        *_, call = parse_messages(
            enc, enc.encode_with_special_tokens(reply), Role.ASSISTANT, strict=True
        )
        assert (call.recipient, call.channel) == ("functions.get_weather", "commentary")
        assert call.content_type == "<|constrain|>json"
    # The other declared function, with any JSON object (it is not strict).
    other = "<|channel|>commentary to=functions.add <|constrain|>json<|message|>{}<|call|>"
    assert accepts(enc, tokenizer, REQUIRED, other)


@pytest.mark.parametrize(
    "reply",
    [
        "<|channel|>final<|message|>It is sunny.<|return|>",  # an answer instead of a call
        "<|channel|>commentary<|message|>Let me check.<|end|>",  # a preamble
        "<|channel|>commentary to=functions.send_email <|constrain|>json<|message|>{}<|call|>",
        CALL_HEADER + '{"city":"Paris"}<|call|>',  # a required property missing
        CALL_HEADER + '{"city":"Paris","unit":"kelvin"}<|call|>',  # not in the enum
        CALL_HEADER + '{"city":"Paris","unit":"celsius","x":1}<|call|>',  # no extra properties
        CALL_HEADER + '{"city": "Paris","unit":"celsius"}<|call|>',  # JSON is compact
        CALL_HEADER + '{"city":"Paris","unit":"celsius"}<|return|>',  # a call ends with <|call|>
    ],
)
def test_a_required_call_refuses_anything_else(enc, tokenizer, reply: str) -> None:
    assert not accepts(enc, tokenizer, REQUIRED, reply)


def test_the_analysis_runs_free_its_mask_is_every_ordinary_token_and_end(enc, tokenizer) -> None:
    m = matcher(enc, tokenizer, REQUIRED)
    assert allowed(m, enc.n_vocab) == {enc.ids.channel}  # the reply's first token
    assert feed(enc, m, "<|channel|>analysis<|message|>")
    ordinary = set(enc.mergeable_ranks.values())
    assert allowed(m, enc.n_vocab) == ordinary | {enc.ids.end}
    # Bytes that are not UTF-8 on their own are ordinary tokens too: still free.
    assert feed(enc, m, "I think")
    assert m.consume_token(enc.mergeable_ranks[b"\xff"])
    assert allowed(m, enc.n_vocab) == ordinary | {enc.ids.end}


def test_a_named_function_is_the_only_call(enc, tokenizer) -> None:
    named = ReplyConstraint(functions=(FunctionConstraint("add"),), require_call=True)
    weather = CALL_HEADER + '{"city":"Paris","unit":"celsius"}<|call|>'
    assert not accepts(enc, tokenizer, named, weather)
    add = '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a":1}<|call|>'
    assert accepts(enc, tokenizer, named, ANALYSIS + add)
    assert not accepts(enc, tokenizer, named, add.replace('{"a":1}', "[1]"))  # an object


def test_a_final_schema_constrains_the_final_answer_only(enc, tokenizer) -> None:
    final = ReplyConstraint(final_schema=WEATHER)
    good = '<|channel|>final<|message|>{"city":"Oslo","unit":"fahrenheit"}<|return|>'
    assert accepts(enc, tokenizer, final, ANALYSIS + good)
    assert not accepts(enc, tokenizer, final, "<|channel|>final<|message|>Oslo<|return|>")
    assert not accepts(enc, tokenizer, final, CALL_HEADER + "{}<|call|>")  # no functions


def test_auto_with_a_strict_function_allows_text_preambles_or_a_checked_call(
    enc, tokenizer
) -> None:
    auto = ReplyConstraint(functions=(FunctionConstraint("get_weather", WEATHER),))
    preamble = "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant"
    call = CALL_HEADER + '{"city":"Rome","unit":"celsius"}<|call|>'
    assert accepts(enc, tokenizer, auto, "<|channel|>final<|message|>Hello!<|return|>")
    assert accepts(enc, tokenizer, auto, ANALYSIS + preamble + ANALYSIS + call)
    assert not accepts(enc, tokenizer, auto, CALL_HEADER + '{"city":"Rome"}<|call|>')


def test_function_names_are_literal_text(enc, tokenizer) -> None:
    odd = ReplyConstraint(functions=(FunctionConstraint('say"hi\\'),), require_call=True)
    reply = '<|channel|>commentary to=functions.say"hi\\ <|constrain|>json<|message|>{}<|call|>'
    assert accepts(enc, tokenizer, odd, reply)


def test_require_call_needs_a_function() -> None:
    with pytest.raises(ValueError, match="require_call"):
        ReplyConstraint(require_call=True)


def test_schemas_that_compile_pass_the_check() -> None:
    check_json_schema(WEATHER)
    check_json_schema({"type": "object", "properties": {"x": {"$ref": "#/$defs/X"}},
                       "$defs": {"X": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}})  # fmt: skip


@pytest.mark.parametrize(
    ("schema", "path", "message"),
    [
        ({"type": "strin"}, (), "Invalid type: strin"),
        (
            {"type": "object", "properties": {"a": {"type": "array", "items": {"not": {}}}}},
            ("properties", "a", "items"),
            "not",
        ),
        (
            {"anyOf": [{"type": "string"}, {"type": "string", "format": "nonsense"}]},
            ("anyOf", 1),
            "nonsense",
        ),
        ([1, 2], (), "must be an object or a boolean"),
    ],
)
def test_a_schema_that_does_not_compile_names_where(schema, path, message) -> None:
    with pytest.raises(SchemaError, match=message) as caught:
        check_json_schema(schema)
    assert caught.value.path == path
    assert caught.value.where("tools[0].function.parameters").startswith("tools[0].function")


def test_on_the_official_vocabulary_the_header_gpt_oss_writes_is_accepted(
    o200k_encoding: HarmonyEncoding,
) -> None:
    tokenizer = tokenizer_for(o200k_encoding)
    grammar = ReplyGrammars(o200k_encoding).build(REQUIRED)
    assert "free: <[0-199997]>*" in grammar  # every o200k rank, no control token
    reply = ANALYSIS + CALL_HEADER + '{"city":"Paris","unit":"celsius"}<|call|>'
    assert accepts(o200k_encoding, tokenizer, REQUIRED, reply)
