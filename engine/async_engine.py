"""The async engine: the one door the HTTP layer uses.

`generate(prompt_token_ids, params)` returns an async stream of `RequestOutput`s; `abort(id)` ends a
request and frees its KV blocks at the next step boundary (closing the stream, as a client
disconnect does, aborts too); `stats()` is a snapshot for metrics. The engine core runs in its own
thread, so a model step never blocks the event loop; commands cross into that thread through a queue
and outputs come back through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.engine import EngineStats, LLMEngine, RequestError, RequestOutput
from engine.sampler import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can be served."""


@dataclass(frozen=True, slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: deque[_Add | _Abort] = deque()
        self._wake = threading.Condition()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = EngineStats()
        self._stopping = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # --- the public door --------------------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; raises RequestError at once for a request it cannot take."""
        if not self._thread.is_alive():
            raise EngineDeadError("the engine thread has stopped")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        self.engine.validate(request_id, prompt_token_ids, params)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._send(_Add(request_id, list(prompt_token_ids), params))
        finished = False
        failure: BaseException | None = None
        try:
            while True:
                item = failure or await queue.get()
                if isinstance(item, BaseException):
                    raise item
                # A consumer that fell behind gets what queued up as one output: its per-output
                # work (parsing, an SSE event) is then paid once for several steps, so a loaded
                # front end catches up instead of falling further behind.
                while not queue.empty() and item.finish_reason is None:
                    later = queue.get_nowait()
                    if isinstance(later, BaseException):
                        failure = later  # raised on the next round, after this output
                        break
                    item = item.followed_by(later)
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)  # the consumer went away: free everything
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._send(_Abort(request_id))

    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # --- the engine thread ------------------------------------------------------------------------
    def _send(self, command: _Add | _Abort) -> None:
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._commands and not self.engine.has_work and not self._stopping:
                        self._wake.wait()
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for command in commands:
                    self._apply(command)
                if self.engine.has_work:
                    self._deliver_step(self.engine.step())
                self._stats = self.engine.stats()
        except BaseException as exc:
            logger.exception("engine thread died")
            dead = EngineDeadError(f"the engine stopped: {exc!r}")
            for request_id in list(self._streams):
                self._deliver(request_id, dead)
            raise
        finally:
            for request_id in list(self.engine.requests):
                output = self.engine.abort(request_id)
                if output is not None:
                    self._deliver(request_id, output)

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            output = self.engine.abort(command.request_id)
            if output is not None:
                self._deliver(command.request_id, output)
            return
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params)
        except ValueError as exc:  # validated before, but the engine's state may have moved
            self._deliver(command.request_id, exc)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, handed to each event loop in one call rather than one per request:
        every cross-thread call wakes the loop through its self-pipe."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                logger.debug("an event loop with %d pending outputs is closed", len(items))

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return  # nobody listens any more (aborted on the way)
        loop, queue = stream
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            logger.debug("event loop of request %s is closed", request_id)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
