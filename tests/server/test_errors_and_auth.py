"""Bad requests, limits and the API key, over real HTTP.

Proves that every bad input to /v1/chat/completions gets OpenAI's error envelope
`{"error": {"message", "type", "param", "code"}}` with the right status (400, 404, 413, 401, 429)
and names the offending parameter where there is one, and that the server keeps serving after each
one; that the limits (context, `max_tokens`, `n`, stop sequences, `top_logprobs`, body size, queue)
are enforced; and that an API key guards /v1/*, /tokenize and /detokenize while /health (and
/metrics) stay open.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import MODEL_NAME, LiveServer

USER = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"


def good(**extra: object) -> dict:
    return {"model": MODEL_NAME, "messages": USER, "max_tokens": 1, **extra}


def assert_envelope(
    response: httpx.Response,
    status: int,
    *,
    param: str | None = None,
    code: str | None = None,
    type_: str | None = None,
    mentions: str | None = None,
) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    if type_ is not None:
        assert error["type"] == type_, error
    if mentions is not None:
        assert mentions in error["message"], error
    return error


def assert_still_serving(live: LiveServer, headers: dict[str, str] | None = None) -> None:
    response = httpx.post(live.base_url + CHAT, json=good(), headers=headers or {}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


# --- bad requests on the default server --------------------------------------------------------------

TOOL_NOT_OBJECT = {"type": "function", "function": {"name": "lookup", "parameters": [1, 2]}}
IMAGE = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]

# (id, request body, status, param, code, a word the message must contain)
BAD_REQUESTS = [
    ("wrong-type-temperature", good(temperature="hot"), 400, "temperature", None, "temperature"),
    ("temperature-out-of-range", good(temperature=3), 400, "temperature", None, None),
    ("missing-messages", {"model": MODEL_NAME}, 400, "messages", None, "messages"),
    ("messages-not-a-list", good(messages="hi"), 400, "messages", None, None),
    ("empty-messages", good(messages=[]), 400, "messages", None, None),
    ("message-not-an-object", good(messages=["hi"]), 400, "messages[0]", None, None),
    (
        "unknown-role",
        good(messages=[{"role": "robot", "content": "x"}]),
        400,
        "messages[0].role",
        None,
        "robot",
    ),
    ("unknown-model", good(model="gpt-9"), 404, "model", "model_not_found", "gpt-9"),
    ("unknown-field", good(frobnicate=1), 400, "frobnicate", None, "frobnicate"),
    ("unsupported-audio", good(audio={"voice": "alloy"}), 400, "audio", None, "audio"),
    (
        "unsupported-functions",
        good(functions=[{"name": "f"}]),
        400,
        "functions",
        None,
        "functions",
    ),
    ("max-tokens-zero", good(max_tokens=0), 400, "max_tokens", None, "max_tokens"),
    ("max-tokens-beyond-context", good(max_tokens=10**6), 400, "max_tokens", None, "max_tokens"),
    (
        "max-completion-tokens-beyond-context",
        good(max_completion_tokens=10**6),
        400,
        "max_completion_tokens",
        None,
        "max_completion_tokens",
    ),
    ("n-zero", good(n=0), 400, "n", None, None),
    ("n-beyond-default-limit", good(n=17), 400, "n", None, "16"),
    ("five-stop-sequences", good(stop=["a", "b", "c", "d", "e"]), 400, "stop", None, None),
    (
        "top-logprobs-21",
        good(logprobs=True, top_logprobs=21),
        400,
        "top_logprobs",
        None,
        "20",
    ),
    (
        "tool-schema-not-an-object",
        good(tools=[TOOL_NOT_OBJECT]),
        400,
        "tools[0].function.parameters",
        None,
        "lookup",
    ),
    (
        "non-function-tool",
        good(tools=[{"type": "web_search"}]),
        400,
        "tools[0].type",
        None,
        None,
    ),
    (
        "tool-message-without-call-or-name",
        good(messages=[*USER, {"role": "tool", "tool_call_id": "call_nope", "content": "42"}]),
        400,
        "messages[1].tool_call_id",
        None,
        "call_nope",
    ),
    (
        "image-content-part",
        good(messages=[{"role": "user", "content": IMAGE}]),
        400,
        "messages[0].content[0]",
        None,
        "image_url",
    ),
    (
        "content-not-text",
        good(messages=[{"role": "user", "content": 42}]),
        400,
        "messages[0].content",
        None,
        None,
    ),
    ("bad-reasoning-effort", good(reasoning_effort="max"), 400, "reasoning_effort", None, None),
    ("logit-bias-key-not-an-id", good(logit_bias={"abc": 1}), 400, "logit_bias", None, None),
    (
        "json-schema-without-name",
        good(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
        400,
        "response_format.json_schema.name",
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "param", "code", "mentions"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
def test_bad_request_gets_the_envelope(
    live_server: LiveServer,
    body: dict,
    status: int,
    param: str,
    code: str | None,
    mentions: str | None,
) -> None:
    response = httpx.post(live_server.base_url + CHAT, json=body, timeout=60)
    expected_type = "invalid_request_error"
    assert_envelope(
        response, status, param=param, code=code, type_=expected_type, mentions=mentions
    )
    assert_still_serving(live_server)


def test_malformed_json(live_server: LiveServer) -> None:
    response = httpx.post(
        live_server.base_url + CHAT,
        content=b'{"model": "tiny-gpt-oss", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert_envelope(response, 400, type_="invalid_request_error", mentions="JSON")
    assert_still_serving(live_server)


def test_unknown_route_and_method_use_the_envelope(live_server: LiveServer) -> None:
    assert_envelope(httpx.get(live_server.base_url + "/v1/nothing-here"), 404)
    assert_envelope(httpx.get(live_server.base_url + CHAT), 405)


@pytest.mark.parametrize("stop", [[""], ""], ids=["list", "string"])
def test_empty_stop_string_is_a_400(live_server: LiveServer, stop: object) -> None:
    response = httpx.post(live_server.base_url + CHAT, json=good(stop=stop), timeout=60)
    assert_envelope(response, 400, param="stop")


def test_logit_bias_outside_the_vocabulary_names_the_param(live_server: LiveServer) -> None:
    response = httpx.post(live_server.base_url + CHAT, json=good(logit_bias={"99999": 1}))
    assert_envelope(response, 400, param="logit_bias")


def test_logit_bias_outside_the_vocabulary_is_refused(live_server: LiveServer) -> None:
    response = httpx.post(live_server.base_url + CHAT, json=good(logit_bias={"99999": 1}))
    assert response.status_code == 400
    assert "99999" in response.json()["error"]["message"]
    assert_still_serving(live_server)


# --- limits --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(make_server) -> LiveServer:
    """A small context, n <= 2 and a 2 KiB body limit."""
    return make_server(max_model_len=256, max_n=2, max_request_bytes=2048)


def test_prompt_longer_than_the_context(limited: LiveServer) -> None:
    long = [{"role": "user", "content": "hello " * 250}]  # ~1500 bytes, > 256 tokens
    response = httpx.post(limited.base_url + CHAT, json=good(messages=long, max_tokens=None))
    assert_envelope(response, 400, param="messages", code="context_length_exceeded", mentions="256")
    assert_still_serving(limited)


def test_max_tokens_beyond_what_is_left(limited: LiveServer) -> None:
    prompt = httpx.post(limited.base_url + "/tokenize", json={"messages": USER}).json()["count"]
    room = 256 - prompt
    assert room > 1
    response = httpx.post(limited.base_url + CHAT, json=good(max_tokens=room + 1))
    assert_envelope(response, 400, param="max_tokens", mentions=str(room))
    ok = httpx.post(limited.base_url + CHAT, json=good(max_tokens=room), timeout=60)
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] <= room


def test_n_beyond_max_n(limited: LiveServer) -> None:
    response = httpx.post(limited.base_url + CHAT, json=good(n=3))
    assert_envelope(response, 400, param="n", mentions="2")
    ok = httpx.post(limited.base_url + CHAT, json=good(n=2), timeout=60)
    assert ok.status_code == 200
    assert [c["index"] for c in ok.json()["choices"]] == [0, 1]


def test_body_over_the_size_limit(limited: LiveServer) -> None:
    big = good(messages=[{"role": "user", "content": "x" * 3000}])
    response = httpx.post(limited.base_url + CHAT, json=big)
    assert_envelope(response, 413)
    # Just under the limit (padded with `user`, a field with no effect on the output): served.
    near = good(user="u" * 1800)
    assert 1800 < len(json.dumps(near)) < 2048
    response = httpx.post(limited.base_url + CHAT, json=near, timeout=60)
    assert response.status_code == 200, response.text


def test_chunked_body_over_the_size_limit(limited: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny-gpt-oss", "max_tokens": 1, "messages": [{"role": "user", '
        yield b'"content": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}]}'

    response = httpx.post(
        limited.base_url + CHAT, content=chunks(), headers={"content-type": "application/json"}
    )
    assert_envelope(response, 413)


def test_chunked_body_under_the_limit_is_served(limited: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield json.dumps(good()).encode()

    response = httpx.post(
        limited.base_url + CHAT,
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 200, response.text


def test_full_queue_gets_429(make_server) -> None:
    """One running, one waiting: with room for one waiting request, a third is refused."""
    live = make_server(max_num_seqs=1, max_waiting_requests=1)
    stops = live.services.encoding.assistant_stop_token_ids
    long = good(
        max_tokens=3000, stream=True, logit_bias={str(t): -100 for t in stops}
    )  # runs until aborted
    stats = live.services.engine.stats
    with (
        httpx.Client(base_url=live.base_url, timeout=60) as client,
        client.stream("POST", CHAT, json=long) as running,
    ):
        assert running.status_code == 200
        assert live.wait_until(lambda: stats().running == 1)
        with client.stream("POST", CHAT, json=long) as waiting:
            assert waiting.status_code == 200
            assert live.wait_until(lambda: stats().waiting == 1)
            refused = client.post(CHAT, json=good())
            error = assert_envelope(refused, 429, code="queue_full", type_="rate_limit_error")
            assert refused.headers["retry-after"].isdigit()
            assert error["message"]
    # Both clients went away: their requests are aborted and the server serves again.
    assert live.wait_until(lambda: stats().running == 0 and stats().waiting == 0)
    assert live.wait_until(live.kv_pools_all_free)
    assert_still_serving(live)


# --- API key --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(make_server) -> LiveServer:
    return make_server(api_key="sekret")


RIGHT = {"Authorization": "Bearer sekret"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "sekret"},  # no scheme
        {"Authorization": "Bearer"},
        {"X-Api-Key": "sekret"},
    ],
    ids=["none", "wrong", "no-scheme", "empty", "other-header"],
)
def test_chat_without_the_right_key_is_401(keyed: LiveServer, headers: dict) -> None:
    response = httpx.post(keyed.base_url + CHAT, json=good(), headers=headers)
    assert_envelope(response, 401, type_="authentication_error", code="invalid_api_key")
    assert "sekret" not in response.text


def test_chat_with_the_right_key(keyed: LiveServer) -> None:
    assert_still_serving(keyed, RIGHT)


def test_sdk_with_the_key(keyed: LiveServer) -> None:
    from openai import AuthenticationError, OpenAI

    right = OpenAI(base_url=keyed.base_url + "/v1", api_key="sekret", max_retries=0)
    completion = right.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=1)
    assert completion.choices[0].message.role == "assistant"
    wrong = OpenAI(base_url=keyed.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(AuthenticationError) as error:
        wrong.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=1)
    assert error.value.status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", None),
        ("POST", "/tokenize", {"prompt": "hi"}),
        ("POST", "/detokenize", {"tokens": [104, 105]}),
    ],
)
def test_other_guarded_routes(keyed: LiveServer, method: str, path: str, body: dict | None) -> None:
    url = keyed.base_url + path
    without = httpx.request(method, url, json=body)
    assert_envelope(without, 401, type_="authentication_error")
    with_key = httpx.request(method, url, json=body, headers=RIGHT)
    assert with_key.status_code == 200, with_key.text


@pytest.mark.parametrize("path", ["/health", "/metrics"])
def test_open_routes_need_no_key(keyed: LiveServer, path: str) -> None:
    assert httpx.get(keyed.base_url + path).status_code == 200
