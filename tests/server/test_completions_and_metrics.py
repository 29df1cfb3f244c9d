"""POST /v1/completions and GET /metrics against a live server on the tiny random model.

The model is random, so tests assert structure, lengths and self-consistency (greedy decoding is
deterministic: a second run reproduces the first), never particular text.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import openai
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import RequestMetrics, ServerMetrics, metrics_of
from tests.server.conftest import MODEL_NAME, LiveServer

PROMPT = "<|start|>user<|message|>the weather in Paris<|end|><|start|>assistant"


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0)


def _post(server: LiveServer, body: dict, **kwargs: object) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/completions", json=body, timeout=60, **kwargs)


def _complete(server: LiveServer, **fields: object) -> dict:
    response = _post(server, {"model": MODEL_NAME, "prompt": PROMPT, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def _sse_data(server: LiveServer, body: dict) -> list[str]:
    with httpx.stream(
        "POST", server.base_url + "/v1/completions", json=body, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def _metrics(server: LiveServer, **kwargs: object) -> dict[str, float]:
    response = httpx.get(server.base_url + "/metrics", timeout=10, **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        sample.name + json.dumps(sample.labels, sort_keys=True) if sample.labels else sample.name: (
            sample.value
        )
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


# --- completions ---------------------------------------------------------------------------------


def test_non_streaming_with_the_sdk(client: openai.OpenAI, live_server: LiveServer) -> None:
    completion = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, user="u-1"
    )
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.model == MODEL_NAME
    [choice] = completion.choices
    assert choice.index == 0 and choice.finish_reason == "length"
    assert isinstance(choice.text, str) and choice.logprobs is None
    prompt_ids = live_server.services.encoding.encode_with_special_tokens(PROMPT)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == len(prompt_ids) + 8


def test_max_tokens_defaults_to_16(live_server: LiveServer) -> None:
    assert _complete(live_server, temperature=0)["usage"]["completion_tokens"] == 16


def test_streaming_with_the_sdk_matches_non_streaming(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_ends_with_done(live_server: LiveServer) -> None:
    data = _sse_data(
        live_server, {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 5, "stream": True}
    )
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert {e["object"] for e in events} == {"text_completion"}
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in events[0]


def test_token_id_prompt(live_server: LiveServer) -> None:
    ids = live_server.services.encoding.encode_with_special_tokens(PROMPT)
    by_ids = _complete(live_server, prompt=ids, max_tokens=6, temperature=0)
    by_text = _complete(live_server, max_tokens=6, temperature=0)
    assert by_ids["usage"]["prompt_tokens"] == len(ids)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]


def test_batched_prompts_and_n(live_server: LiveServer) -> None:
    result = _complete(live_server, prompt=["first", "second one"], n=2, max_tokens=3, seed=7)
    assert [c["index"] for c in result["choices"]] == [0, 1, 2, 3]
    encode = live_server.services.encoding.encode_with_special_tokens
    assert result["usage"]["prompt_tokens"] == len(encode("first")) + len(encode("second one"))
    assert result["usage"]["completion_tokens"] == 4 * 3


def test_n_2(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, seed=1
    )
    assert sorted(c.index for c in completion.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in completion.choices)
    assert completion.usage is not None and completion.usage.completion_tokens == 12


def test_n_2_streaming(live_server: LiveServer) -> None:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "n": 2, "stream": True}
    events = [json.loads(d) for d in _sse_data(live_server, body)[:-1]]
    finished = [e["choices"][0]["index"] for e in events if e["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1]


def _stop_case(live_server: LiveServer) -> tuple[str, str]:
    """A stop string taken from the middle of a greedy output, and the text cut before it."""
    text = _complete(live_server, max_tokens=40, temperature=0)["choices"][0]["text"]
    assert len(text) >= 12, text
    stop = text[6:9]
    return stop, text[: text.index(stop)]


def test_stop_string_cuts_the_text_exactly(live_server: LiveServer) -> None:
    stop, expected = _stop_case(live_server)
    result = _complete(live_server, max_tokens=40, temperature=0, stop=[stop])
    [choice] = result["choices"]
    assert choice["text"] == expected
    assert choice["finish_reason"] == "stop"
    assert result["usage"]["completion_tokens"] < 40


def test_stop_string_cuts_the_stream_exactly(live_server: LiveServer) -> None:
    stop, expected = _stop_case(live_server)
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    data = _sse_data(live_server, {**body, "stop": stop, "stream": True})
    events = [json.loads(d) for d in data[:-1]]
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == expected
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert live_server.wait_until(live_server.kv_pools_all_free)


def test_stop_token_ids_end_without_showing_the_token(live_server: LiveServer) -> None:
    forced = live_server.services.encoding.encode("A")[0]
    result = _complete(
        live_server,
        max_tokens=10,
        logit_bias={str(forced): 100},
        stop_token_ids=[forced],
    )
    [choice] = result["choices"]
    assert choice["finish_reason"] == "stop" and choice["text"] == ""
    assert result["usage"]["completion_tokens"] == 1


def test_logprobs_cover_every_token(live_server: LiveServer) -> None:
    result = _complete(live_server, max_tokens=5, temperature=0, logprobs=2)
    logprobs = result["choices"][0]["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 5
    assert all(1 <= len(top) <= 3 for top in logprobs["top_logprobs"])
    assert all(lp <= 0 for lp in logprobs["token_logprobs"])
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert logprobs["text_offset"][0] == 0


def test_streamed_logprobs_match_and_stop_at_the_cut(live_server: LiveServer) -> None:
    stop, expected = _stop_case(live_server)
    body = {"max_tokens": 40, "temperature": 0, "logprobs": 1, "stop": stop}
    whole = _complete(live_server, **body)["choices"][0]
    logprobs = whole["logprobs"]
    assert whole["text"] == expected
    assert logprobs["tokens"] and all(o < len(expected) for o in logprobs["text_offset"])
    data = _sse_data(live_server, {"model": MODEL_NAME, "prompt": PROMPT, "stream": True, **body})
    streamed: dict[str, list] = {key: [] for key in logprobs}
    for event in map(json.loads, data[:-1]):
        for key, values in event["choices"][0]["logprobs"].items():
            streamed[key].extend(values)
    assert streamed == logprobs


def test_echo_prepends_the_prompt(live_server: LiveServer) -> None:
    result = _complete(live_server, prompt="hello there", max_tokens=3, echo=True)
    assert result["choices"][0]["text"].startswith("hello there")


def test_client_disconnect_frees_the_kv_cache(live_server: LiveServer) -> None:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", live_server.base_url + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    assert live_server.wait_until(live_server.kv_pools_all_free)


@pytest.mark.parametrize(
    ("fields", "status", "param", "snippet"),
    [
        ({"model": "gpt-5"}, 404, "model", "does not exist"),
        ({"bogus_field": 1}, 400, "bogus_field", "bogus_field"),
        ({"max_tokens": 10**6}, 400, "max_tokens", "max_tokens"),
        ({"stop": ""}, 400, "stop", "empty"),
        ({"echo": True, "logprobs": 1}, 400, "echo", "echo"),
        ({"suffix": "x"}, 400, "suffix", "suffix"),
        ({"prompt": []}, 400, "prompt", "empty"),
        ({"prompt": [10**7]}, 400, "prompt", "vocabulary"),
        ({"n": 1000}, 400, "n", "n must be"),
    ],
)
def test_errors(
    live_server: LiveServer, fields: dict, status: int, param: str, snippet: str
) -> None:
    response = _post(live_server, {"model": MODEL_NAME, "prompt": PROMPT, **fields})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and snippet in error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"


def test_unknown_model_with_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="nope", prompt="hi")
    assert caught.value.code == "model_not_found"


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_count_completions_and_show_the_engine(live_server: LiveServer) -> None:
    before = _metrics(live_server)
    _complete(live_server, max_tokens=4, temperature=0)
    _sse_data(live_server, {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "stream": True})
    after = _metrics(live_server)
    grown = {
        "gptoss_prompt_tokens_total",
        "gptoss_generation_tokens_total",
        "gptoss_time_to_first_token_seconds_count",
        "gptoss_inter_token_latency_seconds_count",
    }
    for name in grown:
        assert after[name] > before.get(name, 0.0), name
    assert after["gptoss_generation_tokens_total"] - before.get(
        "gptoss_generation_tokens_total", 0.0
    ) == pytest.approx(8)
    assert after["gptoss_time_to_first_token_seconds_count"] - before.get(
        "gptoss_time_to_first_token_seconds_count", 0.0
    ) == pytest.approx(2)
    for gauge in (
        "gptoss_requests_running",
        "gptoss_requests_waiting",
        "gptoss_kv_cache_usage_ratio",
        "gptoss_prefix_cache_hit_ratio",
    ):
        assert gauge in after, gauge
    assert 0 <= after["gptoss_kv_cache_usage_ratio"] <= 1
    assert 0 < after["gptoss_prefix_cache_hit_ratio"] <= 1  # the same prompt, again and again


def test_metrics_need_the_key_only_when_protected(make_server: Callable[..., LiveServer]) -> None:
    protected = make_server(api_key="k", protect_metrics=True)
    assert httpx.get(protected.base_url + "/metrics").status_code == 401
    bad = httpx.get(protected.base_url + "/metrics", headers={"Authorization": "Bearer x"})
    assert bad.status_code == 401
    assert _metrics(protected, headers={"Authorization": "Bearer k"})
    open_metrics = make_server(api_key="k")
    assert _metrics(open_metrics)
    completions = _post(open_metrics, {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1})
    assert completions.status_code == 401  # /v1 still needs the key


def test_request_middleware_counts_by_route_and_status() -> None:
    app = FastAPI()
    app.add_middleware(RequestMetrics)

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict:
        return {"id": item_id}

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            for path in ("/items/1", "/items/2", "/items/x", "/nowhere"):
                await http.get(path)

    asyncio.run(run())
    metrics = metrics_of(app)
    assert isinstance(metrics, ServerMetrics)
    samples = {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(metrics.render(None).decode())
        for s in family.samples
        if s.name == "gptoss_requests_total"
    }
    assert samples == {
        ("/items/{item_id}", "200"): 2,
        ("/items/{item_id}", "422"): 1,
        ("other", "404"): 1,
    }
