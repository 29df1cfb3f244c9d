"""Speed of our harmony layer against openai-harmony 0.0.8 (the official Rust implementation).

Measures, side by side in one run and on the same inputs:

1. Rendering for completion a 20-message conversation (system with a date, developer with
   instructions and 10 function tools with varied JSON Schemas, then user / assistant analysis /
   tool call / tool result / assistant final turns): `harmony.Renderer.render_for_completion`
   against `HarmonyEncoding.render_conversation_for_completion(Conversation.from_messages(...))`.
   The two token lists are asserted identical before anything is timed.
2. Streaming-parsing 100k+ generated tokens (rendered assistant output: analysis, a tool call and a
   final answer with non-ASCII text, repeated) one token at a time, reading the content delta after
   every token as a server would: `harmony.StreamParser` against `openai_harmony.StreamableParser`.
   Both must produce the same messages and the same concatenated content.

Prints a markdown table (| benchmark | ours | openai-harmony | ratio |) ready for the README; the
ratio is openai-harmony's time over ours, so above 1 means ours is faster.

Run from the repository root, with the test extras installed (openai-harmony, tiktoken):

    python benchmarks/harmony_speed.py [--vocab PATH]

PATH is the o200k_base vocabulary; it defaults to ../shared/tiktoken/o200k_base.tiktoken beside
the repository root. Nothing touches the network. The run takes well under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VOCAB = REPO_ROOT.parent / "shared" / "tiktoken" / "o200k_base.tiktoken"
VOCAB_FILE_NAME = "o200k_base.tiktoken"  # the name openai-harmony looks for in the directory

RENDER_ROUNDS = 7
RENDER_ROUND_S = 0.25  # target seconds per timing round of the render benchmark
PARSE_ROUNDS = 5
PARSE_MIN_TOKENS = 100_000
SEED = 20240806

# --- the conversation: 10 function tools with varied JSON Schemas ----------------------------

TOOLS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "get_weather",
        "Gets the current weather for a location.",
        {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and country, e.g. Paris, FR"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                "days": {"type": "integer", "default": 1},
            },
            "required": ["location"],
        },
    ),
    (
        "search_flights",
        "Searches one-way flights.",
        {
            "type": "object",
            "properties": {
                "origin": {"type": "string", "description": "IATA airport code"},
                "destination": {"type": "string"},
                "passengers": {
                    "type": "object",
                    "properties": {
                        "adults": {"type": "integer"},
                        "children": {"type": "integer", "default": 0},
                    },
                    "required": ["adults"],
                },
                "nonstop": {"type": "boolean", "default": False},
            },
            "required": ["origin", "destination"],
        },
    ),
    (
        "create_event",
        "Creates a calendar event.",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "attendees": {"type": "array", "items": {"type": "string"}},
                "reminders": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"minutes": {"type": "integer"}}},
                },
            },
            "required": ["title"],
        },
    ),
    (
        "send_email",
        "Sends an email.\nNever send without confirmation.",
        {
            "type": "object",
            "properties": {
                "to": {"type": "array", "items": {"type": "string"}},
                "body": {"type": "string"},
                "priority": {
                    "type": "string",
                    "enum": ["low", "normal", "high"],
                    "default": "normal",
                },
            },
            "required": ["to", "body"],
        },
    ),
    (
        "query_database",
        "Runs a read-only SQL query.",
        {
            "type": "object",
            "properties": {
                "sql": {"type": "string"},
                "params": {"type": "array"},
                "timeout_ms": {"type": "number", "nullable": True},
            },
            "required": ["sql"],
        },
    ),
    (
        "convert_currency",
        "Converts an amount between currencies.",
        {
            "type": "object",
            "properties": {
                "amount": {"type": "number"},
                "from": {"type": "string", "enum": ["USD", "EUR", "JPY"]},
                "to": {"type": "string", "enum": ["USD", "EUR", "JPY"]},
            },
            "required": ["amount", "from", "to"],
        },
    ),
    (
        "translate_text",
        "Translates text, e.g. « bonjour » → “hello”.",
        {
            "type": "object",
            "properties": {
                "text": {"type": "string"},
                "target": {"type": "string", "description": "BCP 47 tag", "enum": ["en", "ja"]},
                "formality": {"type": ["string", "null"]},
            },
            "required": ["text", "target"],
        },
    ),
    (
        "update_profile",
        "Updates the user's profile.",
        {
            "type": "object",
            "properties": {
                "user_id": {"type": "string"},
                "address": {
                    "type": "object",
                    "description": "Postal address",
                    "properties": {
                        "city": {"type": "string"},
                        "country": {"type": "string", "default": "US"},
                    },
                    "required": ["city"],
                },
            },
            "required": ["user_id"],
        },
    ),
    (
        "book_table",
        "Books a restaurant table.",
        {
            "type": "object",
            "properties": {
                "restaurant": {"type": "string", "title": "Restaurant name"},
                "time": {
                    "description": "When to book",
                    "oneOf": [
                        {"type": "string", "description": "ISO 8601 time"},
                        {"type": "integer", "description": "Unix seconds"},
                    ],
                },
            },
            "required": ["restaurant", "time"],
        },
    ),
    (
        "list_files",
        "Lists files in the workspace.",
        {
            "type": "object",
            "properties": {
                "path": {"type": "string", "default": ".", "examples": ["src", "docs"]},
                "recursive": {"type": "boolean", "default": False},
            },
        },
    ),
]

INSTRUCTIONS = "You are a concise travel assistant. Confirm before sending anything."

# (user question, analysis, tool name, JSON arguments, tool result, final answer)
ROUNDS: list[tuple[str, str, str, str, str, str]] = [
    (
        "Weather in Tokyo tomorrow? 明日の天気は?",
        "Call get_weather with days=2.",
        "get_weather",
        '{"location":"Tokyo, JP","days":2}',
        '{"tomorrow":{"temp":19,"sky":"rain"}}',
        "Tomorrow: 19 °C and rain ☔. 明日は雨です。",
    ),
    (
        "Nonstop CDG to NRT for two adults?",
        "Search flights, nonstop, 2 adults.",
        "search_flights",
        '{"origin":"CDG","destination":"NRT","passengers":{"adults":2},"nonstop":true}',
        '[{"flight":"AF276","price_eur":1184}]',
        "AF276, nonstop, €1,184 for two.",
    ),
    (
        "Convert 1184 EUR to yen.",
        "Convert with convert_currency.",
        "convert_currency",
        '{"amount":1184,"from":"EUR","to":"JPY"}',
        '{"amount":191523.84}',
        "€1,184 ≈ ¥191,524. Shall I email the summary?",
    ),
]


def build_ours(date: str) -> list[Any]:
    """The 20-message conversation as our harmony messages."""
    from harmony import DeveloperContent, Message, Role, SystemContent, ToolDescription

    tools = [ToolDescription(name, desc, params) for name, desc, params in TOOLS]
    messages = [
        Message.from_role(Role.SYSTEM, SystemContent(conversation_start_date=date)),
        Message.from_role(
            Role.DEVELOPER, DeveloperContent(instructions=INSTRUCTIONS).with_function_tools(tools)
        ),
    ]
    for user, analysis, tool, args, result, final in ROUNDS:
        messages += [
            Message.from_role(Role.USER, user),
            Message.from_role(Role.ASSISTANT, analysis).with_channel("analysis"),
            Message.from_role(Role.ASSISTANT, args)
            .with_channel("commentary")
            .with_recipient(f"functions.{tool}")
            .with_content_type("<|constrain|>json"),
            Message.from_role(Role.TOOL, result, name=f"functions.{tool}")
            .with_channel("commentary")
            .with_recipient("assistant"),
            Message.from_role(Role.ASSISTANT, final).with_channel("final"),
        ]
    messages += [
        Message.from_role(Role.USER, "Yes, send it — merci !"),
        Message.from_role(Role.ASSISTANT, "Sending now.").with_channel("final"),
        Message.from_role(Role.USER, "Thanks! Anything else?"),
    ]
    assert len(messages) == 20, len(messages)
    return messages


def build_oracle(date: str) -> list[Any]:
    """The same 20-message conversation as openai-harmony messages."""
    from openai_harmony import (
        Author,
        DeveloperContent,
        Message,
        Role,
        SystemContent,
        ToolDescription,
    )

    tools = [ToolDescription.new(name, desc, parameters=params) for name, desc, params in TOOLS]
    messages = [
        Message.from_role_and_content(
            Role.SYSTEM, SystemContent.new().with_conversation_start_date(date)
        ),
        Message.from_role_and_content(
            Role.DEVELOPER,
            DeveloperContent.new().with_instructions(INSTRUCTIONS).with_function_tools(tools),
        ),
    ]
    for user, analysis, tool, args, result, final in ROUNDS:
        messages += [
            Message.from_role_and_content(Role.USER, user),
            Message.from_role_and_content(Role.ASSISTANT, analysis).with_channel("analysis"),
            Message.from_role_and_content(Role.ASSISTANT, args)
            .with_channel("commentary")
            .with_recipient(f"functions.{tool}")
            .with_content_type("<|constrain|>json"),
            Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{tool}"), result)
            .with_channel("commentary")
            .with_recipient("assistant"),
            Message.from_role_and_content(Role.ASSISTANT, final).with_channel("final"),
        ]
    messages += [
        Message.from_role_and_content(Role.USER, "Yes, send it — merci !"),
        Message.from_role_and_content(Role.ASSISTANT, "Sending now.").with_channel("final"),
        Message.from_role_and_content(Role.USER, "Thanks! Anything else?"),
    ]
    assert len(messages) == 20, len(messages)
    return messages


# --- the generated token stream -------------------------------------------------------------

SENTENCES = [
    "The museum opens at 9:30 and is closed on Mondays.",
    "Le café près de la gare sert un excellent croissant.",
    "東京タワーからの夜景はとても綺麗です。",
    "Москва — столица России, а Казань — столица Татарстана.",
    "Remember to carry some cash: many small shops don't take cards 💴.",
    "Die Zugfahrt von München nach Zürich dauert etwa vier Stunden.",
    "北京烤鸭是一道著名的中国菜。",
    "Temperature range: −3 °C to 12 °C, humidity ≈ 60 %.",
    "Try the ramen in Shinjuku 🍜 — it's worth the queue! 😀",
    "El vuelo sale a las 8:15 desde la terminal 2.",
    "Step 1: compute 17 × 23 = 391; step 2: divide by 7 ≈ 55.857.",
    "नमस्ते! आपका स्वागत है।",
    "Cherry blossoms 🌸 usually peak in late March or early April.",
    "The résumé mentions naïve Bayes and Schrödinger's equation.",
]
ANALYSIS = [
    "The user asks about {topic}. I should check the facts first.",
    "Let me think about {topic}: the key constraints are time and budget.",
    "Need to call a tool for {topic}, then summarise in the user's language.",
]
TOPICS = ["the weather", "flights", "restaurants", "currency", "trains", "museums", "hotels"]


def build_stream(enc: Any, oracle: Any) -> tuple[list[int], int]:
    """At least PARSE_MIN_TOKENS tokens of assistant output; also the number of messages in it.

    A pool of episodes (analysis, tool call, final answer ending in `<|return|>`) is rendered by
    both libraries, checked identical, then repeated.
    """
    import openai_harmony as oh

    from harmony import Message, Renderer, Role

    rng = random.Random(SEED)
    renderer = Renderer(enc)
    return_id = enc.token("<|return|>")
    pool: list[int] = []
    n_pool_messages = 0
    for _ in range(40):
        topic = rng.choice(TOPICS)
        tool_name, _, _ = rng.choice(TOOLS)
        analysis = rng.choice(ANALYSIS).format(topic=topic) + " " + rng.choice(SENTENCES)
        args = f'{{"query":"{rng.choice(SENTENCES)}","limit":{rng.randint(1, 500)}}}'
        final = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(3, 12)))
        ours = [
            Message.from_role(Role.ASSISTANT, analysis).with_channel("analysis"),
            Message.from_role(Role.ASSISTANT, args)
            .with_channel("commentary")
            .with_recipient(f"functions.{tool_name}")
            .with_content_type("<|constrain|>json"),
            Message.from_role(Role.ASSISTANT, final).with_channel("final"),
        ]
        theirs = [
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, analysis).with_channel("analysis"),
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, args)
            .with_channel("commentary")
            .with_recipient(f"functions.{tool_name}")
            .with_content_type("<|constrain|>json"),
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, final).with_channel("final"),
        ]
        for mine, other in zip(ours, theirs, strict=True):
            tokens = renderer.render_message(mine)
            if tokens != oracle.render(other):
                raise SystemExit(f"stream message renders differently from openai-harmony: {mine}")
            pool += tokens
        pool[-1] = return_id  # a completion's final answer ends with <|return|>
        n_pool_messages += len(ours)
    repeats = -(-PARSE_MIN_TOKENS // len(pool))
    return pool * repeats, n_pool_messages * repeats


def drive(parser: Any, tokens: list[int]) -> tuple[Any, list[str]]:
    """Feed tokens one at a time, reading the content delta after each, as a server streams."""
    process = parser.process
    deltas: list[str] = []
    append = deltas.append
    for token in tokens:
        process(token)
        delta = parser.last_content_delta
        if delta:
            append(delta)
    return parser, deltas


def parse_ours(enc: Any, tokens: list[int]) -> tuple[Any, list[str]]:
    from harmony import StreamParser

    return drive(StreamParser(enc, None), tokens)


def parse_oracle(oracle: Any, tokens: list[int]) -> tuple[Any, list[str]]:
    from openai_harmony import StreamableParser

    return drive(StreamableParser(oracle, None), tokens)


# --- timing -----------------------------------------------------------------------------------


def time_it(fn: Callable[[], object], rounds: int, round_s: float) -> tuple[float, int]:
    """Median seconds per call over `rounds` rounds of n calls each (n sized to ~round_s)."""
    fn()  # warm up (caches, lazily built tables)
    n = 1
    while True:  # calibrate: double n until a batch takes a fifth of a round
        start = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= round_s / 5:
            break
        n *= 2
    n = max(1, round(n * round_s / elapsed))
    per_call = []
    gc.collect()
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        per_call.append((time.perf_counter() - start) / n)
    return statistics.median(per_call), n


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), else platform.processor() or the machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--vocab",
        type=Path,
        default=DEFAULT_VOCAB,
        help=f"the o200k_base.tiktoken vocabulary (default: {DEFAULT_VOCAB})",
    )
    args = ap.parse_args(argv)
    vocab: Path = args.vocab.resolve()
    if not vocab.is_file():
        raise SystemExit(
            f"vocabulary not found: {vocab}\n"
            "Pass --vocab /path/to/o200k_base.tiktoken (by default it is looked for in "
            "../shared/tiktoken/ beside the repository root)."
        )
    if vocab.name != VOCAB_FILE_NAME:
        raise SystemExit(
            f"{vocab}: openai-harmony only reads a file named {VOCAB_FILE_NAME} "
            "(from $TIKTOKEN_ENCODINGS_BASE); rename or link the file."
        )
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(vocab.parent)
    sys.path.insert(0, str(REPO_ROOT))

    import openai_harmony as oh

    import harmony

    oracle = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    enc = harmony.load_harmony_encoding(vocab)
    enc.token_text_table()  # built once per process (the parser's tables), not per parse

    # 1. rendering
    date = "2025-08-06"
    ours_msgs = build_ours(date)
    their_msgs = build_oracle(date)
    renderer = harmony.Renderer(enc)
    ours_tokens = renderer.render_for_completion(ours_msgs)
    their_tokens = oracle.render_conversation_for_completion(
        oh.Conversation.from_messages(their_msgs), oh.Role.ASSISTANT
    )
    if ours_tokens != their_tokens:
        first = next(
            (i for i, (a, b) in enumerate(zip(ours_tokens, their_tokens, strict=False)) if a != b),
            min(len(ours_tokens), len(their_tokens)),
        )
        raise SystemExit(
            f"render mismatch: ours {len(ours_tokens)} tokens, openai-harmony {len(their_tokens)}; "
            f"first difference at {first}: ours {enc.decode(ours_tokens[first : first + 20])!r} "
            f"vs {enc.decode(their_tokens[first : first + 20])!r}"
        )
    n_render_tokens = len(ours_tokens)

    def render_ours() -> object:
        return renderer.render_for_completion(ours_msgs)

    def render_theirs() -> object:
        return oracle.render_conversation_for_completion(
            oh.Conversation.from_messages(their_msgs), oh.Role.ASSISTANT
        )

    ours_render_s, n_ours = time_it(render_ours, RENDER_ROUNDS, RENDER_ROUND_S)
    their_render_s, n_theirs = time_it(render_theirs, RENDER_ROUNDS, RENDER_ROUND_S)

    # 2. streaming parse
    stream, n_messages = build_stream(enc, oracle)
    ours_parser, ours_deltas = parse_ours(enc, stream)
    their_parser, their_deltas = parse_oracle(oracle, stream)
    their_messages = their_parser.messages
    if not len(ours_parser.messages) == len(their_messages) == n_messages:
        raise SystemExit(
            f"parse mismatch: ours {len(ours_parser.messages)} messages, openai-harmony "
            f"{len(their_messages)}, expected {n_messages}"
        )
    for i, (mine, other) in enumerate(zip(ours_parser.messages, their_messages, strict=True)):
        theirs = (other.author.role.value, other.channel, other.recipient, other.content_type)
        header = (mine.author.role.value, mine.channel, mine.recipient, mine.content_type)
        if header != theirs or mine.text != "".join(c.text for c in other.content):
            raise SystemExit(f"parse mismatch at message {i}: ours {mine} vs {other}")
    if "".join(ours_deltas) != "".join(their_deltas):
        raise SystemExit("parse mismatch: the concatenated content deltas differ")

    ours_parse_s, _ = time_it(lambda: parse_ours(enc, stream), PARSE_ROUNDS, 0.0)
    their_parse_s, _ = time_it(lambda: parse_oracle(oracle, stream), PARSE_ROUNDS, 0.0)

    today = datetime.date.today().isoformat()
    print(
        f"harmony speed, {today}: {cpu_name()} ({os.cpu_count()} cores), {platform.system()}, "
        f"Python {platform.python_version()}, openai-harmony {metadata.version('openai-harmony')}, "
        f"tiktoken {metadata.version('tiktoken')}"
    )
    print()
    print("| benchmark | ours | openai-harmony | ratio |")
    print("|---|---:|---:|---:|")
    print(
        f"| render for completion: 20 messages, 10 function tools ({n_render_tokens} tokens) "
        f"| {ours_render_s * 1e3:.3f} ms | {their_render_s * 1e3:.3f} ms "
        f"| {their_render_s / ours_render_s:.2f}× |"
    )
    print(
        f"| stream-parse {len(stream):,} tokens ({n_messages:,} messages), delta per token "
        f"| {len(stream) / ours_parse_s / 1e6:.2f} M tok/s "
        f"| {len(stream) / their_parse_s / 1e6:.2f} M tok/s "
        f"| {their_parse_s / ours_parse_s:.2f}× |"
    )
    print()
    print(
        f"ratio: openai-harmony's time over ours (> 1: ours is faster). Render: median of "
        f"{RENDER_ROUNDS} rounds of {n_ours} (ours) / {n_theirs} (openai-harmony) renders, "
        f"token lists checked identical. Parse: median of {PARSE_ROUNDS} full passes, same "
        "messages and content checked."
    )


if __name__ == "__main__":
    main()
