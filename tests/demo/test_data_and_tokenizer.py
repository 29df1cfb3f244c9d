"""The demo's data and vocabulary: generated conversations render and parse, the BPE round-trips.

- Every kind of generated example renders through the server's own code (`chat_to_harmony`, the
  renderer) and the whole prompt + completion parses in strict mode, ending in the assistant's
  messages exactly as generated (a tool call on commentary with `<|constrain|>json`, a final
  answer ending `<|return|>`).
- The analysis is longer at a higher reasoning effort, for every kind of example.
- Training draws kinds and tools with its weights; a requested kind draws tools and problems
  evenly, and every arithmetic example names its kind of problem as its working shows.
- A drill's answers are right and are the facts the column working uses: sums of two digits (with
  or without a carry), differences with a top digit up to 18, and the whole times table, each kind
  in its share.
- The trained BPE round-trips text, spells digits one per token, carries the harmony specials by
  name, and its written files load back through `harmony.tokens` into the same encoding.
"""

from __future__ import annotations

import json
import random
import re
import statistics
from collections import Counter
from pathlib import Path

import pytest

from demo.bpe import DEMO_PATTERN, RecordingEncoding, build_encoding, train_bpe, write_vocabulary
from demo.conversations import (
    EFFORTS,
    KIND_WEIGHTS,
    TOOL_WEIGHTS,
    TOOLS,
    Example,
    generate,
    generate_example,
    render_example,
)
from harmony import HarmonyEncoding, Renderer, Role, parse_messages
from harmony.tokens import REQUIRED_SPECIAL_TOKENS, encoding_from_tiktoken_file

KINDS = ("arith", "drill", "tool_call", "tool_answer", "refusal")


@pytest.fixture(scope="module")
def tokens() -> list[bytes]:
    recording = RecordingEncoding()
    renderer = Renderer(recording)
    for example in generate(400, seed=5):
        render_example(example, renderer)
    return train_bpe(recording.texts.elements(), 1500)


@pytest.fixture(scope="module")
def encoding(tokens: list[bytes]) -> HarmonyEncoding:
    return build_encoding(tokens)


def test_generation_is_deterministic() -> None:
    a, b = generate(50, seed=3), generate(50, seed=3)
    assert [(e.messages, e.completion) for e in a] == [(e.messages, e.completion) for e in b]
    assert [e.messages for e in a] != [e.messages for e in generate(50, seed=4)]


@pytest.mark.parametrize("kind", KINDS)
def test_examples_render_and_parse_strictly(encoding: HarmonyEncoding, kind: str) -> None:
    renderer = Renderer(encoding)
    rng = random.Random(kind)
    for _ in range(60):
        example = generate_example(rng, kind)
        prompt, completion = render_example(example, renderer)
        messages = parse_messages(encoding, prompt + completion, strict=True)
        produced = messages[-len(example.completion) :]
        assert [(m.channel, m.recipient, m.content) for m in produced] == [
            (m.channel, m.recipient, m.content) for m in example.completion
        ]
        assert all(m.author.role is Role.ASSISTANT for m in produced)
        assert completion[-1] == (
            encoding.ids.call if kind == "tool_call" else encoding.ids.return_
        )
        # The completion alone (what the model samples) parses too.
        assert len(parse_messages(encoding, completion, Role.ASSISTANT, strict=True)) == len(
            example.completion
        )
        if kind == "tool_call":
            call = example.completion[-1]
            assert call.channel == "commentary" and call.content_type == "<|constrain|>json"
            name = call.recipient.removeprefix("functions.")
            arguments = json.loads(call.content[0].text)
            assert set(TOOLS[name]["parameters"]["required"]) <= set(arguments)
            assert name in {t["function"]["name"] for t in example.tools}


@pytest.mark.parametrize("kind", KINDS)
def test_analysis_grows_with_reasoning_effort(kind: str) -> None:
    rng = random.Random(kind + "effort")
    lengths: dict[str, list[int]] = {effort: [] for effort in EFFORTS}
    for _ in range(300):
        example = generate_example(rng, kind)
        lengths[example.reasoning_effort].append(len(example.completion[0].content[0].text))
    low, medium, high = (statistics.mean(lengths[e]) for e in EFFORTS)
    assert low < medium < high
    assert max(lengths["low"]) < min(lengths["high"])


def _problem(example: Example) -> str:
    """The kind of arithmetic problem, read from its working (as `check["problem"]` says)."""
    analysis = example.completion[0].content[0].text
    if "zeros" in analysis:
        kind = "unit"
    else:
        kind = {"+": "add", "-": "sub", "*": "mul"}[re.search(r"\d ([-+*]) \d", analysis).group(1)]
    assert example.check["problem"] == kind
    return kind


def _assert_shares(counts: Counter[str], weights: dict[str, int]) -> None:
    """Each name drawn in its weight's share of all draws, to within 4 points."""
    n, total = sum(counts.values()), sum(weights.values())
    for name, weight in weights.items():
        share, expected = counts[name] / n, weight / total
        assert share == pytest.approx(expected, abs=0.04), (name, share, expected)


def test_training_mix_follows_its_weights_and_a_requested_kind_draws_evenly() -> None:
    rng = random.Random("mix")
    drawn = [generate_example(rng) for _ in range(4000)]
    _assert_shares(Counter(e.kind for e in drawn), KIND_WEIGHTS)
    tools = [e.check["tool"] for e in drawn if e.kind in ("tool_call", "tool_answer")]
    _assert_shares(Counter(tools), TOOL_WEIGHTS)
    even = Counter(_problem(generate_example(rng, "arith")) for _ in range(2000))
    _assert_shares(even, {"add": 2, "sub": 2, "mul": 1, "unit": 1})
    calls = Counter(generate_example(rng, "tool_call").check["tool"] for _ in range(2000))
    _assert_shares(calls, dict.fromkeys(TOOLS, 1))


def test_drill_answers_are_the_facts_the_working_uses() -> None:
    rng = random.Random("drill")
    seen: Counter[str] = Counter()
    for _ in range(1000):
        example = generate_example(rng, "drill")
        asked = example.messages[-1]["content"]
        lines = example.completion[-1].content[0].text.split("\n")
        assert example.check["answers"] == [int(line.split(" = ")[1]) for line in lines]
        for line in lines:
            expr, answer = line.split(" = ")
            assert expr in asked
            x, op, y, *carry = expr.split(" ")
            a, b, value = int(x), int(y), int(answer)
            assert carry in ([], ["+", "1"]) and (not carry or op == "+")
            if op == "+":
                assert a <= 9 and b <= 9 and value == a + b + len(carry) // 2
                seen["sum"] += 1
            elif op == "-":
                assert b <= 9 and 0 <= value == a - b <= 9
                seen["difference"] += 1
            else:
                assert op == "*" and max(a, b) <= 12 and min(a, b) <= 9 and value == a * b
                seen[expr] += 1
    # Every product of the times table turns up (0-12 by 0-9, both orders), and each kind in its
    # share: sums and differences 2 of 5, products 1.
    products = {e: n for e, n in seen.items() if " * " in e}
    assert len(products) == 13 * 10 * 2 - 10 * 10
    shares = {"sum": 2, "difference": 2, "product": 1}
    counts = Counter({k: seen[k] for k in ("sum", "difference")})
    counts["product"] = sum(products.values())
    _assert_shares(counts, shares)


def test_bpe_round_trips_and_spells_digits(encoding: HarmonyEncoding) -> None:
    for text in ("What is 47 + 38?", "héllo wörld ✓ 2025-03-14", "", "  \n\n tabs\there"):
        assert encoding.decode(encoding.encode(text)) == text
    digits = encoding.encode("12345")
    assert [encoding.decode([t]) for t in digits] == ["1", "2", "3", "4", "5"]
    # Merges were learned from the corpus: a common word is one token.
    assert len(encoding.encode(" assistant")) < len(" assistant")


def test_vocabulary_files_load_with_specials_by_name(tokens: list[bytes], tmp_path: Path) -> None:
    write_vocabulary(tmp_path, tokens)
    loaded = encoding_from_tiktoken_file(tmp_path / "demo.tiktoken")
    for name in REQUIRED_SPECIAL_TOKENS:
        assert loaded.token(name) >= len(tokens)
    assert loaded.n_vocab == len(tokens) + len(loaded.special_tokens)
    text = "Convert 7 km to meters: 7000. <|start|> stays text"
    assert loaded.encode(text) == build_encoding(tokens).encode(text)
    assert loaded.encode("2025") == [ord(c) for c in "2025"]
    assert (tmp_path / "tokenizer_pattern.txt").read_text().strip() == DEMO_PATTERN
