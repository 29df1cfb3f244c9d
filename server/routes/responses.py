"""The Responses API: POST /v1/responses, GET / DELETE /v1/responses/{id}, POST .../cancel.

Request -> (previous response's items +) input items -> chat messages (protocol.responses) ->
harmony prompt (the chat path's `chat_prompt_ids`) -> engine -> ChatOutputMapper deltas ->
output items and events (protocol.responses.OutputItems).

One async generator, `_events`, runs a response and yields its stream events (numbered from 0);
the non-streaming path drains it, the streaming path sends each one as SSE, and a background
response drains it in a detached task (which a cancel ends) while GET reads the live object.
A stored response (`store`, the default) is written to the ResponseStore before its final event,
as `{"response": <the object>, "items": <the conversation items before its output>}`, which is
what a follow-up with `previous_response_id` replays (instructions are not carried over).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from sse_starlette.sse import EventSourceResponse

from engine.async_engine import EngineDeadError
from engine.engine import RequestError, RequestOutput
from engine.sampler import SamplingParams
from server.config import Settings
from server.errors import InvalidRequestError, NotFoundError
from server.harmony_output import ChatOutputMapper
from server.protocol.responses import (
    UNSUPPORTED,
    OutputItems,
    ResponsesRequest,
    items_to_chat_messages,
    response_object,
    responses_error,
)
from server.routes.common import check_model, check_queue, check_unsupported, output_budget
from server.routes.tokenize import ChatPrompt, chat_prompt_ids
from server.state import Services, ServicesDep
from server.store import ResponseStore

logger = logging.getLogger(__name__)

router = APIRouter()

_TERMINAL = ("completed", "incomplete", "failed", "cancelled")
_CANCEL_WAIT_S = 10.0


@dataclass
class Run:
    """One response being generated: the object clients see, updated as the output arrives."""

    response: dict[str, Any]
    items: list[dict[str, Any]]  # the conversation before this response's output
    prompt: ChatPrompt
    params: SamplingParams
    store: ResponseStore | None  # None: `store: false`
    task: asyncio.Task | None = None
    listener: asyncio.Queue[dict[str, Any] | None] | None = None  # a background stream's reader
    deleted: bool = False
    sequence: int = 0

    @property
    def id(self) -> str:
        return self.response["id"]

    def event(self, event: dict[str, Any]) -> dict[str, Any]:
        numbered = {"type": event["type"], "sequence_number": self.sequence, **event}
        self.sequence += 1
        return numbered

    def lifecycle(self, type_: str) -> dict[str, Any]:
        return self.event({"type": type_, "response": copy.deepcopy(self.response)})

    async def persist(self) -> None:
        if self.store is not None and not self.deleted:
            record = {"response": self.response, "items": self.items}
            await asyncio.to_thread(self.store.put, self.id, record, self.response["created_at"])


# --- endpoints ----------------------------------------------------------------------------------


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request, svc: ServicesDep) -> Any:
    settings: Settings = request.app.state.server.settings
    _check(body, settings, svc)
    store = _store(request.app)
    run = await _prepare(body, svc, store, settings)
    if body.background:
        run.response["status"] = "queued"
        await run.persist()
        runs = _runs(request.app)
        runs[run.id] = run
        if body.stream:
            run.listener = asyncio.Queue()
        run.task = asyncio.create_task(_background(run, svc, runs))
        if body.stream:
            return EventSourceResponse(_sse(_listen(run)), ping=15)
        return copy.deepcopy(run.response)
    if body.stream:
        return EventSourceResponse(_sse(_events(run, svc)), ping=15)
    async for _ in _events(run, svc):
        pass
    return run.response


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> dict[str, Any]:
    run = _runs(request.app).get(response_id)
    if run is not None:
        return copy.deepcopy(run.response)
    return (await _stored(request.app, response_id))["response"]


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    run = _runs(request.app).pop(response_id, None)
    if run is not None:
        run.deleted = True
        if run.task is not None:
            run.task.cancel()
    found = await asyncio.to_thread(_store(request.app).delete, response_id)
    if not found and run is None:
        raise _not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request) -> dict[str, Any]:
    run = _runs(request.app).get(response_id)
    if run is None:
        response = (await _stored(request.app, response_id))["response"]
        if not response.get("background"):
            raise InvalidRequestError("only background responses can be cancelled")
        return response  # already finished: cancelling changes nothing
    assert run.task is not None
    run.task.cancel()
    await asyncio.wait({run.task}, timeout=_CANCEL_WAIT_S)
    if run.response["status"] not in _TERMINAL:  # cancelled before it ever ran
        await _cancelled(run)
    return copy.deepcopy(run.response)


# --- preparing a run ----------------------------------------------------------------------------


def _check(body: ResponsesRequest, settings: Settings, svc: Services) -> None:
    check_model(body.model, settings)
    check_unsupported(body, UNSUPPORTED)
    if body.background and not body.store:
        raise InvalidRequestError("background responses must be stored", param="store")
    check_queue(svc, settings)


async def _prepare(
    body: ResponsesRequest, svc: Services, store: ResponseStore, settings: Settings
) -> Run:
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = await asyncio.to_thread(store.get, body.previous_response_id)
        if previous is None:
            raise NotFoundError(
                f"previous response {body.previous_response_id!r} not found",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        if previous["response"]["status"] not in _TERMINAL:
            raise InvalidRequestError(
                f"previous response {body.previous_response_id!r} is still "
                f"{previous['response']['status']}",
                param="previous_response_id",
            )
        history = previous["items"] + previous["response"]["output"]
    items = history + body.input_items()
    try:
        prompt = chat_prompt_ids(
            svc,
            items_to_chat_messages(items, body.instructions),
            tools=body.chat_tools(),
            tool_choice=body.chat_tool_choice(),
            reasoning_effort=body.reasoning.effort if body.reasoning else None,
            response_format=body.response_format(),
            defaults=svc.prompt_defaults,
            strict_tools=settings.strict_tool_arguments,
        )
    except InvalidRequestError as exc:
        raise responses_error(exc) from exc.__cause__
    params = _sampling_params(body, svc, len(prompt.token_ids), prompt.grammar)
    response_id = "resp_" + secrets.token_hex(24)
    try:  # refuse now, before a stream has started, what the engine would refuse
        svc.engine.validate(f"{response_id}-check", prompt.token_ids, params)
    except RequestError as exc:
        raise InvalidRequestError(str(exc)) from exc
    response = response_object(
        body,
        response_id=response_id,
        created_at=int(time.time()),
        model=settings.model_id,
        status="in_progress",
        output=[],
    )
    return Run(response, items, prompt, params, store if body.store else None)


def _sampling_params(
    body: ResponsesRequest, svc: Services, prompt_len: int, grammar: str | None
) -> SamplingParams:
    max_tokens = output_budget(
        svc,
        prompt_len,
        body.max_output_tokens,
        None,
        param="max_output_tokens",
        prompt_param="input",
    )
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            max_tokens=max_tokens,
            stop_token_ids=tuple(sorted(svc.encoding.assistant_stop_token_ids)),
            grammar=grammar,
        )
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc


# --- running ------------------------------------------------------------------------------------


async def _events(run: Run, svc: Services) -> AsyncIterator[dict[str, Any]]:
    """Run the response, yielding its events; the last one is stored first (when stored)."""
    yield run.lifecycle("response.created")
    run.response["status"] = "in_progress"
    yield run.lifecycle("response.in_progress")
    mapper = ChatOutputMapper(svc.encoding)
    output = OutputItems()
    run.response["output"] = output.items
    last: RequestOutput | None = None
    error: str | None = None
    stream = svc.engine.generate(run.prompt.token_ids, run.params, run.id)
    try:
        async for step in stream:
            last = step
            for event in output.feed(mapper.feed(step.new_token_ids)):
                yield run.event(event)
    except (RequestError, EngineDeadError) as exc:
        error = str(exc)
    finally:
        await stream.aclose()  # a disconnect or a cancel aborts the request at once
    result = mapper.finish(last.finish_reason if last else None)
    if last is not None and last.finish_reason in ("error", "abort"):
        error = last.error or f"generation ended: {last.finish_reason}"
    response = run.response
    if error is not None:
        response["status"] = "failed"
        response["error"] = {"code": "server_error", "message": error}
    elif result.finish_reason == "length":
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    else:
        response["status"] = "completed"
        response["completed_at"] = int(time.time())
    item_status = "incomplete" if response["status"] == "incomplete" else "completed"
    closing = output.feed(result.tail_deltas) + output.close(item_status)
    for event in closing:
        yield run.event(event)
    response["usage"] = _usage(run, last, result.reasoning_tokens)
    await run.persist()
    yield run.lifecycle(f"response.{response['status']}")


def _usage(run: Run, last: RequestOutput | None, reasoning_tokens: int) -> dict[str, Any]:
    generated = last.num_output_tokens if last is not None else 0
    return {
        "input_tokens": len(run.prompt.token_ids),
        "input_tokens_details": {
            "cached_tokens": last.num_cached_tokens if last else 0,
            "cache_write_tokens": 0,  # newer SDKs require it; there is no cache write to bill
        },
        "output_tokens": generated,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": len(run.prompt.token_ids) + generated,
    }


async def _background(run: Run, svc: Services, runs: dict[str, Run]) -> None:
    """Drain a background response's events (to its stream reader, if any) until done or cancelled."""
    try:
        async for event in _events(run, svc):
            if run.listener is not None:
                run.listener.put_nowait(event)
    except asyncio.CancelledError:
        await _cancelled(run)
    except Exception as exc:  # reported in the stored response, and logged in full
        logger.exception("background response %s failed", run.id)
        run.response["status"] = "failed"
        run.response["error"] = {"code": "server_error", "message": f"{type(exc).__name__}"}
        await run.persist()
    finally:
        if run.listener is not None:
            run.listener.put_nowait(None)
        runs.pop(run.id, None)


async def _cancelled(run: Run) -> None:
    run.response["status"] = "cancelled"
    for item in run.response["output"]:
        if item.get("status") == "in_progress":
            item["status"] = "incomplete"
    await run.persist()


# --- streaming ----------------------------------------------------------------------------------


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, str]]:
    async for event in events:
        yield {"event": event["type"], "data": json.dumps(event, ensure_ascii=False)}


async def _listen(run: Run) -> AsyncIterator[dict[str, Any]]:
    """A background response's events; a reader going away leaves the response running."""
    queue = run.listener
    assert queue is not None
    try:
        while (event := await queue.get()) is not None:
            yield event
    finally:
        run.listener = None


# --- state ----------------------------------------------------------------------------------------


def _store(app: FastAPI) -> ResponseStore:
    """The app's response store; without one configured, a temporary one (lost on restart)."""
    store = getattr(app.state, "response_store", None)
    if store is None:
        directory = Path(tempfile.mkdtemp(prefix="gpt-oss-responses-"))
        logger.warning("no response store configured: keeping responses in %s", directory)
        store = app.state.response_store = ResponseStore(directory)
    return store


def _runs(app: FastAPI) -> dict[str, Run]:
    """Background responses still running, by id."""
    runs = getattr(app.state, "response_runs", None)
    if runs is None:
        runs = app.state.response_runs = {}
    return runs


async def _stored(app: FastAPI, response_id: str) -> dict[str, Any]:
    record = await asyncio.to_thread(_store(app).get, response_id)
    if record is None:
        raise _not_found(response_id)
    return record


def _not_found(response_id: str) -> NotFoundError:
    return NotFoundError(f"response {response_id!r} not found", param="response_id")
