"""POST /v1/chat/completions end to end, through the official `openai` SDK and raw SSE.

Proves, against a real uvicorn server on loopback serving a tiny random gpt-oss model: responses and
stream chunks parse into the SDK's typed objects with OpenAI's shape (ids, roles, finish reasons,
usage with reasoning and cached token counts); tools, `n`, `seed`, greedy decoding, `max_tokens`,
`stop` and `logprobs` behave; the stream's framing (role first, one finish per choice, usage last,
`data: [DONE]`) holds and its content equals the non-streaming reply for the same request; prefix
caching is reported; a second turn with reasoning, a tool call and its result is accepted; 50
concurrent streams finish and free the KV cache; a client that disconnects mid-stream frees its KV
blocks and the server keeps serving.

The model is random, so its text is noise: the assertions are on structure and types. Where a test
needs content, a logit bias on `<|message|>` makes the reply's first token end the header, so what
follows is final content (greedy: `<|message|>` again and again, shown as text).
"""

from __future__ import annotations

import json
import uuid

import httpx
from openai import OpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.server.conftest import MODEL_NAME, LiveServer, concurrent_chat_streams

FINISH_REASONS = {"stop", "length", "tool_calls"}
USER = [{"role": "user", "content": "Say something."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the weather.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}


# --- helpers -----------------------------------------------------------------------------------------


def sdk(live: LiveServer) -> OpenAI:
    return OpenAI(base_url=live.base_url + "/v1", api_key="x", max_retries=0, timeout=60)


def token_id(live: LiveServer, name: str) -> int:
    return live.services.encoding.token(name)


def force_content(live: LiveServer, bias: float = 5.0) -> dict[str, float]:
    """A logit bias that makes `<|message|>` the reply's first token: what follows is content."""
    return {str(token_id(live, "<|message|>")): bias}


def no_stop_tokens(live: LiveServer) -> dict[str, float]:
    """A logit bias that keeps the model from ending its reply before max_tokens."""
    return {str(t): -100.0 for t in live.services.encoding.assistant_stop_token_ids}


def comparable(choice) -> tuple:
    """What must repeat across runs (tool call ids are random by design)."""
    message = choice.message
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    reasoning = (message.model_extra or {}).get("reasoning_content")
    return (choice.index, message.content, reasoning, calls, choice.finish_reason)


def collect_stream(chunks: list[ChatCompletionChunk]) -> dict[int, dict]:
    """Per choice index: the content, reasoning and finish reasons the chunks carried."""
    out: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            entry = out.setdefault(
                choice.index, {"content": "", "reasoning": "", "finish": [], "roles": []}
            )
            delta = choice.delta
            if delta.role is not None:
                entry["roles"].append(delta.role)
            if delta.content:
                entry["content"] += delta.content
            extra = delta.model_extra or {}
            if extra.get("reasoning_content"):
                entry["reasoning"] += extra["reasoning_content"]
            if choice.finish_reason is not None:
                entry["finish"].append(choice.finish_reason)
    return out


def raw_events(live: LiveServer, body: dict) -> list[str]:
    """The data payloads of a raw SSE stream, in order, checking the framing on the way."""
    payloads = []
    with (
        httpx.Client(base_url=live.base_url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                continue  # the blank line between events
            assert line.startswith("data: "), line
            payloads.append(line[len("data: ") :])
    return payloads


# --- non-streaming ------------------------------------------------------------------------------------


def test_non_streaming_completion_parses_into_sdk_types(live_server: LiveServer) -> None:
    completion = sdk(live_server).chat.completions.create(
        model=MODEL_NAME, messages=USER, max_tokens=16
    )
    assert isinstance(completion, ChatCompletion)
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == MODEL_NAME
    assert isinstance(completion.created, int)
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content is None or isinstance(choice.message.content, str)
    assert choice.finish_reason in FINISH_REASONS
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 1 <= usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens_details is not None
    assert 0 <= usage.completion_tokens_details.reasoning_tokens <= usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert 0 <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


def test_prompt_tokens_match_tokenize(live_server: LiveServer) -> None:
    """The chat prompt the engine sees is exactly what /tokenize reports for the same messages."""
    completion = sdk(live_server).chat.completions.create(
        model=MODEL_NAME, messages=USER, max_tokens=1, reasoning_effort="high"
    )
    tokenized = httpx.post(
        live_server.base_url + "/tokenize", json={"messages": USER, "reasoning_effort": "high"}
    ).json()
    assert completion.usage.prompt_tokens == tokenized["count"]


def test_content_is_returned_when_the_model_writes_final_text(live_server: LiveServer) -> None:
    completion = sdk(live_server).chat.completions.create(
        model=MODEL_NAME,
        messages=USER,
        max_tokens=6,
        temperature=0,
        logit_bias=force_content(live_server),
    )
    choice = completion.choices[0]
    assert isinstance(choice.message.content, str)
    assert choice.message.content  # the biased first token ended the header: text follows
    assert choice.finish_reason == "length"


def test_tools_with_tool_choice_auto(live_server: LiveServer) -> None:
    client = sdk(live_server)
    plain = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=1)
    completion = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, tools=[WEATHER], tool_choice="auto", max_tokens=16
    )
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in FINISH_REASONS
    # The tool is declared in the prompt: it is longer than without tools.
    assert completion.usage.prompt_tokens > plain.usage.prompt_tokens
    for call in choice.message.tool_calls or []:
        assert call.type == "function"
        assert call.id.startswith("call_")
        assert isinstance(call.function.name, str)
        assert isinstance(call.function.arguments, str)


def test_n_two_gives_two_choices(live_server: LiveServer) -> None:
    completion = sdk(live_server).chat.completions.create(
        model=MODEL_NAME, messages=USER, n=2, max_tokens=4
    )
    assert [c.index for c in completion.choices] == [0, 1]
    for choice in completion.choices:
        assert choice.message.role == "assistant"
        assert choice.finish_reason in FINISH_REASONS
    assert completion.usage.completion_tokens <= 8


def test_seed_with_temperature_one_repeats(live_server: LiveServer) -> None:
    client = sdk(live_server)

    def run():
        return client.chat.completions.create(
            model=MODEL_NAME,
            messages=USER,
            n=4,
            seed=1234,
            temperature=1,
            max_tokens=24,
            logit_bias=force_content(live_server, 6.0),
        )

    first, second = run(), run()
    assert [comparable(c) for c in first.choices] == [comparable(c) for c in second.choices]
    assert first.usage.completion_tokens == second.usage.completion_tokens


def test_temperature_zero_is_deterministic(live_server: LiveServer) -> None:
    client = sdk(live_server)
    messages = [{"role": "user", "content": f"greedy {uuid.uuid4().hex}"}]
    runs = [
        client.chat.completions.create(
            model=MODEL_NAME, messages=messages, temperature=0, max_tokens=12
        )
        for _ in range(2)
    ]
    assert comparable(runs[0].choices[0]) == comparable(runs[1].choices[0])
    assert runs[0].usage.completion_tokens == runs[1].usage.completion_tokens


def test_max_tokens_bounds_the_completion(live_server: LiveServer) -> None:
    client = sdk(live_server)
    completion = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=5)
    assert completion.usage.completion_tokens <= 5
    choice = completion.choices[0]
    if completion.usage.completion_tokens < 5:
        assert choice.finish_reason in ("stop", "tool_calls")  # ended by a stop token
    else:
        assert choice.finish_reason in FINISH_REASONS
    # With the stop tokens ruled out, the reply runs to the limit exactly and says so.
    capped = client.chat.completions.create(
        model=MODEL_NAME,
        messages=USER,
        max_tokens=5,
        logit_bias=no_stop_tokens(live_server),
    )
    assert capped.usage.completion_tokens == 5
    assert capped.choices[0].finish_reason == "length"


def test_max_completion_tokens_is_honoured(live_server: LiveServer) -> None:
    completion = sdk(live_server).chat.completions.create(
        model=MODEL_NAME,
        messages=USER,
        max_completion_tokens=3,
        logit_bias=no_stop_tokens(live_server),
    )
    assert completion.usage.completion_tokens == 3
    assert completion.choices[0].finish_reason == "length"


def test_logprobs_field_shape(live_server: LiveServer) -> None:
    # top_logprobs=0: only the sampled tokens (always `<|message|>` here, a token in the vocabulary).
    completion = sdk(live_server).chat.completions.create(
        model=MODEL_NAME,
        messages=USER,
        max_tokens=5,
        temperature=0,
        logit_bias=force_content(live_server),
        logprobs=True,
        top_logprobs=0,
    )
    choice = completion.choices[0]
    assert choice.logprobs is not None
    entries = choice.logprobs.content
    assert entries is not None
    assert choice.message.content
    # One entry per content token: all but the first token, which ended the header.
    assert len(entries) == completion.usage.completion_tokens - 1
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        assert isinstance(entry.token, str)
        assert entry.logprob <= 0.0
        assert bytes(entry.bytes) == entry.token.encode()
        assert entry.top_logprobs == []


def test_logprobs_absent_unless_asked(live_server: LiveServer) -> None:
    completion = sdk(live_server).chat.completions.create(
        model=MODEL_NAME, messages=USER, max_tokens=2
    )
    assert completion.choices[0].logprobs is None


def test_top_logprobs_with_content(live_server: LiveServer) -> None:
    response = httpx.post(
        live_server.base_url + "/v1/chat/completions",
        json={
            "model": MODEL_NAME,
            "messages": USER,
            "max_tokens": 8,
            "temperature": 0,
            "logit_bias": force_content(live_server),
            "logprobs": True,
            "top_logprobs": 20,
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    choice = ChatCompletion.model_validate(response.json()).choices[0]
    assert choice.message.content
    for entry in choice.logprobs.content:
        assert len(entry.top_logprobs) == 20
        assert all(top.logprob <= 0.0 for top in entry.top_logprobs)


def test_streamed_top_logprobs_end_with_done(live_server: LiveServer) -> None:
    payloads = raw_events(
        live_server,
        {
            "model": MODEL_NAME,
            "messages": USER,
            "max_tokens": 8,
            "temperature": 0,
            "logit_bias": force_content(live_server),
            "logprobs": True,
            "top_logprobs": 20,
            "stream": True,
        },
    )
    assert payloads[-1] == "[DONE]"
    finishes = [c["finish_reason"] for p in payloads[:-1] for c in json.loads(p)["choices"]]
    assert [f for f in finishes if f is not None] == ["length"]


def test_stop_string_cuts_content(live_server: LiveServer) -> None:
    # Greedy with the bias, the content is `<|message|>` repeated (shown as text).
    stop = "message|><|mess"
    client = sdk(live_server)
    kwargs = {
        "model": MODEL_NAME,
        "messages": USER,
        "max_tokens": 8,
        "temperature": 0,
        "logit_bias": force_content(live_server),
    }
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    assert full is not None
    assert stop in full
    cut = client.chat.completions.create(**kwargs, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**kwargs, stop=stop, stream=True))
    streamed = collect_stream(chunks)[0]
    assert streamed["content"] == full[: full.index(stop)]
    assert streamed["finish"] == ["stop"]


def test_a_named_tool_choice_forces_that_call(live_server: LiveServer) -> None:
    client = sdk(live_server)
    named = {"type": "function", "function": {"name": "get_weather"}}
    # Greedy: whatever the model's analysis, the grammar makes the reply that call.
    kwargs = {"model": MODEL_NAME, "messages": USER, "tools": [WEATHER], "max_tokens": 400}
    completion = client.chat.completions.create(**kwargs, tool_choice=named, temperature=0)
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments), dict)
    assert completion.choices[0].finish_reason == "tool_calls"
    # Nothing is prefilled: the prompt is what /tokenize (no tool_choice) gives.
    plain = httpx.post(
        f"{live_server.base_url}/tokenize",
        json={"model": MODEL_NAME, "messages": USER, "tools": [WEATHER]},
    ).json()
    assert completion.usage.prompt_tokens == plain["count"]

    chunks = list(
        client.chat.completions.create(**kwargs, tool_choice=named, temperature=0, stream=True)
    )
    heads = [
        tc
        for chunk in chunks
        for choice in chunk.choices
        for tc in choice.delta.tool_calls or []
        if tc.id is not None
    ]
    assert [(tc.index, tc.function.name) for tc in heads] == [(0, "get_weather")]


def test_a_tool_choice_naming_an_undeclared_function_is_a_400(live_server: LiveServer) -> None:
    response = httpx.post(
        f"{live_server.base_url}/v1/chat/completions",
        json={
            "model": MODEL_NAME,
            "messages": USER,
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "send_email"}},
        },
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tool_choice"
    assert "send_email" in error["message"]


def test_tool_choice_required_forces_a_call(live_server: LiveServer) -> None:
    completion = sdk(live_server).chat.completions.create(
        model=MODEL_NAME,
        messages=USER,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=400,
        temperature=0,
    )
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert completion.choices[0].finish_reason == "tool_calls"


# --- streaming ---------------------------------------------------------------------------------------


def test_streaming_chunks_parse_and_are_framed(live_server: LiveServer) -> None:
    client = sdk(live_server)
    kwargs = {
        "model": MODEL_NAME,
        "messages": USER,
        "max_tokens": 10,
        "temperature": 0,
        "logit_bias": force_content(live_server),
    }
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL_NAME for c in chunks)
    # The first chunk opens the assistant's message.
    assert chunks[0].choices[0].delta.role == "assistant"
    # The usage chunk comes last, with no choices; the others carry no usage.
    *body, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    streamed = collect_stream(body)
    assert list(streamed) == [0]
    assert streamed[0]["roles"] == ["assistant"]
    assert len(streamed[0]["finish"]) == 1
    assert body[-1].choices[0].finish_reason == streamed[0]["finish"][0]
    # The same greedy request without streaming gives the same reply and the same usage.
    whole = client.chat.completions.create(**kwargs)
    assert streamed[0]["content"] == whole.choices[0].message.content
    reasoning = (whole.choices[0].message.model_extra or {}).get("reasoning_content")
    assert streamed[0]["reasoning"] == (reasoning or "")
    assert streamed[0]["finish"] == [whole.choices[0].finish_reason]
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert last.usage.completion_tokens_details.reasoning_tokens >= 0
    assert last.usage.prompt_tokens_details.cached_tokens >= 0


def test_streaming_without_usage_has_no_usage_chunk(live_server: LiveServer) -> None:
    chunks = list(
        sdk(live_server).chat.completions.create(
            model=MODEL_NAME, messages=USER, max_tokens=4, stream=True
        )
    )
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks][-1] in FINISH_REASONS


def test_streaming_n_seeded_equals_non_streaming(live_server: LiveServer) -> None:
    """Sixteen seeded choices, streamed interleaved, each equal to the non-streamed one."""
    client = sdk(live_server)
    kwargs = {
        "model": MODEL_NAME,
        "messages": USER,
        "n": 16,
        "seed": 7,
        "temperature": 1,
        "max_tokens": 16,
        "logit_bias": force_content(live_server, 6.0),
    }
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = collect_stream(chunks[:-1])
    assert sorted(streamed) == list(range(16))
    for choice in whole.choices:
        entry = streamed[choice.index]
        assert entry["roles"] == ["assistant"]
        assert entry["finish"] == [choice.finish_reason]
        assert entry["content"] == (choice.message.content or "")
        reasoning = (choice.message.model_extra or {}).get("reasoning_content")
        assert entry["reasoning"] == (reasoning or "")
    # At least one choice wrote content, so the comparison above compared something.
    assert any(c.message.content for c in whole.choices)
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_sse_events(live_server: LiveServer) -> None:
    payloads = raw_events(
        live_server,
        {
            "model": MODEL_NAME,
            "messages": USER,
            "max_tokens": 6,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["id"].startswith("chatcmpl-") for c in chunks)
    finishes: dict[int, list[str]] = {0: [], 1: []}
    for chunk in chunks[:-1]:
        [choice] = chunk["choices"]
        assert set(choice) >= {"index", "delta", "finish_reason"}
        if choice["finish_reason"] is not None:
            finishes[choice["index"]].append(choice["finish_reason"])
    assert all(len(f) == 1 and f[0] in FINISH_REASONS for f in finishes.values())
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] <= 12


# --- prefix caching, conversations --------------------------------------------------------------------


def test_prefix_cache_reports_cached_tokens(live_server: LiveServer) -> None:
    client = sdk(live_server)
    unique = uuid.uuid4().hex
    long_prompt = [{"role": "user", "content": f"{unique} " + "the weather in Paris is " * 60}]
    first = client.chat.completions.create(model=MODEL_NAME, messages=long_prompt, max_tokens=1)
    second = client.chat.completions.create(model=MODEL_NAME, messages=long_prompt, max_tokens=1)
    prompt_tokens = second.usage.prompt_tokens
    assert prompt_tokens == first.usage.prompt_tokens > 300
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    # The unique text was new the first time; the second time most of the prompt is cached.
    assert (
        second.usage.prompt_tokens_details.cached_tokens
        > first.usage.prompt_tokens_details.cached_tokens
    )
    assert prompt_tokens // 2 < second.usage.prompt_tokens_details.cached_tokens < prompt_tokens


def test_second_turn_with_reasoning_and_tool_result(live_server: LiveServer) -> None:
    client = sdk(live_server)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "I should call the tool.",
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp_c": 21}'},
    ]
    completion = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, tools=[WEATHER], max_tokens=8
    )
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason in FINISH_REASONS
    # The history is in the prompt: the tool's result and the call's arguments were rendered.
    tokenized = httpx.post(
        live_server.base_url + "/tokenize", json={"messages": messages, "tools": [WEATHER]}
    ).json()
    assert completion.usage.prompt_tokens == tokenized["count"]
    detokenized = httpx.post(
        live_server.base_url + "/detokenize", json={"tokens": tokenized["tokens"]}
    ).json()["prompt"]
    assert '{"temp_c": 21}' in detokenized
    assert "functions.get_weather" in detokenized
    # The reasoning of the turn in progress (a tool call, not a final answer) is kept.
    assert "I should call the tool." in detokenized


# --- load, disconnects, housekeeping ----------------------------------------------------------------


def test_fifty_concurrent_streams_finish_and_free_the_kv_cache(live_server: LiveServer) -> None:
    results = concurrent_chat_streams(live_server.base_url, 50)
    assert len(results) == 50
    assert all(len(finishes) == 1 and finishes[0] in FINISH_REASONS for finishes in results)
    assert live_server.wait_until(live_server.kv_pools_all_free)


def test_client_disconnect_mid_stream_frees_the_kv_cache(live_server: LiveServer) -> None:
    assert live_server.wait_until(live_server.kv_pools_all_free)
    body = {
        "model": MODEL_NAME,
        "messages": USER,
        "max_tokens": 3000,  # far more than the test waits for
        "logit_bias": no_stop_tokens(live_server),
        "stream": True,
    }
    with (
        httpx.Client(base_url=live_server.base_url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line)
        assert json.loads(first[len("data: ") :])["choices"][0]["delta"]["role"] == "assistant"
        # The request is generating: it holds KV blocks (the stats snapshot lags a step).
        assert live_server.wait_until(lambda: not live_server.kv_pools_all_free())
        assert live_server.wait_until(lambda: live_server.services.engine.stats().running == 1)
    # The client went away: the request is aborted and every block comes back.
    assert live_server.wait_until(live_server.kv_pools_all_free)
    assert live_server.wait_until(lambda: live_server.services.engine.stats().running == 0)
    after = sdk(live_server).chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=2)
    assert after.choices[0].finish_reason in FINISH_REASONS


def test_models_lists_the_served_model(live_server: LiveServer) -> None:
    models = sdk(live_server).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].object == "model"


def test_health(live_server: LiveServer) -> None:
    response = httpx.get(live_server.base_url + "/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
