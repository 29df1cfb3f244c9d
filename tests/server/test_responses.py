"""The Responses API (`/v1/responses`): request mapping, output items and events, store, endpoints.

- Pure parts: input items -> chat messages (the table in `server.protocol.responses`); chat deltas
  -> output items and stream events, each event and item validated strictly by the official SDK's
  types, and the items replayed as input map back to the chat message they came from.
- The store: a second store object on the same directory reads what the first wrote; retention by
  count and by age on insert; delete.
- A real server (the tiny random model, so text is noise: assertions are on structure): string and
  item inputs, function-call round trips, typed SDK parsing of the response and of every streaming
  event, sequence numbers and event order, `previous_response_id` replay (exact prompt size, and
  instructions not carried over), background runs polled and cancelled, delete, and the 4xx cases.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import (
    Response,
    ResponseCreatedEvent,
    ResponseInProgressEvent,
    ResponseOutputItem,
    ResponseStreamEvent,
)
from pydantic import TypeAdapter

from engine.engine import RequestOutput
from engine.sampler import SamplingParams
from server.errors import InvalidRequestError
from server.harmony_output import ChatDelta, ToolCallDelta
from server.protocol.responses import (
    OutputItems,
    ResponsesRequest,
    items_to_chat_messages,
    response_object,
)
from server.routes.responses import Run, _events
from server.routes.tokenize import ChatPrompt
from server.store import ResponseStore
from tests.harmony.synthetic_vocab import synthetic_encoding
from tests.server.conftest import MODEL_NAME, LiveServer

EVENT = TypeAdapter(ResponseStreamEvent)
ITEM = TypeAdapter(ResponseOutputItem)
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}
CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"}
CALL_OUTPUT = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}


@pytest.fixture
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0)


def post(live_server: LiveServer, **body: Any) -> httpx.Response:
    body = {"model": MODEL_NAME, "max_output_tokens": 8, **body}
    return httpx.post(live_server.base_url + "/v1/responses", json=body, timeout=60)


def sse_events(live_server: LiveServer, **body: Any) -> list[tuple[str, dict]]:
    body = {"model": MODEL_NAME, "max_output_tokens": 12, "stream": True, **body}
    events, name = [], None
    with httpx.stream("POST", live_server.base_url + "/v1/responses", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


# --- input items -> chat messages -------------------------------------------------------------------


def test_items_map_to_chat_messages() -> None:
    items = [
        {"role": "system", "content": "be brief"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "think"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "p"}]},
        CALL,
        {**CALL, "call_id": "call_2"},
        CALL_OUTPUT,
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "s"}], "content": None},
        {"type": "message", "role": "assistant", "content": "done"},
        {"type": "message", "role": "assistant", "content": "again"},
    ]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    assert items_to_chat_messages(items, "rules") == [
        {"role": "developer", "content": "rules"},
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "p",
            "reasoning": "think",
            "tool_calls": [{"id": "call_1", **call}, {"id": "call_2", **call}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "done", "reasoning": "s"},
        {"role": "assistant", "content": "again"},
    ]


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"type": "item_reference", "id": "x"}, "input[0].type"),
        ({"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}, "input[0]"),
        ({"role": "robot", "content": "x"}, "input[0].role"),
        ({**CALL, "arguments": {}}, "input[0].arguments"),
    ],
)
def test_bad_items_are_refused_by_name(item: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        items_to_chat_messages([item])
    assert info.value.param is not None and info.value.param.startswith(param)


# --- chat deltas -> output items and events ---------------------------------------------------------


def test_output_items_and_events_are_what_the_sdk_expects() -> None:
    builder = OutputItems()
    events = builder.feed([ChatDelta(reasoning="hmm"), ChatDelta(reasoning=" ok")])
    events += builder.feed(
        [
            ChatDelta(content="Let me check."),
            ChatDelta(tool_call=ToolCallDelta(0, "call_a", "get_weather", "")),
            ChatDelta(tool_call=ToolCallDelta(0, None, None, '{"city":')),
        ]
    )
    events += builder.feed([ChatDelta(tool_call=ToolCallDelta(0, None, None, '"Paris"}'))])
    events += builder.feed([ChatDelta(tool_call=ToolCallDelta(1, "call_b", "get_weather", "{}"))])
    events += builder.close()
    for n, event in enumerate(events):
        EVENT.validate_python({**event, "sequence_number": n})  # strict: every required field
    types = [e["type"].removeprefix("response.") for e in events]
    assert types == [
        *("output_item.added", "content_part.added"),
        *("reasoning_text.delta", "reasoning_text.delta", "reasoning_text.done"),
        *("content_part.done", "output_item.done"),
        *("output_item.added", "content_part.added", "output_text.delta", "output_text.done"),
        *("content_part.done", "output_item.done"),
        *("output_item.added", "function_call_arguments.delta", "function_call_arguments.delta"),
        *("function_call_arguments.done", "output_item.done"),
        *("output_item.added", "function_call_arguments.delta", "function_call_arguments.done"),
        "output_item.done",
    ]
    items = builder.items
    assert [ITEM.validate_python(i).type for i in items] == [
        *("reasoning", "message", "function_call", "function_call")
    ]
    assert [i["id"][:3] for i in items] == ["rs_", "msg", "fc_", "fc_"]
    assert items[0]["content"] == [{"type": "reasoning_text", "text": "hmm ok"}]
    assert items[1]["content"][0]["text"] == "Let me check."
    assert (items[2]["call_id"], items[2]["arguments"]) == ("call_a", '{"city":"Paris"}')
    assert all(i["status"] == "completed" for i in items)
    # Replayed as input, the output is the chat message it came from.
    [message] = items_to_chat_messages(items)
    assert message["reasoning"] == "hmm ok"
    assert message["content"] == "Let me check."
    assert [c["id"] for c in message["tool_calls"]] == ["call_a", "call_b"]


# --- a run against a scripted engine ----------------------------------------------------------------

SYN = synthetic_encoding()
REASON_THEN_CALL = (
    "<|channel|>analysis<|message|>think<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city":"Paris"}<|call|>'
)


def scripted_run(steps: list[tuple[str, str | None, str | None]]) -> list[dict]:
    """Run `_events` on an engine that writes these (text, finish_reason, error) steps."""

    async def generate(prompt: list[int], params: SamplingParams, request_id: str):
        for n, (text, finish, error) in enumerate(steps, 1):
            ids = tuple(SYN.encode_with_special_tokens(text))
            yield RequestOutput(request_id, ids, None, len(prompt), 2, 5 * n, finish, error)  # type: ignore[arg-type]

    async def collect(events: AsyncIterator[dict]) -> list[dict]:
        return [event async for event in events]

    body = ResponsesRequest(model=MODEL_NAME, input="x")
    response = response_object(
        body, response_id="resp_t", created_at=0, model=MODEL_NAME, status="in_progress", output=[]
    )
    run = Run(response, [], ChatPrompt([1, 2, 3], []), SamplingParams(), None)
    svc = SimpleNamespace(encoding=SYN, engine=SimpleNamespace(generate=generate))
    return asyncio.run(collect(_events(run, svc)))  # type: ignore[arg-type]


def test_a_scripted_reply_becomes_reasoning_and_a_call() -> None:
    half = len(REASON_THEN_CALL) // 2
    events = scripted_run(
        [(REASON_THEN_CALL[:half], None, None), (REASON_THEN_CALL[half:], "stop", None)]
    )
    for event in events:
        EVENT.validate_python(event)
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed" and final["status"] == "completed"
    reasoning, call = final["output"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "think"}]
    assert (call["name"], call["arguments"]) == ("get_weather", '{"city":"Paris"}')
    assert call["call_id"].startswith("call_")
    assert final["usage"]["output_tokens"] == 10
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 2
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] > 0


def test_an_engine_error_fails_the_response() -> None:
    events = scripted_run([("<|channel|>final<|message|>par", "error", "boom")])
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": "boom"}
    EVENT.validate_python(events[-1])


def test_a_cut_reply_is_incomplete() -> None:
    events = scripted_run([("<|channel|>final<|message|>partial answ", "length", None)])
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete"
    assert final["output"][0]["content"][0]["text"] == "partial answ"


# --- the store ---------------------------------------------------------------------------------------


def test_store_survives_a_new_store_object(tmp_path: Path) -> None:
    first = ResponseStore(tmp_path)
    first.put("resp_1", {"response": {"id": "resp_1"}, "items": []}, time.time())
    first.close()
    second = ResponseStore(tmp_path)
    assert second.get("resp_1") == {"response": {"id": "resp_1"}, "items": []}
    with sqlite3.connect(second.path) as db:  # WAL is a property of the file
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert second.delete("resp_1") and not second.delete("resp_1")
    assert second.get("resp_1") is None


def test_store_retention_by_count_and_age(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path, max_count=3, max_age_s=100)
    now = time.time()
    for i in range(5):
        store.put(f"r{i}", {"n": i}, now + i)
    assert store.count() == 3
    assert [store.get(f"r{i}") is not None for i in range(5)] == [False, False, True, True, True]
    store.put("r2", {"n": 22}, now + 2)  # a replacement is no insert: nothing is evicted
    assert store.count() == 3 and store.get("r2") == {"n": 22}
    store.put("old", {"n": -1}, now - 1000)
    assert store.get("old") is None  # too old to read even before the next insert prunes it
    store.put("new", {"n": 9}, now + 9)
    assert store.count() == 3 and store.get("new") is not None


# --- the live server ---------------------------------------------------------------------------------


def test_string_input(client: openai.OpenAI, live_server: LiveServer) -> None:
    response = client.responses.create(model=MODEL_NAME, input="Hello", max_output_tokens=8)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    if response.status == "incomplete":
        assert response.incomplete_details and response.incomplete_details.reason == (
            "max_output_tokens"
        )
    usage = response.usage
    assert usage is not None and usage.input_tokens > 0 and 0 < usage.output_tokens <= 8
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens >= 0
    assert usage.output_tokens_details.reasoning_tokens >= 0
    assert isinstance(response.output_text, str)
    raw = post(live_server, input="Hello")
    Response.model_validate(raw.json())  # strict: every required field present and typed


def test_one_output_token_is_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL_NAME, input="Hello", max_output_tokens=1)
    assert response.status == "incomplete"
    assert response.incomplete_details and response.incomplete_details.reason == "max_output_tokens"


def test_item_input_with_a_function_call_round_trip(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL_NAME,
        instructions="Use the tools.",
        input=[
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "I should call the tool."}],
            },
            CALL,
            CALL_OUTPUT,
        ],
        tools=[TOOL],
        tool_choice="auto",
        reasoning={"effort": "low"},
        text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        max_output_tokens=8,
        temperature=0.7,
        top_p=0.9,
        metadata={"k": "v"},
        parallel_tool_calls=False,
        user="u",
        truncation="disabled",
        include=["reasoning.encrypted_content"],
        service_tier="auto",
    )
    assert response.status in ("completed", "incomplete")
    assert response.tools[0].type == "function" and response.tools[0].name == "get_weather"
    assert response.metadata == {"k": "v"} and response.parallel_tool_calls is False


def test_streaming_events_are_typed_numbered_and_ordered(client: openai.OpenAI) -> None:
    stream = client.responses.create(
        model=MODEL_NAME, input="Hi", max_output_tokens=16, stream=True
    )
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert isinstance(events[0], ResponseCreatedEvent)
    assert isinstance(events[1], ResponseInProgressEvent)
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert all(e.response.id == events[0].response.id for e in (events[0], events[1], events[-1]))
    final = events[-1].response
    assert final.usage is not None and final.usage.output_tokens > 0
    added = [e.item.id for e in events if e.type == "response.output_item.added"]
    done = [e.item.id for e in events if e.type == "response.output_item.done"]
    assert added == done == [item.id for item in final.output]


def test_raw_sse_matches_the_event_names(live_server: LiveServer) -> None:
    events = sse_events(live_server, input="Hi")
    for name, data in events:
        assert name == data["type"]
        EVENT.validate_python(data)
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    # Within an item: added first, done last, deltas between.
    open_items: set[int] = set()
    for _, data in events[2:-1]:
        index = data["output_index"]
        if data["type"] == "response.output_item.added":
            open_items.add(index)
        else:
            assert index in open_items
        if data["type"] == "response.output_item.done":
            open_items.remove(index)
    assert not open_items


def test_the_sdk_stream_helper_accumulates(client: openai.OpenAI) -> None:
    # The helper checks each event against its snapshot (raising on a mismatch); it builds a final
    # response only from response.completed, which the random model may not reach.
    with client.responses.stream(model=MODEL_NAME, input="Hi", max_output_tokens=16) as stream:
        events = list(stream)
        if events[-1].type == "response.completed":
            assert stream.get_final_response().id == events[0].response.id
    assert events[-1].type in ("response.completed", "response.incomplete")


def test_previous_response_replays_items_without_instructions(
    client: openai.OpenAI, live_server: LiveServer
) -> None:
    first = client.responses.create(
        model=MODEL_NAME, input="Hello", instructions="Speak like a pirate.", max_output_tokens=12
    )
    second = client.responses.create(
        model=MODEL_NAME, previous_response_id=first.id, input="Again", max_output_tokens=4
    )
    assert second.previous_response_id == first.id
    third = client.responses.create(
        model=MODEL_NAME, previous_response_id=second.id, input="More", max_output_tokens=4
    )
    assert second.usage and third.usage
    assert third.usage.input_tokens > second.usage.input_tokens
    # The exact prompt: the first input and output, the new input, and no instructions.
    items = [
        {"role": "user", "content": "Hello"},
        *(item.model_dump(exclude_none=True) for item in first.output),
        {"role": "user", "content": "Again"},
    ]
    tokenized = httpx.post(
        live_server.base_url + "/tokenize",
        json={"messages": items_to_chat_messages(items)},
        timeout=30,
    ).json()
    assert second.usage.input_tokens == tokenized["count"]


def test_replay_of_a_stored_turn_with_reasoning_and_calls(
    client: openai.OpenAI, live_server: LiveServer
) -> None:
    """A stored turn's input and output items (a call among them) are replayed exactly, without
    its instructions (the model's own output is noise, so this turn is written to the store)."""
    client.responses.create(model=MODEL_NAME, input="Hi", max_output_tokens=1)  # opens the store
    store: ResponseStore = live_server.app.state.response_store  # type: ignore[attr-defined]
    output = [
        {"type": "reasoning", "id": "rs_1", "summary": [], "status": "completed",
         "content": [{"type": "reasoning_text", "text": "Call the tool."}]},
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {**CALL, "id": "fc_1", "status": "completed"},
    ]  # fmt: skip
    items = [{"type": "message", "role": "user", "content": "Weather in Paris?"}]
    response = {
        "id": "resp_seeded",
        "status": "completed",
        "instructions": "Be a pirate.",
        "output": output,
    }
    store.put("resp_seeded", {"response": response, "items": items}, time.time())
    follow_up = client.responses.create(
        model=MODEL_NAME,
        previous_response_id="resp_seeded",
        input=[CALL_OUTPUT],
        tools=[TOOL],
        max_output_tokens=2,
    )
    messages = items_to_chat_messages([*items, *output, CALL_OUTPUT])
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    tokenized = httpx.post(
        live_server.base_url + "/tokenize",
        json={"messages": messages, "tools": [{"type": "function", "function": {
            k: TOOL[k] for k in ("name", "description", "parameters")}}]},
        timeout=30,
    ).json()  # fmt: skip
    assert follow_up.usage is not None and follow_up.usage.input_tokens == tokenized["count"]


def test_follow_up_after_a_function_call(client: openai.OpenAI) -> None:
    """The call in the first request's items is replayed, so the output's call_id matches it."""
    first = client.responses.create(
        model=MODEL_NAME,
        input=[{"role": "user", "content": "Weather?"}, CALL],
        tools=[TOOL],
        max_output_tokens=4,
    )
    second = client.responses.create(
        model=MODEL_NAME,
        previous_response_id=first.id,
        input=[CALL_OUTPUT],
        tools=[TOOL],
        max_output_tokens=4,
    )
    assert second.status in ("completed", "incomplete")


def test_not_stored_responses_cannot_be_read_or_continued(
    client: openai.OpenAI, live_server: LiveServer
) -> None:
    response = client.responses.create(
        model=MODEL_NAME, input="Hi", store=False, max_output_tokens=4
    )
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    assert post(live_server, input="x", previous_response_id=response.id).status_code == 404


def test_retrieve_and_delete(client: openai.OpenAI, live_server: LiveServer) -> None:
    response = client.responses.create(model=MODEL_NAME, input="Hi", max_output_tokens=4)
    assert client.responses.retrieve(response.id).model_dump() == response.model_dump()
    deleted = httpx.delete(f"{live_server.base_url}/v1/responses/{response.id}", timeout=10)
    assert deleted.json() == {"id": response.id, "object": "response.deleted", "deleted": True}
    got = httpx.get(f"{live_server.base_url}/v1/responses/{response.id}", timeout=10)
    assert got.status_code == 404 and got.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)


def test_background_runs_detached_and_is_polled(client: openai.OpenAI) -> None:
    started = time.monotonic()
    response = client.responses.create(
        model=MODEL_NAME, input="Hi", background=True, max_output_tokens=64
    )
    assert response.status in ("queued", "in_progress") and response.background
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 30
    while response.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.05)
        response = client.responses.retrieve(response.id)
    assert response.status in ("completed", "incomplete")
    assert response.usage is not None and response.usage.output_tokens > 0


def test_background_stream(live_server: LiveServer) -> None:
    events = sse_events(live_server, input="Hi", background=True)
    assert events[0][0] == "response.created" and events[0][1]["response"]["status"] == "queued"
    assert events[-1][0] in ("response.completed", "response.incomplete")
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))


def test_cancel_a_background_response(client: openai.OpenAI, live_server: LiveServer) -> None:
    response = client.responses.create(
        model=MODEL_NAME, input="Hi", background=True, max_output_tokens=3000
    )
    cancelled = client.responses.cancel(response.id)
    if cancelled.status == "completed":  # the random model may hit a stop token at once (~1%)
        pytest.skip("the random model finished before the cancel arrived")
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(response.id).status == "cancelled"
    assert live_server.wait_until(live_server.kv_pools_all_free, timeout=10)
    assert client.responses.cancel(response.id).status == "cancelled"  # idempotent


def test_cancel_needs_a_background_response(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL_NAME, input="Hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(response.id)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"input": "x", "previous_response_id": "resp_nope"}, 404, "resp_nope"),
        ({"input": "x", "frobnicate": 1}, 400, "frobnicate"),
        ({"input": "x", "model": "nope"}, 404, "nope"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "web_search"),
        ({"input": "x", "text": {"format": {"type": "json_schema"}}}, 400, "name"),
        ({"input": "x", "background": True, "store": False}, 400, "stored"),
        ({"input": "x", "conversation": "c"}, 400, "conversation"),
        ({"input": [{"type": "function_call_output", "call_id": "zz", "output": "o"}]}, 400, "zz"),
    ],
)
def test_refusals(live_server: LiveServer, body: dict, status: int, words: str) -> None:
    response = post(live_server, **body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"]


def test_unknown_ids_are_404(live_server: LiveServer) -> None:
    for method, path in [("GET", ""), ("DELETE", ""), ("POST", "/cancel")]:
        url = f"{live_server.base_url}/v1/responses/resp_missing{path}"
        response = httpx.request(method, url, timeout=10)
        assert response.status_code == 404 and "resp_missing" in response.json()["error"]["message"]


def test_a_named_tool_choice_forces_that_function_call(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL_NAME,
        input="Weather in Paris?",
        tools=[TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=400,
        temperature=0,
        store=False,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert [call.name for call in calls] == ["get_weather"]
    assert calls[0].call_id.startswith("call_")
