"""A real server with the engine core in its own process (`engine_process=True`, the default).

Proven here, over HTTP on loopback: a streaming and a non-streaming chat completion through the
official `openai` SDK; a constrained one (tool_choice "required": the grammar's vocabulary crossed
into the child); 20 concurrent streams complete; a client that disconnects mid-stream has
its request aborted and every KV block back (read from the engine's stats, the parent's only view
of the child's cache); a SIGKILLed engine process ends open streams with an error event, turns
`/health` to 503 and new requests to a 503 error envelope while the server process stays up; a
clean shutdown leaves no engine process alive.

The fixture servers of the other server tests run the engine in a thread (they start faster);
these two servers start a child each (seconds: it imports torch and loads the model).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable

import httpx
import pytest
from openai import OpenAI

from engine.engine_process import ProcessEngine
from tests.server.conftest import MODEL_NAME, LiveServer, concurrent_chat_streams

USER = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def process_server(make_server: Callable[..., LiveServer]) -> LiveServer:
    live = make_server(engine_process=True)
    assert isinstance(live.services.engine, ProcessEngine)
    return live


def sdk(live: LiveServer) -> OpenAI:
    return OpenAI(base_url=live.base_url + "/v1", api_key="x", max_retries=0, timeout=60)


def engine_pid(live: LiveServer) -> int:
    pid = live.services.engine.pid
    assert pid is not None and pid != os.getpid()
    return pid


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_chat_completions_streaming_and_not_through_the_sdk(process_server: LiveServer) -> None:
    client = sdk(process_server)
    whole = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, max_tokens=12, temperature=0
    )
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 12
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=USER,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # same greedy run
    assert httpx.get(process_server.base_url + "/health").json() == {"status": "ok"}


def test_a_constrained_request_runs_in_the_engine_process(process_server: LiveServer) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    completion = sdk(process_server).chat.completions.create(
        model=MODEL_NAME,
        messages=USER,
        tools=[tool],
        tool_choice="required",
        max_tokens=400,
        temperature=0,
    )
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments), dict)


def test_20_concurrent_streams_complete(process_server: LiveServer) -> None:
    results = concurrent_chat_streams(process_server.base_url, 20)
    assert len(results) == 20
    assert all(len(f) == 1 and f[0] in ("stop", "length") for f in results)
    assert process_server.wait_until(process_server.kv_pools_all_free)


def test_a_client_disconnect_mid_stream_frees_every_block(process_server: LiveServer) -> None:
    live = process_server
    assert live.wait_until(live.kv_pools_all_free)
    body = {"model": MODEL_NAME, "prompt": "Once upon", "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", live.base_url + "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
        assert live.wait_until(lambda: live.services.engine.stats().running == 1)
        assert not live.kv_pools_all_free()
    # The client went away: the request is aborted in the child and every block comes back.
    assert live.wait_until(live.kv_pools_all_free)
    assert live.services.engine.stats().running == 0
    assert live.services.engine.stats().generated_tokens_total < 3000 + 200  # not run out


def test_a_killed_engine_process_fails_streams_and_the_server_answers_503(
    make_server: Callable[..., LiveServer],
) -> None:
    live = make_server(engine_process=True)
    pid = engine_pid(live)
    body = {"model": MODEL_NAME, "prompt": "Once upon", "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", live.base_url + "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = (line for line in response.iter_lines() if line)
        assert next(lines).startswith("data: {")
        os.kill(pid, signal.SIGKILL)
        rest = list(lines)  # the stream ends (no hang): an in-band error event, then [DONE]
    errors = [json.loads(line[6:]) for line in rest if line.startswith('data: {"error"')]
    assert errors and "EngineDeadError" in errors[0]["error"]["message"]
    assert rest[-1] == "data: [DONE]"

    health = httpx.get(live.base_url + "/health")
    assert health.status_code == 503
    assert health.json()["status"] == "error"
    assert "engine process died" in health.json()["error"]["message"]
    for path, request in (
        ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}),
        ("/v1/chat/completions", {"model": MODEL_NAME, "messages": USER, "max_tokens": 2}),
    ):
        refused = httpx.post(live.base_url + path, json=request)
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "server_error"
        assert "engine process died" in refused.json()["error"]["message"]
    assert live.thread.is_alive()  # the server process and its loop are still up
    assert httpx.get(live.base_url + "/v1/models").status_code == 200


def test_a_killed_engine_process_ends_a_chat_stream_with_an_error_not_a_stop(
    make_server: Callable[..., LiveServer],
) -> None:
    live = make_server(engine_process=True)
    pid = engine_pid(live)
    no_stop = {str(live.services.encoding.token(n)): -100 for n in ("<|return|>", "<|call|>")}
    body = {
        "model": MODEL_NAME,
        "messages": USER,
        "max_tokens": 3000,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": no_stop,
    }
    with httpx.stream("POST", live.base_url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = (line for line in response.iter_lines() if line)
        assert next(lines).startswith("data: {")
        os.kill(pid, signal.SIGKILL)
        rest = list(lines)
    events = [json.loads(line[6:]) for line in rest if line != "data: [DONE]"]
    errors = [e for e in events if "error" in e]
    assert errors and "EngineDeadError" in errors[0]["error"]["message"]
    finishes = [c["finish_reason"] for e in events for c in e.get("choices", [])]
    assert "stop" not in finishes
    assert not any(e.get("usage") for e in events)
    assert rest[-1] == "data: [DONE]"


def test_a_clean_shutdown_leaves_no_engine_process(
    make_server: Callable[..., LiveServer],
) -> None:
    live = make_server(engine_process=True)
    pid = engine_pid(live)
    assert sdk(live).completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).choices
    live.server.should_exit = True
    live.thread.join(timeout=30)
    assert not live.thread.is_alive()
    assert not process_exists(pid)
    assert not live.services.engine.alive
