"""POST /v1/chat/completions: non-streaming and SSE streaming, with tools and reasoning.

Request -> harmony prompt (harmony_bridge) -> n engine generations -> harmony output mapping
(harmony_output) -> stop strings on the content -> OpenAI objects or `chat.completion.chunk` events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from engine.engine import RequestError, RequestOutput
from engine.sampler import SamplingParams
from server.config import Settings
from server.errors import InvalidRequestError, envelope
from server.harmony_output import ChatDelta, ChatOutputMapper, ChatResult
from server.metrics import ServerMetrics, metrics_of
from server.protocol.chat import UNSUPPORTED, ChatCompletionRequest
from server.routes.common import (
    check_model,
    check_queue,
    check_stops,
    check_unsupported,
    output_budget,
    parse_logit_bias,
    sampling_params,
    seeded,
)
from server.routes.tokenize import chat_prompt_ids
from server.state import Services, ServicesDep
from server.stop_strings import StopStringMatcher

logger = logging.getLogger(__name__)
router = APIRouter()


@dataclass
class Choice:
    """One of the n generations: its output mapping, stop strings, and what it produced."""

    index: int
    mapper: ChatOutputMapper
    stops: StopStringMatcher
    content: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    stopped_by_string: bool = False
    last: RequestOutput | None = None
    result: ChatResult | None = None
    metrics: ServerMetrics | None = None
    started: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None

    def observe(self, output: RequestOutput) -> None:
        """Record this output for metrics (TTFT, inter-token latency) and as the latest state."""
        self.last = output
        if self.metrics is None or not output.new_token_ids:
            return
        now = time.monotonic()
        if self.last_token_at is None:
            self.metrics.observe_ttft(now - self.started)
        else:
            self.metrics.observe_itl(now - self.last_token_at)
        self.last_token_at = now


@router.post("/v1/chat/completions")
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, svc: ServicesDep
) -> Any:
    settings: Settings = request.app.state.server.settings
    _check(body, settings, svc)
    prompt, grammar = chat_prompt_ids(
        svc,
        body.messages,
        tools=body.tools,
        tool_choice=body.tool_choice,
        reasoning_effort=body.effort(),
        response_format=body.response_format,
        defaults=svc.prompt_defaults,
        strict_tools=settings.strict_tool_arguments,
    )
    params = _sampling_params(body, svc, len(prompt), grammar)
    completion_id = "chatcmpl-" + secrets.token_hex(12)
    try:  # refuse now, before a stream has started, what the engine would refuse
        svc.engine.validate(f"{completion_id}-check", prompt, params)
    except RequestError as exc:
        raise InvalidRequestError(str(exc)) from exc
    created = int(time.time())
    metrics = metrics_of(request.app)
    metrics.observe_prompt_tokens(len(prompt))
    choices = [
        Choice(
            i,
            ChatOutputMapper(svc.encoding),
            StopStringMatcher(body.stop_strings()),
            metrics=metrics,
        )
        for i in range(body.n)
    ]
    streams: list = [
        svc.engine.generate(prompt, seeded(params, body.seed, i), f"{completion_id}-{i}")
        for i in range(body.n)
    ]
    head = {"id": completion_id, "created": created, "model": settings.model_id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(head, prompt, choices, streams, body, settings, svc, include_usage)
        return EventSourceResponse(events, ping=15)
    try:
        await asyncio.gather(
            *(_collect(c, s, body, svc) for c, s in zip(choices, streams, strict=True))
        )
    except RequestError as exc:
        raise InvalidRequestError(str(exc)) from exc
    return {
        **head,
        "object": "chat.completion",
        "choices": [_final_choice(c, body, settings) for c in choices],
        "usage": _usage(prompt, choices),
        "system_fingerprint": None,
    }


# --- validation and parameters --------------------------------------------------------------------


def _check(body: ChatCompletionRequest, settings: Settings, svc: Services) -> None:
    check_model(body.model, settings)
    check_unsupported(body, UNSUPPORTED)
    if body.n > settings.max_n:
        raise InvalidRequestError(f"n must be at most {settings.max_n}, got {body.n}", param="n")
    check_stops(body.stop_strings(), settings)
    if body.top_logprobs is not None and body.top_logprobs > settings.max_top_logprobs:
        raise InvalidRequestError(
            f"top_logprobs must be at most {settings.max_top_logprobs}", param="top_logprobs"
        )
    check_queue(svc, settings)


def _sampling_params(
    body: ChatCompletionRequest, svc: Services, prompt_len: int, grammar: str | None
) -> SamplingParams:
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    max_tokens = output_budget(
        svc,
        prompt_len,
        body.max_completion_tokens or body.max_tokens,
        None,
        param=param,
        prompt_param="messages",
    )
    bias = parse_logit_bias(body.logit_bias, svc.encoding.n_vocab)
    params = sampling_params(
        body,
        logit_bias=bias,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        max_tokens=max_tokens,
        stop_token_ids=tuple(sorted(svc.encoding.assistant_stop_token_ids)),
        grammar=grammar,
    )
    try:
        params.check_vocab(svc.encoding.n_vocab)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
    return params


# --- running ----------------------------------------------------------------------------------------


def _apply(choice: Choice, deltas: list[ChatDelta]) -> list[ChatDelta]:
    """Pass content through the stop strings; after a stop string nothing more is shown."""
    shown = []
    for delta in deltas:
        if choice.stopped_by_string:
            break
        if delta.content is not None:
            match = choice.stops.feed(delta.content)
            if match.text:
                shown.append(ChatDelta(content=match.text))
                choice.content.append(match.text)
            if match.stopped:
                choice.stopped_by_string = True
        else:
            shown.append(delta)
    return shown


def _feed(
    svc: Services, choice: Choice, output: RequestOutput, logprobs: bool
) -> tuple[list[ChatDelta], list[dict]]:
    """The deltas an output's tokens make, and the logprob entries of the tokens that wrote
    content. With logprobs asked the tokens reach the mapper one at a time: an output can hold
    several steps' tokens (outputs that queued up are coalesced), say a header's last token and
    the content's first, and only content tokens have an entry."""
    if not logprobs:
        return _apply(choice, choice.mapper.feed(output.new_token_ids)), []
    deltas: list[ChatDelta] = []
    entries: list[dict] = []
    for token, lp in zip(output.new_token_ids, output.new_logprobs or (), strict=True):
        shown = _apply(choice, choice.mapper.feed((token,)))
        deltas += shown
        if any(d.content for d in shown):
            entries.append(
                {
                    **_token_entry(svc, token, lp.logprob),
                    "top_logprobs": [_token_entry(svc, t, v) for t, v in lp.top],
                }
            )
    return deltas, entries


def _token_entry(svc: Services, token: int, logprob: float) -> dict:
    # The model's vocabulary may be wider than the tokenizer's: such ids have no text.
    data = svc.encoding.decode_bytes([token]) if svc.encoding.is_valid_id(token) else b""
    return {
        "token": data.decode("utf-8", errors="replace"),
        "logprob": logprob,
        "bytes": list(data),
    }


async def _collect(
    choice: Choice, stream: AsyncIterator[RequestOutput], body, svc: Services
) -> None:
    try:
        async for output in stream:
            choice.observe(output)
            _, entries = _feed(svc, choice, output, bool(body.logprobs))
            choice.logprobs.extend(entries)
            if choice.stopped_by_string:
                break
    finally:
        await stream.aclose()  # an unfinished request is aborted and its blocks freed at once
    _finish(choice)


def _finish(choice: Choice) -> list[ChatDelta]:
    if choice.metrics is not None and choice.last is not None:
        choice.metrics.observe_generated_tokens(choice.last.num_output_tokens)
    reason = (
        "stop" if choice.stopped_by_string else (choice.last.finish_reason if choice.last else None)
    )
    choice.result = choice.mapper.finish(str(reason) if reason else None)
    tail = [] if choice.stopped_by_string else _apply(choice, list(choice.result.tail_deltas))
    if not choice.stopped_by_string:
        rest = choice.stops.flush()
        if rest:
            choice.content.append(rest)
            tail.append(ChatDelta(content=rest))
    return tail


def _finish_reason(choice: Choice) -> str:
    assert choice.result is not None
    if choice.last is not None and choice.last.finish_reason == "error":
        return "error"
    if choice.stopped_by_string:
        return "stop"
    return choice.result.finish_reason


def _final_choice(choice: Choice, body: ChatCompletionRequest, settings: Settings) -> dict:
    result = choice.result
    assert result is not None
    content = "".join(choice.content) if choice.content else None
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if body.include_reasoning and result.reasoning is not None:
        message.update(_reasoning_fields(result.reasoning, settings))
    if result.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in result.tool_calls
        ]
    return {
        "index": choice.index,
        "message": message,
        "logprobs": {"content": choice.logprobs, "refusal": None} if body.logprobs else None,
        "finish_reason": _finish_reason(choice),
    }


def _reasoning_fields(text: str, settings: Settings) -> dict[str, str]:
    if settings.reasoning_field == "both":
        return {"reasoning": text, "reasoning_content": text}
    return {settings.reasoning_field: text}


def _usage(prompt: list[int], choices: list[Choice]) -> dict:
    completion = sum(c.last.num_output_tokens for c in choices if c.last is not None)
    cached = max((c.last.num_cached_tokens for c in choices if c.last is not None), default=0)
    reasoning = sum(c.result.reasoning_tokens for c in choices if c.result is not None)
    return {
        "prompt_tokens": len(prompt),
        "completion_tokens": completion,
        "total_tokens": len(prompt) + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


# --- streaming ---------------------------------------------------------------------------------------


def _delta_json(delta: ChatDelta, body: ChatCompletionRequest, settings: Settings) -> dict | None:
    if delta.content is not None:
        return {"content": delta.content}
    if delta.reasoning is not None:
        return _reasoning_fields(delta.reasoning, settings) if body.include_reasoning else None
    call = delta.tool_call
    assert call is not None
    entry: dict[str, Any] = {"index": call.index, "function": {"arguments": call.arguments}}
    if call.id is not None:
        entry.update({"id": call.id, "type": "function"})
        entry["function"]["name"] = call.name
    return {"tool_calls": [entry]}


async def _stream(
    head: dict,
    prompt: list[int],
    choices: list[Choice],
    streams: list[AsyncIterator[RequestOutput]],
    body: ChatCompletionRequest,
    settings: Settings,
    svc: Services,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: Any = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        data = {**head, "object": "chat.completion.chunk", "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return json.dumps(data, ensure_ascii=False)

    queue: asyncio.Queue[tuple[Choice, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(choice: Choice, stream: AsyncIterator[RequestOutput]) -> None:
        ended: Exception | None = None
        try:
            async for output in stream:
                await queue.put((choice, output))
                if choice.stopped_by_string:
                    break
        except Exception as exc:  # handed to the consumer, which reports it in-band
            ended = exc
        finally:
            await stream.aclose()  # a disconnect or a stop string aborts the request at once
            queue.put_nowait((choice, ended))

    for choice in choices:
        yield chunk(choice.index, {"role": "assistant", "content": ""})
    tasks = [asyncio.create_task(pump(c, s)) for c, s in zip(choices, streams, strict=True)]
    try:
        open_streams = len(choices)
        while open_streams:
            choice, output = await queue.get()
            if isinstance(output, Exception):
                # The stream has started: say so in-band, as OpenAI does, never as a clean stop.
                logger.error("chat stream %s failed: %r", head["id"], output)
                message = f"generation failed: {type(output).__name__}: {output}"
                yield json.dumps(envelope(message, "server_error"))
                include_usage = False
                break
            if output is None:
                open_streams -= 1
                for delta in _finish(choice):
                    if (piece := _delta_json(delta, body, settings)) is not None:
                        yield chunk(choice.index, piece)
                yield chunk(choice.index, {}, _finish_reason(choice))
                continue
            choice.observe(output)
            deltas, entries = _feed(svc, choice, output, bool(body.logprobs))
            for delta in deltas:
                if (piece := _delta_json(delta, body, settings)) is not None:
                    # The output's entries ride on its first content chunk, once.
                    logprobs = None
                    if delta.content and entries:
                        logprobs, entries = {"content": entries, "refusal": None}, []
                    yield chunk(choice.index, piece, logprobs=logprobs)
        if include_usage:
            usage = {
                **head,
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": _usage(prompt, choices),
            }
            yield json.dumps(usage)
    finally:
        for task in tasks:
            task.cancel()
    yield "[DONE]"
