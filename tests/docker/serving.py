"""Talk to a server started from the image's command (a process or a container) on loopback."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from engine.config import preset
from engine.model.random_checkpoint import write_random_checkpoint
from tests.server.conftest import write_tokenizer

USER = [{"role": "user", "content": "Say hello."}]


def write_tiny_model(directory: Path) -> Path:
    """The server tests' tiny random checkpoint, with its synthetic harmony vocabulary."""
    directory.mkdir(parents=True, exist_ok=True)
    write_random_checkpoint(directory, preset("tiny"), layout="hf", seed=3)
    write_tokenizer(directory)
    return directory


def no_stop_tokens(model_dir: Path) -> dict[str, float]:
    """A logit bias that keeps the tiny model from ending its reply before max_tokens."""
    specials = json.loads((model_dir / "special_tokens.json").read_text())
    return {str(specials[name]): -100.0 for name in ("<|return|>", "<|call|>")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base_url: str, alive: Callable[[], bool], timeout: float) -> list[int]:
    """Poll /health until 200; the status codes answered before that, in order (deduplicated)."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise AssertionError(f"the server exited before /health answered 200 (saw {seen})")
        try:
            response = httpx.get(base_url + "/health", timeout=2)
        except httpx.TransportError:
            time.sleep(0.02)
            continue
        if not seen or seen[-1] != response.status_code:
            seen.append(response.status_code)
        if response.status_code == 200:
            assert response.json() == {"status": "ok"}
            return seen
        assert response.status_code == 503, response.text
        assert response.json()["status"] == "loading", response.text
        time.sleep(0.02)
    raise AssertionError(f"/health did not answer 200 within {timeout} s (saw {seen})")


def served_model(base_url: str, headers: dict[str, str] | None = None) -> str:
    models = httpx.get(base_url + "/v1/models", headers=headers, timeout=10).json()["data"]
    assert len(models) == 1, models
    return models[0]["id"]


def chat_once(base_url: str, headers: dict[str, str] | None = None) -> dict:
    body = {"model": served_model(base_url, headers), "messages": USER, "max_tokens": 4}
    response = httpx.post(
        base_url + "/v1/chat/completions", json=body, headers=headers, timeout=120
    )
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["object"] == "chat.completion"
    [choice] = completion["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in {"stop", "length"}
    assert 0 < completion["usage"]["completion_tokens"] <= 4
    return completion


@dataclass
class StreamOutcome:
    chunks_before_stop: int = 0
    chunks: list[dict] = field(default_factory=list)
    done: bool = False  # the stream ended with `data: [DONE]` (else the server closed it early)

    @property
    def finish_reasons(self) -> list[str]:
        return [
            c["finish_reason"]
            for chunk in self.chunks
            for c in chunk["choices"]
            if c.get("finish_reason")
        ]


def stream_through_stop(
    base_url: str,
    model_dir: Path,
    stop: Callable[[], None],
    after_chunks: int = 1,
    headers: dict[str, str] | None = None,
) -> StreamOutcome:
    """Start a long streaming chat completion and call `stop` while it is generating.

    The first chunk (the assistant role) is sent when generation starts; the random model's text
    may come as content, reasoning or nothing at all, so the stop comes after `after_chunks`.

    Then read the stream to its end. It must end cleanly: every event a whole JSON chunk (or the
    final `[DONE]`), and the HTTP body complete: a connection cut inside a chunk raises here
    (httpx.RemoteProtocolError), and so fails the test.
    """
    body = {
        "model": served_model(base_url, headers),
        "messages": USER,
        "max_tokens": 4000,  # far more than the tiny model makes before the stop
        "logit_bias": no_stop_tokens(model_dir),
        "stream": True,
    }
    outcome = StreamOutcome()
    stopped = False
    with (
        httpx.Client(timeout=120, headers=headers) as client,
        client.stream("POST", base_url + "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line or line.startswith(":"):
                continue  # event separators and SSE comments (pings)
            assert not outcome.done, f"an event after [DONE]: {line!r}"
            assert line.startswith("data: "), line
            data = line[len("data: ") :]
            if data == "[DONE]":
                outcome.done = True
                continue
            outcome.chunks.append(json.loads(data))
            if not stopped and len(outcome.chunks) >= after_chunks:
                assert not outcome.finish_reasons, "the reply ended before the stop"
                outcome.chunks_before_stop = len(outcome.chunks)
                stop()
                stopped = True
    assert stopped, f"the stream ended after {len(outcome.chunks)} chunks, before the stop"
    if outcome.done:  # it finished: exactly one finish reason
        assert len(outcome.finish_reasons) == 1, outcome.chunks[-3:]
    return outcome
