"""The pieces of server/cli.py that make a stop clean, checked without a server (fast)."""

from __future__ import annotations

import asyncio

from server.cli import _CompleteResponses

START = {"type": "http.response.start", "status": 200, "headers": []}
EVENT = {"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True}
END = {"type": "http.response.body", "body": b"", "more_body": False}


def _run(app, scope_type: str = "http") -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(_CompleteResponses(app)({"type": scope_type}, receive, send))
    return sent


def test_a_stream_ended_without_its_last_message_is_completed() -> None:
    async def cancelled_stream(scope, receive, send) -> None:  # what sse-starlette does on stop
        await send(START)
        await send(EVENT)

    assert _run(cancelled_stream) == [START, EVENT, END]


def test_a_finished_response_is_left_alone() -> None:
    async def finished(scope, receive, send) -> None:
        await send(START)
        await send(EVENT)
        await send(END)

    assert _run(finished) == [START, EVENT, END]


def test_a_response_never_started_and_other_scopes_are_left_to_uvicorn() -> None:
    async def nothing(scope, receive, send) -> None:
        return

    async def lifespan(scope, receive, send) -> None:
        await send({"type": "lifespan.startup.complete"})

    assert _run(nothing) == []
    assert _run(lifespan, "lifespan") == [{"type": "lifespan.startup.complete"}]
