"""POST /tokenize and /detokenize over real HTTP.

Proves that `/tokenize` returns the vocabulary's ids for a raw `prompt` (special tokens allowed),
and for chat `messages` (+ `tools`, `reasoning_effort`) exactly the harmony prompt the renderer
makes of `chat_to_harmony(...)` for today's UTC date, with `count` and `max_model_len`;
`add_generation_prompt=False` leaves off the trailing `<|start|>assistant`; exactly one of
`prompt` and `messages` is required; `/detokenize` round-trips ids to text and refuses ids outside
the vocabulary. With the official o200k_base vocabulary (../shared, skipped without it), a server on
a tiny model whose vocabulary covers o200k_harmony tokenizes chats (system prompts, tools, reasoning
efforts, tool calls and results, multi-turn reasoning) token for token as openai-harmony renders
the same conversation built by hand.
"""

from __future__ import annotations

import dataclasses
import datetime

import httpx
import openai_harmony as oh
import pytest

from engine.config import preset
from engine.model.random_checkpoint import write_random_checkpoint
from harmony import Renderer, Role
from server.harmony_bridge import chat_to_harmony
from tests.conftest import SHARED_VOCAB
from tests.harmony.synthetic_vocab import synthetic_encoding
from tests.server.conftest import MODEL_NAME, LiveServer

ENCODING = synthetic_encoding()  # the vocabulary the live server's model directory carries
RENDERER = Renderer(ENCODING)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the weather.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["location"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now."}}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
}

# name -> (messages, tools, reasoning_effort)
CHATS = {
    "user-only": ([{"role": "user", "content": "Hello!"}], None, None),
    "system-and-high-effort": (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi there"},
        ],
        None,
        "high",
    ),
    "developer-tools-low-effort": (
        [
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Weather in Paris?"},
        ],
        [WEATHER, CLOCK],
        "low",
    ),
    "tool-call-and-result": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "reasoning_content": "Need the weather.",
                "content": "Let me check.",
                "tool_calls": [CALL],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
        ],
        [WEATHER],
        None,
    ),
    "multi-turn-reasoning": (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "reasoning": "Add them.", "content": "4"},
            {"role": "user", "content": "Times 3?"},
            {"role": "assistant", "reasoning_content": "Multiply.", "content": "12"},
            {"role": "user", "content": "And <|start|>now?"},
        ],
        None,
        "low",
    ),
}


def utc_today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


def tokenize(live: LiveServer, body: dict) -> tuple[dict, datetime.date]:
    """The server's answer and the UTC date it rendered for (asked again across midnight)."""
    for _ in range(3):
        before = utc_today()
        response = httpx.post(live.base_url + "/tokenize", json=body, timeout=60)
        if utc_today() == before:
            assert response.status_code == 200, response.text
            return response.json(), before
    raise AssertionError("the date kept changing")


def chat_body(name: str, **extra: object) -> dict:
    messages, tools, effort = CHATS[name]
    body: dict = {"messages": messages, **extra}
    if tools is not None:
        body["tools"] = tools
    if effort is not None:
        body["reasoning_effort"] = effort
    return body


def assert_error(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param


# --- /tokenize with a prompt ------------------------------------------------------------------------


def test_prompt_tokens_allow_special_tokens(live_server: LiveServer) -> None:
    prompt = "Hello<|start|>assistant<|channel|>final<|message|>Hi!<|return|>"
    answer, _ = tokenize(live_server, {"prompt": prompt, "model": MODEL_NAME})
    expected = ENCODING.encode_with_special_tokens(prompt)
    assert answer["tokens"] == expected
    assert answer["count"] == len(expected)
    assert answer["max_model_len"] == live_server.services.max_model_len == 4096
    for name in ("<|start|>", "<|channel|>", "<|message|>", "<|return|>"):
        assert ENCODING.token(name) in answer["tokens"]  # one token each, not their text
    assert ENCODING.decode(answer["tokens"]) == prompt


def test_plain_prompt_tokens(live_server: LiveServer) -> None:
    prompt = "the weather in Paris is nice, héllo 世界"
    answer, _ = tokenize(live_server, {"prompt": prompt})
    assert answer["tokens"] == ENCODING.encode(prompt)
    assert answer["count"] == len(answer["tokens"])


def test_empty_prompt(live_server: LiveServer) -> None:
    answer, _ = tokenize(live_server, {"prompt": ""})
    assert answer == {"tokens": [], "count": 0, "max_model_len": 4096}


# --- /tokenize with messages ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CHATS))
def test_messages_render_as_the_bridge_and_renderer_do(live_server: LiveServer, name: str) -> None:
    messages, tools, effort = CHATS[name]
    answer, today = tokenize(live_server, chat_body(name))
    conversation = chat_to_harmony(messages, today=today, tools=tools, reasoning_effort=effort)
    expected = RENDERER.render_for_completion(conversation)
    assert answer["tokens"] == expected
    assert answer["count"] == len(expected)
    assert answer["max_model_len"] == 4096
    text = ENCODING.decode(answer["tokens"])
    assert f"Current date: {today.isoformat()}" in text
    assert f"Reasoning: {effort or 'medium'}" in text
    assert text.endswith("<|start|>assistant")


def test_add_generation_prompt_false_omits_the_assistant_start(live_server: LiveServer) -> None:
    messages, tools, effort = CHATS["multi-turn-reasoning"]
    without, today = tokenize(
        live_server, chat_body("multi-turn-reasoning", add_generation_prompt=False)
    )
    conversation = chat_to_harmony(messages, today=today, tools=tools, reasoning_effort=effort)
    assert without["tokens"] == RENDERER.render_conversation(conversation)
    assert without["count"] == len(without["tokens"])
    with_prompt, _ = tokenize(live_server, chat_body("multi-turn-reasoning"))
    tail = [ENCODING.token("<|start|>"), *ENCODING.encode(Role.ASSISTANT.value)]
    assert with_prompt["tokens"] == without["tokens"] + tail
    assert not ENCODING.decode(without["tokens"]).endswith("<|start|>assistant")


def test_reasoning_effort_and_tools_change_the_prompt(live_server: LiveServer) -> None:
    user = [{"role": "user", "content": "hi"}]
    low, _ = tokenize(live_server, {"messages": user, "reasoning_effort": "low"})
    high, _ = tokenize(live_server, {"messages": user, "reasoning_effort": "high"})
    tools, _ = tokenize(live_server, {"messages": user, "tools": [WEATHER]})
    assert "Reasoning: low" in ENCODING.decode(low["tokens"])
    assert "Reasoning: high" in ENCODING.decode(high["tokens"])
    assert "get_weather" in ENCODING.decode(tools["tokens"])
    assert tools["count"] > low["count"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "prompt"),
        ({}, "prompt"),
        ({"model": MODEL_NAME}, "prompt"),
        ({"prompt": "hi", "frobnicate": True}, "frobnicate"),
        ({"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "max"}, None),
        (
            {
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}],
            },
            "tools[0].function.parameters",
        ),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ],
    ids=[
        "both",
        "neither",
        "model-only",
        "unknown-field",
        "bad-effort",
        "bad-tool-schema",
        "bad-role",
    ],
)
def test_bad_tokenize_requests(live_server: LiveServer, body: dict, param: str | None) -> None:
    response = httpx.post(live_server.base_url + "/tokenize", json=body)
    assert_error(response, 400, param)


@pytest.mark.parametrize(
    ("path", "body"),
    [("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [104, 105]})],
    ids=["tokenize", "detokenize"],
)
def test_unknown_model_is_404(live_server: LiveServer, path: str, body: dict) -> None:
    response = httpx.post(live_server.base_url + path, json={**body, "model": "gpt-9"})
    assert_error(response, 404, "model")
    assert response.json()["error"]["code"] == "model_not_found"


# --- /detokenize ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["hello world", "héllo 世界 🙂", "<|start|>user<|message|>hi<|end|>", ""],
    ids=["ascii", "unicode", "special", "empty"],
)
def test_detokenize_round_trips(live_server: LiveServer, text: str) -> None:
    answer, _ = tokenize(live_server, {"prompt": text})
    response = httpx.post(live_server.base_url + "/detokenize", json={"tokens": answer["tokens"]})
    assert response.status_code == 200, response.text
    assert response.json() == {"prompt": text}


def test_detokenize_of_a_chat_prompt(live_server: LiveServer) -> None:
    answer, _ = tokenize(live_server, chat_body("tool-call-and-result"))
    response = httpx.post(live_server.base_url + "/detokenize", json={"tokens": answer["tokens"]})
    text = response.json()["prompt"]
    assert text == ENCODING.decode(answer["tokens"])
    assert "to=functions.get_weather" in text
    assert '{"temp": 20}' in text


def test_detokenize_refuses_ids_outside_the_vocabulary(live_server: LiveServer) -> None:
    gap = next(i for i in range(ENCODING.n_vocab) if not ENCODING.is_valid_id(i))
    model_only = live_server.services.engine.engine.model.config.vocab_size - 1  # no token
    for bad in (gap, ENCODING.n_vocab, model_only, -1, 10**12):
        response = httpx.post(live_server.base_url + "/detokenize", json={"tokens": [104, bad]})
        assert_error(response, 400, "tokens")
        assert str(bad) in response.json()["error"]["message"]
    wrong_type = httpx.post(live_server.base_url + "/detokenize", json={"tokens": ["a"]})
    assert wrong_type.status_code == 400
    assert wrong_type.json()["error"]["param"].startswith("tokens")


# --- the official vocabulary: token for token as openai-harmony ---------------------------------------


@pytest.fixture(scope="module")
def o200k_server(o200k_encoding, make_server, tmp_path_factory) -> LiveServer:
    """A tiny random model with o200k's 201088-token vocabulary and the official vocabulary file."""
    directory = tmp_path_factory.mktemp("tiny-o200k-model")
    config = dataclasses.replace(preset("tiny"), vocab_size=201088)
    write_random_checkpoint(directory, config, layout="hf")
    (directory / "o200k_base.tiktoken").symlink_to(SHARED_VOCAB.resolve())
    return make_server(model=directory)


def oracle_conversation(name: str, today: datetime.date) -> list[oh.Message]:
    """The conversation of CHATS[name], built by hand with openai-harmony's own API."""
    assistant = oh.Role.ASSISTANT
    efforts = {"low": oh.ReasoningEffort.LOW, "high": oh.ReasoningEffort.HIGH}
    _, _, effort = CHATS[name]
    system = (
        oh.SystemContent.new()
        .with_reasoning_effort(efforts.get(effort or "", oh.ReasoningEffort.MEDIUM))
        .with_conversation_start_date(today.isoformat())
    )

    def message(role: oh.Role, content: object) -> oh.Message:
        return oh.Message.from_role_and_content(role, content)

    weather = oh.ToolDescription.new(
        "get_weather", "Gets the weather.", WEATHER["function"]["parameters"]
    )
    clock = oh.ToolDescription.new("get_time", "The time now.")
    head = [message(oh.Role.SYSTEM, system)]
    if name == "user-only":
        return [*head, message(oh.Role.USER, "Hello!")]
    if name == "system-and-high-effort":
        developer = oh.DeveloperContent.new().with_instructions("You are terse.")
        return [*head, message(oh.Role.DEVELOPER, developer), message(oh.Role.USER, "Hi there")]
    if name == "developer-tools-low-effort":
        developer = (
            oh.DeveloperContent.new()
            .with_instructions("Answer in French.")
            .with_function_tools([weather, clock])
        )
        return [
            *head,
            message(oh.Role.DEVELOPER, developer),
            message(oh.Role.USER, "Weather in Paris?"),
        ]
    if name == "tool-call-and-result":
        developer = oh.DeveloperContent.new().with_function_tools([weather])
        return [
            *head,
            message(oh.Role.DEVELOPER, developer),
            message(oh.Role.USER, "Weather in Paris?"),
            message(assistant, "Need the weather.").with_channel("analysis"),
            message(assistant, "Let me check.").with_channel("commentary"),
            message(assistant, '{"location":"Paris"}')
            .with_channel("commentary")
            .with_recipient("functions.get_weather")
            .with_content_type("<|constrain|>json"),
            oh.Message.from_author_and_content(
                oh.Author.new(oh.Role.TOOL, "functions.get_weather"), '{"temp": 20}'
            )
            .with_channel("commentary")
            .with_recipient("assistant"),
        ]
    assert name == "multi-turn-reasoning"
    developer = oh.DeveloperContent.new().with_instructions("Be brief.")
    return [
        *head,
        message(oh.Role.DEVELOPER, developer),
        message(oh.Role.USER, "2+2?"),
        message(assistant, "Add them.").with_channel("analysis"),
        message(assistant, "4").with_channel("final"),
        message(oh.Role.USER, "Times 3?"),
        message(assistant, "Multiply.").with_channel("analysis"),
        message(assistant, "12").with_channel("final"),
        message(oh.Role.USER, "And <|start|>now?"),
    ]


@pytest.mark.parametrize("name", list(CHATS))
def test_official_vocabulary_tokenizes_as_openai_harmony(
    o200k_server: LiveServer, oracle, name: str
) -> None:
    answer, today = tokenize(o200k_server, chat_body(name))
    conversation = oh.Conversation.from_messages(oracle_conversation(name, today))
    expected = oracle.render_conversation_for_completion(conversation, oh.Role.ASSISTANT)
    assert answer["tokens"] == expected
    assert answer["count"] == len(expected)


def test_official_vocabulary_without_generation_prompt(o200k_server: LiveServer, oracle) -> None:
    name = "multi-turn-reasoning"
    answer, today = tokenize(o200k_server, chat_body(name, add_generation_prompt=False))
    conversation = oh.Conversation.from_messages(oracle_conversation(name, today))
    assert answer["tokens"] == oracle.render_conversation(conversation)
    # Earlier turns' analysis is dropped, as openai-harmony drops it.
    assert "Add them." not in oracle.decode_utf8(answer["tokens"])


def test_official_vocabulary_raw_prompt(o200k_server: LiveServer, oracle) -> None:
    prompt = "<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant"
    answer, _ = tokenize(o200k_server, {"prompt": prompt})
    assert answer["tokens"] == oracle.encode(prompt, allowed_special="all")
    assert answer["tokens"][0] == 200006  # <|start|>
    response = httpx.post(o200k_server.base_url + "/detokenize", json={"tokens": answer["tokens"]})
    assert response.json() == {"prompt": prompt}
