"""The async engines: the one door the HTTP layer uses, and the stream side both kinds share.

`generate(prompt_token_ids, params)` returns an async stream of `RequestOutput`s; `abort(id)` ends a
request and frees its KV blocks at the next step boundary (closing the stream, as a client
disconnect does, aborts too); `validate(...)` refuses, before any stream starts, what the engine
would refuse; `stats()` is a snapshot for metrics. `AsyncEngineBase` owns the streams: the
per-request queues, merging outputs that queued up while a consumer was busy, and handing a step's
outputs to each event loop in one cross-thread call. Where the engine core runs is the subclass's:

- `AsyncEngine` (here) runs `LLMEngine` in a thread of this process: commands cross into that
  thread through a deque, outputs come back through `call_soon_threadsafe`. Simple, for embedding
  and tests; the engine's Python shares this process's GIL with the front end.
- `ProcessEngine` (`engine_process.py`) runs it in a child process with its own GIL.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.engine import EngineStats, LLMEngine, RequestError, RequestOutput, RequestValidator
from engine.sampler import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core stopped (its thread or process ended); no request can be served."""


@dataclass(frozen=True, slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


Command = _Add | _Abort
_Stream = tuple[asyncio.AbstractEventLoop, asyncio.Queue]


class AsyncEngineBase(ABC):
    """The streams of an engine core that runs elsewhere (a thread, a process).

    Subclasses send commands (`_send`), say whether the core still runs (`alive`), and feed
    outputs back from their own thread with `_deliver_step` / `_deliver`.
    """

    def __init__(self, validator: RequestValidator) -> None:
        self.validator = validator
        self._streams: dict[str, _Stream] = {}
        self._stats = EngineStats()
        self._ids = itertools.count()

    @property
    def max_request_tokens(self) -> int:
        """Prompt + output tokens one request may reach (the context limit or the KV cache)."""
        return self.validator.max_request_tokens

    @property
    def vocab_size(self) -> int:
        return self.validator.vocab_size

    # --- what a subclass provides -----------------------------------------------------------------
    @property
    @abstractmethod
    def alive(self) -> bool:
        """Whether the engine core still runs (False once it died or was shut down)."""

    @abstractmethod
    def _send(self, command: Command) -> None:
        """Hand a command to the engine core without blocking the caller."""

    @abstractmethod
    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core; open streams end with finish_reason 'abort'."""

    def _dead_error(self) -> EngineDeadError:
        return EngineDeadError("the engine has stopped")

    @property
    def failure(self) -> str | None:
        """Why the engine core stopped; None while it runs."""
        return None if self.alive else str(self._dead_error())

    # --- the public door --------------------------------------------------------------------------
    def validate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """Raise RequestError unless the engine can take this request and run it to the end."""
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        self.validator.check(prompt_token_ids, params)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; raises RequestError at once for a request it cannot take."""
        if not self.alive:
            raise self._dead_error()
        request_id = request_id or f"req-{next(self._ids)}"
        self.validate(request_id, prompt_token_ids, params)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        finished = False
        failure: BaseException | None = None
        try:
            self._send(_Add(request_id, list(prompt_token_ids), params))
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
            if not finished and self.alive:
                self.abort(request_id)  # the consumer went away: free everything
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._send(_Abort(request_id))

    def stats(self) -> EngineStats:
        return self._stats

    # --- outputs, from the subclass's thread ------------------------------------------------------
    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, handed to each event loop in one call rather than one per request:
        every cross-thread call wakes the loop through its self-pipe."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
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

    def _fail_all(self, error: BaseException) -> None:
        """Every open stream raises `error` (after the outputs already handed over)."""
        for request_id in list(self._streams):
            self._deliver(request_id, error)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class AsyncEngine(AsyncEngineBase):
    """`LLMEngine` driven from a thread of this process."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__(engine.validator)
        self.engine = engine
        self._commands: deque[Command] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _dead_error(self) -> EngineDeadError:
        return EngineDeadError("the engine thread has stopped")

    def validate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        super().validate(request_id, prompt_token_ids, params)
        if request_id in self.engine.requests:  # a request sent without a stream (tests)
            raise RequestError(f"request id {request_id!r} is already in use")

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # --- the engine thread ------------------------------------------------------------------------
    def _send(self, command: Command) -> None:
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
            self._fail_all(EngineDeadError(f"the engine stopped: {exc!r}"))
            raise
        finally:
            for request_id in list(self.engine.requests):
                output = self.engine.abort(request_id)
                if output is not None:
                    self._deliver(request_id, output)
            self._stats = self.engine.stats()

    def _apply(self, command: Command) -> None:
        if isinstance(command, _Abort):
            output = self.engine.abort(command.request_id)
            if output is not None:
                self._deliver(command.request_id, output)
            return
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params)
        except ValueError as exc:  # validated before, but the engine's state may have moved
            self._deliver(command.request_id, exc)
