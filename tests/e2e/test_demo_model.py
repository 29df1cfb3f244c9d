"""End to end: the official openai SDK against the real server serving the bundled demo model.

The server is started as users start it (`python -m server serve`, no `--model`: the demo is the
default) in its own process on loopback. The demo model is really trained (`demo/`), so these
check behaviour, not just shapes: the tool-call round trip (a `tool_calls` entry / a
`function_call` item with JSON arguments that validate against the tool's schema, the tool's
result sent back, a final answer that uses it), streaming and not, chat completions and
responses; reasoning kept apart from the answer; `reasoning_effort` changing the analysis length;
greedy output identical across runs.

What the model gets right is asserted apart from the plumbing: the values it writes (the city in
the arguments, the sum, the temperature from the tool) are checked in tests of their own
(`python -m demo.eval` gives the model's rates over many requests).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from demo.conversations import TOOLS, tool_spec
from server.model_source import DEMO_MODEL_DIR, DEMO_MODEL_NAME
from tests.docker.serving import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
WEATHER_TOOLS = [tool_spec("get_weather"), tool_spec("add")]
WEATHER_RESULT = {"location": "Paris", "temperature": 18, "unit": "celsius", "condition": "sunny"}
QUESTION = "What's the weather in Paris in celsius?"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert (DEMO_MODEL_DIR / "config.json").is_file(), "the demo model must be bundled"
    port = free_port()
    env = {
        **os.environ,
        "GPT_OSS_PORT": str(port),
        "GPT_OSS_STATE_DIR": str(tmp_path_factory.mktemp("e2e-state")),
    }
    env.pop("GPT_OSS_MODEL", None)
    process = subprocess.Popen([sys.executable, "-m", "server", "serve"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, lambda: process.poll() is None, timeout=300)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def check_arguments(name: str, arguments: str) -> dict[str, Any]:
    """The arguments parse as JSON and validate against the tool's schema (required keys present,
    no others, each of its declared type and enum)."""
    parsed = json.loads(arguments)
    schema = TOOLS[name]["parameters"]
    assert isinstance(parsed, dict)
    assert set(schema["required"]) <= parsed.keys() <= schema["properties"].keys()
    python_types = {"string": str, "integer": int}
    for key, value in parsed.items():
        spec = schema["properties"][key]
        assert isinstance(value, python_types[spec["type"]]), (key, value)
        if "enum" in spec:
            assert value in spec["enum"], (key, value)
    return parsed


def reasoning_of(message: Any) -> str:
    extra = message.model_extra or {}
    assert extra.get("reasoning") == extra.get("reasoning_content")
    return extra.get("reasoning") or ""


def test_models_lists_the_demo(client: OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [DEMO_MODEL_NAME]


def test_chat_tool_round_trip(client: OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    first = client.chat.completions.create(
        model=DEMO_MODEL_NAME, messages=messages, tools=WEATHER_TOOLS, temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert call.id.startswith("call_")
    check_arguments("get_weather", call.function.arguments)
    assert reasoning_of(choice.message)  # it thought first, apart from the call

    messages += [
        choice.message,
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(WEATHER_RESULT)},
    ]
    final = client.chat.completions.create(
        model=DEMO_MODEL_NAME, messages=messages, tools=WEATHER_TOOLS, temperature=0
    )
    answer = final.choices[0].message.content
    assert final.choices[0].finish_reason == "stop"
    assert answer and not final.choices[0].message.tool_calls
    # The answer is about the weather: it names the unit's degree sign the tool result implies.
    assert "°C" in answer or "°F" in answer or "weather" in answer.lower()


def weather_round_trip(client: OpenAI) -> tuple[dict[str, Any], str]:
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    first = client.chat.completions.create(
        model=DEMO_MODEL_NAME, messages=messages, tools=WEATHER_TOOLS, temperature=0
    )
    (call,) = first.choices[0].message.tool_calls
    messages += [
        first.choices[0].message,
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(WEATHER_RESULT)},
    ]
    final = client.chat.completions.create(
        model=DEMO_MODEL_NAME, messages=messages, tools=WEATHER_TOOLS, temperature=0
    )
    return json.loads(call.function.arguments), final.choices[0].message.content or ""


def test_chat_tool_round_trip_values(client: OpenAI) -> None:
    arguments, answer = weather_round_trip(client)
    assert arguments == {"location": "Paris", "unit": "celsius"}
    assert "18" in answer and "sunny" in answer


def test_chat_tool_call_streams(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=DEMO_MODEL_NAME,
        messages=[{"role": "user", "content": QUESTION}],
        tools=WEATHER_TOOLS,
        temperature=0,
        stream=True,
    )
    name, arguments, pieces, finish = None, "", 0, None
    for chunk in stream:
        for choice in chunk.choices:
            assert not choice.delta.content
            for tool_call in choice.delta.tool_calls or []:
                assert tool_call.index == 0
                name = name or tool_call.function.name
                arguments += tool_call.function.arguments or ""
                pieces += 1
            finish = choice.finish_reason or finish
    assert name == "get_weather"
    assert pieces > 2, "the arguments stream as they are generated"
    check_arguments("get_weather", arguments)
    assert finish == "tool_calls"


def test_reasoning_arrives_apart_from_the_answer(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model=DEMO_MODEL_NAME,
        messages=[{"role": "user", "content": "What is 23 + 45?"}],
        reasoning_effort="high",
        temperature=0,
    )
    message = completion.choices[0].message
    reasoning = reasoning_of(message)
    assert message.content and reasoning
    assert reasoning not in message.content and "Units:" not in message.content
    assert completion.usage.completion_tokens_details.reasoning_tokens > 0

    stream = client.chat.completions.create(
        model=DEMO_MODEL_NAME,
        messages=[{"role": "user", "content": "What is 23 + 45?"}],
        reasoning_effort="high",
        temperature=0,
        stream=True,
    )
    content, streamed_reasoning = "", ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            streamed_reasoning += (choice.delta.model_extra or {}).get("reasoning") or ""
    assert (content, streamed_reasoning) == (message.content, reasoning)


def test_reasoning_effort_changes_the_analysis_length(client: OpenAI) -> None:
    # Summed over a few questions: one answer's analysis can be short at any effort.
    questions = ("What is 36 + 47?", "Compute 46 - 19.", "What is 7 times 8?", "Add 12 and 30.")
    lengths = {}
    for effort in ("low", "medium", "high"):
        lengths[effort] = 0
        for question in questions:
            completion = client.chat.completions.create(
                model=DEMO_MODEL_NAME,
                messages=[{"role": "user", "content": question}],
                reasoning_effort=effort,
                temperature=0,
            )
            lengths[effort] += completion.usage.completion_tokens_details.reasoning_tokens
    assert lengths["low"] < lengths["medium"] < lengths["high"], lengths


def test_greedy_output_is_identical_across_runs(client: OpenAI) -> None:
    def run() -> tuple:
        completion = client.chat.completions.create(
            model=DEMO_MODEL_NAME,
            messages=[{"role": "user", "content": "Convert 7 kilometers to meters."}],
            temperature=0,
        )
        message = completion.choices[0].message
        return message.content, reasoning_of(message)

    first = run()
    assert first[0] and first[1]
    assert run() == first == run()


def test_arithmetic_values(client: OpenAI) -> None:
    for question, answer in (
        ("What is 23 + 45?", "68"),
        ("Convert 7 kilometers to meters.", "7000"),
    ):
        completion = client.chat.completions.create(
            model=DEMO_MODEL_NAME, messages=[{"role": "user", "content": question}], temperature=0
        )
        assert answer in (completion.choices[0].message.content or "")


def test_responses_tool_round_trip(client: OpenAI) -> None:
    tools = [{"type": "function", "name": "get_weather", **TOOLS["get_weather"]}]
    first = client.responses.create(
        model=DEMO_MODEL_NAME, input=QUESTION, tools=tools, temperature=0
    )
    assert first.status == "completed"
    assert [item.type for item in first.output] == ["reasoning", "function_call"]
    call = first.output[1]
    assert call.name == "get_weather"
    check_arguments("get_weather", call.arguments)
    second = client.responses.create(
        model=DEMO_MODEL_NAME,
        previous_response_id=first.id,
        input=[
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": json.dumps(WEATHER_RESULT),
            }
        ],
        tools=tools,
        temperature=0,
    )
    assert second.status == "completed"
    assert [item.type for item in second.output] == ["reasoning", "message"]
    assert second.output_text


def test_responses_stream_keeps_reasoning_and_answer_apart(client: OpenAI) -> None:
    events = list(
        client.responses.create(
            model=DEMO_MODEL_NAME, input="What is 15 + 27?", temperature=0, stream=True
        )
    )
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    answer = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type == "response.completed"
    assert reasoning and answer and reasoning not in answer
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == answer


def test_raw_sse_stream_ends_with_done(base_url: str) -> None:
    body = {
        "model": DEMO_MODEL_NAME,
        "messages": [{"role": "user", "content": "What is 4 * 6?"}],
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning") or "" for c in chunks[:-1])
    assert content and reasoning
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
