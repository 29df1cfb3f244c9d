"""A real server on loopback: uvicorn in a thread, a tiny random checkpoint, a real tokenizer.

`live_server` serves the tiny model with the synthetic harmony vocabulary written into the model
directory (`vocab.tiktoken` + `special_tokens.json`), so it runs without ../shared.
`make_server(**settings)` starts more servers with other settings (an API key, small limits, the
engine in its own process with `engine_process=True`; by default it runs in a thread).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from engine.config import preset
from engine.model.random_checkpoint import write_random_checkpoint
from server.app import create_app
from server.config import Settings
from server.services import load_services
from tests.harmony.synthetic_vocab import synthetic_encoding

MODEL_NAME = "tiny-gpt-oss"


def concurrent_chat_streams(base_url: str, n: int) -> list[list[str]]:
    """`n` streaming chat completions at once through the openai SDK; each one's finish reasons."""
    from openai import AsyncOpenAI

    async def one(client: AsyncOpenAI, i: int) -> list[str]:
        stream = await client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": f"client {i}"}],
            max_tokens=8,
            stream=True,
        )
        return [c.choices[0].finish_reason async for c in stream if c.choices[0].finish_reason]

    async def main() -> list[list[str]]:
        client = AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(n)))
        finally:
            await client.close()

    return asyncio.run(main())


@dataclass
class LiveServer:
    base_url: str
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def services(self):
        return self.app.state.server.services  # type: ignore[attr-defined]

    def kv_pools_all_free(self) -> bool:
        """Every KV block is free, by the engine's stats (either engine kind, no reaching in)."""
        stats = self.services.engine.stats()
        return stats.kv_blocks_total > 0 and stats.kv_blocks_free == stats.kv_blocks_total

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()


def write_tokenizer(directory: Path) -> None:
    encoding = synthetic_encoding()
    ranks = sorted(encoding._encoding._mergeable_ranks.items(), key=lambda item: item[1])
    lines = "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks)
    (directory / "vocab.tiktoken").write_text(lines)
    (directory / "special_tokens.json").write_text(json.dumps(dict(encoding.special_tokens)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-server-model")
    write_random_checkpoint(directory, preset("tiny"), layout="hf", seed=3)
    write_tokenizer(directory)
    return directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def make_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def start(**overrides: object) -> LiveServer:
        settings = Settings(
            **{
                "model": tiny_model_dir,
                "state_dir": tmp_path_factory.mktemp("server-state"),
                "served_model_name": MODEL_NAME,
                "dtype": "float32",
                "kv_cache_tokens": 8192,
                "max_model_len": 4096,
                "port": _free_port(),
                # The in-thread engine: a fixture server starts in a blink; the process engine
                # has its own tests (test_engine_process.py).
                "engine_process": False,
                **overrides,
            }
        )
        app = create_app(settings, load_services)
        config = uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        live = LiveServer(f"http://127.0.0.1:{settings.port}", app, server, thread)
        started.append(live)

        def healthy() -> bool:
            try:
                return httpx.get(live.base_url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        if not live.wait_until(healthy, timeout=60):
            raise RuntimeError(f"the test server at {live.base_url} did not become healthy")
        return live

    yield start
    for live in started:
        live.server.should_exit = True
        live.thread.join(timeout=15)


@pytest.fixture(scope="session")
def live_server(make_server: Callable[..., LiveServer]) -> LiveServer:
    return make_server()


SERVER_ERROR_LOGGERS = ("server.errors", "uvicorn.error", "sse_starlette.sse", "asyncio")


class _DropTraceback(logging.Filter):
    """Log the server's unhandled errors without formatting their tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.msg = f"{record.msg} ({record.exc_info[0].__name__}, traceback not shown)"
            record.exc_info = None
            record.exc_text = None
        return True


@pytest.fixture(autouse=True, scope="session")
def no_server_tracebacks() -> Iterator[None]:
    """Server errors are logged without their tracebacks while the server tests run.

    On Python 3.11 formatting a traceback parses source with `ast`; the server thread doing so
    while pytest formats this test's failure (an xfail's too) races inside CPython ("AST
    constructor recursion depth mismatch") and ends the whole session with INTERNALERROR.
    """
    loggers = [logging.getLogger(name) for name in SERVER_ERROR_LOGGERS]
    drop = _DropTraceback()
    for logger in loggers:
        logger.addFilter(drop)
    yield
    for logger in loggers:
        logger.removeFilter(drop)
