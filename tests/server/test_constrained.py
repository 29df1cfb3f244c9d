"""Constrained decoding end to end: the official `openai` SDK against a real server on loopback.

Proven here, with a tiny random model whose free output is noise: the SDK's parse helpers get their
parsed objects back (`chat.completions.parse` with a Pydantic `response_format`, with a strict
Pydantic function tool and a named tool_choice, and `responses.parse` with `text_format`);
`tool_choice: "required"` gives a call to a declared function with valid arguments, streamed or
not; `json_object` gives a JSON object; a strict tool's arguments validate under tool_choice
"auto"; schemas the grammar library cannot compile are 400s naming the offending part, in either
API's own field names.

Chat requests carry a seed and a logit bias on `<|end|>`, `<|return|>`, `"`, `}` and `]` (the
engine tests say why: it only shortens the random model's replies; the mask makes them valid). The Responses API has
neither, so its test samples freely in a server with room for long replies.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from tests.server.conftest import MODEL_NAME, LiveServer

USER = [{"role": "user", "content": "Plan a trip, please."}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA, "strict": True},
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}}},
    },
}
BAD_SCHEMA = {"type": "object", "properties": {"when": {"type": "string", "format": "nonsense"}}}


class Stop(BaseModel):
    city: str = Field(max_length=12)
    nights: int = Field(ge=1, le=9)


class Trip(BaseModel):
    traveler: str = Field(max_length=16)
    mode: Literal["train", "plane", "boat"]
    stops: list[Stop] = Field(max_length=3)
    budget: float | None


class Booking(BaseModel):
    """Book a room."""

    hotel: str = Field(max_length=10)
    nights: int = Field(ge=1, le=5)


@pytest.fixture(scope="module")
def server(make_server: Callable[..., LiveServer]) -> LiveServer:
    # Room for the rare long free analysis of the Responses test (it cannot bias or seed).
    return make_server(max_model_len=32768, kv_cache_tokens=65536)


def sdk(live: LiveServer) -> OpenAI:
    return OpenAI(base_url=live.base_url + "/v1", api_key="x", max_retries=0, timeout=300)


def steering(live: LiveServer) -> dict[str, float]:
    encoding = live.services.encoding
    ids = {encoding.ids.end: 3.0, encoding.ids.return_: 3.0}
    ids.update({encoding.encode(c)[0]: b for c, b in (('"', 5.0), ("}", 3.0), ("]", 3.0))})
    return {str(token): bias for token, bias in ids.items()}


def chat_kwargs(live: LiveServer, seed: int = 1) -> dict:
    return {
        "model": MODEL_NAME,
        "messages": USER,
        "max_tokens": 6000,
        "seed": seed,
        "logit_bias": steering(live),
    }


def test_chat_parse_with_a_pydantic_response_format_returns_the_object(server) -> None:
    for seed in range(3):
        completion = sdk(server).chat.completions.parse(
            **chat_kwargs(server, seed), response_format=Trip
        )
        message = completion.choices[0].message
        assert isinstance(message.parsed, Trip)
        assert message.parsed == Trip.model_validate_json(message.content)
        assert completion.choices[0].finish_reason == "stop"


def test_chat_parse_with_a_strict_pydantic_tool_and_a_named_choice(server) -> None:
    completion = sdk(server).chat.completions.parse(
        **chat_kwargs(server),
        tools=[openai.pydantic_function_tool(Booking)],
        tool_choice={"type": "function", "function": {"name": "Booking"}},
    )
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.name == "Booking"
    assert isinstance(call.function.parsed_arguments, Booking)
    assert completion.choices[0].finish_reason == "tool_calls"


def test_responses_parse_with_a_text_format_returns_the_object(server) -> None:
    response = sdk(server).responses.parse(
        model=MODEL_NAME, input="Plan a trip.", text_format=Trip, max_output_tokens=30000
    )
    assert response.status == "completed"
    assert isinstance(response.output_parsed, Trip)
    assert response.output_parsed == Trip.model_validate_json(response.output_text)


def test_required_calls_a_declared_function_with_valid_arguments(server) -> None:
    completion = sdk(server).chat.completions.create(
        **chat_kwargs(server), tools=[WEATHER, ADD], tool_choice="required", n=8
    )
    names = set()
    for choice in completion.choices:
        (call,) = choice.message.tool_calls
        assert choice.finish_reason == "tool_calls"
        arguments = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            jsonschema.validate(arguments, WEATHER_SCHEMA)
        else:  # not strict: any JSON object
            assert call.function.name == "add" and isinstance(arguments, dict)
        names.add(call.function.name)
    assert names == {"get_weather", "add"}


def test_required_streams_the_call(server) -> None:
    chunks = list(
        sdk(server).chat.completions.create(
            **chat_kwargs(server, seed=5), tools=[WEATHER], tool_choice="required", stream=True
        )
    )
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or [] if c.choices]
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    jsonschema.validate(json.loads(arguments), WEATHER_SCHEMA)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_object_gives_a_json_object(server) -> None:
    completion = sdk(server).chat.completions.create(
        **chat_kwargs(server, seed=2), response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


def test_a_strict_tool_under_auto_gets_valid_arguments_when_called(server) -> None:
    completion = sdk(server).chat.completions.create(
        **chat_kwargs(server, seed=3), tools=[WEATHER], tool_choice="auto", n=8
    )
    calls = [c for choice in completion.choices for c in choice.message.tool_calls or []]
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)
    answers = [c.message.content for c in completion.choices if not c.message.tool_calls]
    assert calls and answers  # both stay possible: the model's choice, not the grammar's


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {
                "messages": USER,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": BAD_SCHEMA},
                },
            },
            "response_format.json_schema.schema.properties.when",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": USER,
                "tools": [{"type": "function", "function": {
                    "name": "f", "parameters": BAD_SCHEMA, "strict": True}}],
            },
            "tools[0].function.parameters.properties.when",
        ),
        (
            "/v1/chat/completions",
            {"messages": USER, "tool_choice": "required"},
            "tool_choice",
        ),
        (
            "/v1/responses",
            {"input": "hi", "text": {"format": {
                "type": "json_schema", "name": "x", "schema": BAD_SCHEMA}}},
            "text.format.schema.properties.when",
        ),
        (
            "/v1/responses",
            {"input": "hi", "tools": [{
                "type": "function", "name": "f", "parameters": BAD_SCHEMA, "strict": True}]},
            "tools[0].parameters.properties.when",
        ),
    ],
)  # fmt: skip
def test_what_cannot_be_enforced_is_a_400_naming_the_part(server, path, body, param) -> None:
    response = httpx.post(server.base_url + path, json={"model": MODEL_NAME, **body}, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if param != "tool_choice":
        assert error["message"].startswith(param) and "nonsense" in error["message"]
