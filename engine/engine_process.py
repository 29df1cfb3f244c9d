"""The engine core in its own process: `ProcessEngine`, the async door to it, and the child's loop.

Why a process: the engine's Python (scheduler, sampler, a small model's op dispatch) and the HTTP
front end (routing, SSE, JSON, harmony parsing) would otherwise share one GIL, so a busy server
would run on one core. As in vLLM v1 (AsyncLLM + EngineCore) and SGLang, the child owns the model
and `LLMEngine`; this process owns the streams (`AsyncEngineBase`).

The child is started with the `spawn` context (forking a process that has torch threads can
deadlock), builds the model and engine from picklable data (`EngineSpec`), runs the warm-up step,
says it is ready, then loops: take the commands that arrived (blocking only when it has no work),
`step()`, and send that step's outputs in ONE message with a stats snapshot. One socket pair
carries pickled messages both ways; in this process one reader thread hands each step's outputs to
the event loops (one `call_soon_threadsafe` per loop) and one writer thread sends commands, so the
event loop never blocks on a full pipe.

Faults: a load failure comes back with its message and `ProcessEngine(...)` raises it; a child that
dies (killed, crashed, out of memory) makes every open stream raise `EngineDeadError` and `alive`
turn False. `shutdown()` ends open streams with 'abort', joins the child, then terminates it. The
child is a daemon (ended at the parent's exit) and ends by itself when its socket closes, which
happens when the parent dies in any way; it ignores SIGINT, since a terminal's Ctrl-C reaches the
whole process group and the parent drives the shutdown.

Requests cross as pickles: `SamplingParams` is data, so every request the server makes crosses. A
request whose logits processors cannot be pickled (a closure, a lambda) is refused with
`RequestError` by `validate`, before its stream starts; such callers use the in-thread `AsyncEngine`.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import operator
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch

from engine.async_engine import AsyncEngineBase, Command, EngineDeadError, _Abort, _Add
from engine.config import DTYPES
from engine.constraints import GrammarVocabulary
from engine.engine import (
    EngineConfig,
    EngineStats,
    LLMEngine,
    RequestError,
    RequestOutput,
    RequestValidator,
)
from engine.model.gpt_oss import GptOss
from engine.request import FinishReason
from engine.sampler import SamplingParams

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 5.0  # after a polite request to stop, and again after SIGTERM


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What the child needs to build the engine: data only, so it pickles."""

    model_path: str
    dtype: str = "bfloat16"  # a name in engine.config.DTYPES
    device: str = "cpu"
    # max_model_len is capped at the model's positions (the model's own limit wins).
    config: EngineConfig = field(default_factory=EngineConfig)
    torch_threads: int | None = None  # intra-op threads in the child; None: torch's default
    log_level: int = logging.INFO
    # The vocabulary grammars run over (constrained decoding); None: requests with one are refused.
    grammar_vocabulary: GrammarVocabulary | None = None


# --- messages ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class _Progress:
    done: int
    total: int


@dataclass(frozen=True, slots=True)
class _Ready:
    validator: RequestValidator
    stats: EngineStats


@dataclass(frozen=True, slots=True)
class _Failed:
    message: str


# A step, child -> parent: (outputs, [(request id, refusal)], stats), as plain tuples of fields:
# pickling a list of dataclasses goes through __reduce_ex__ per object (a 32-request step: about
# 130 us to pickle and 130 to unpickle, against 20 and 50 as rows).
_Step = tuple[list[tuple], list[tuple[str, str]], tuple]
_output_row = operator.attrgetter(*(f.name for f in dataclasses.fields(RequestOutput)))
_stats_row = operator.attrgetter(*(f.name for f in dataclasses.fields(EngineStats)))


def _encode_step(
    outputs: list[RequestOutput], refused: list[tuple[str, str]], stats: EngineStats
) -> _Step:
    return [_output_row(output) for output in outputs], refused, _stats_row(stats)


def _decode_step(step: _Step) -> tuple[list[RequestOutput], list[tuple[str, str]], EngineStats]:
    rows, refused, stats = step
    return [RequestOutput(*row) for row in rows], refused, EngineStats(*stats)


_BYE = "bye"  # the child's last message after a shutdown command


class ProcessEngine(AsyncEngineBase):
    """The async engine door to an `LLMEngine` running in a child process.

    The constructor returns once the child has loaded the model and run the warm-up step, or
    raises (RuntimeError with the child's message) if it could not.
    """

    def __init__(
        self,
        spec: EngineSpec,
        progress: Callable[[int, int], None] | None = None,
        start_timeout_s: float | None = None,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(
            target=_child_main, args=(spec, child_conn), name="engine-core", daemon=True
        )
        self._process.start()
        child_conn.close()  # only the child holds its end: its death closes our socket
        try:
            ready = self._wait_ready(progress, start_timeout_s)
        except BaseException:
            self._stop_process()
            self._conn.close()
            raise
        super().__init__(ready.validator)
        self._stats = ready.stats
        self._stopping = False
        self._dead: str | None = None  # why the child is gone, once it is
        self._outbox: deque[bytes | None] = deque()  # None: the writer stops
        self._outbox_ready = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._writer = threading.Thread(target=self._write, name="engine-writer", daemon=True)
        self._reader.start()
        self._writer.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._dead is None and not self._stopping

    def _dead_error(self) -> EngineDeadError:
        return EngineDeadError(self._dead or "the engine was shut down")

    def validate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        super().validate(request_id, prompt_token_ids, params)
        if params.logits_processors:
            try:
                pickle.dumps(params.logits_processors)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                raise RequestError(
                    "logits processors must pickle to reach the engine process "
                    f"(a module-level function or class, not a closure): {exc}"
                ) from exc

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the child to abort every request and stop; join it, then terminate it."""
        if self._stopping:
            return
        self._stopping = True
        self._post(pickle.dumps(("", pickle.dumps(_Shutdown()))))
        self._reader.join(timeout)  # the child's last outputs (the aborts) are handed over
        self._stop_process()
        self._post(None)
        self._writer.join(timeout)
        # A child that did not answer in time: its streams end as the shutdown says.
        for request_id in list(self._streams):
            self._deliver(request_id, _aborted(request_id))
        self._conn.close()

    # --- start-up -----------------------------------------------------------------------------------
    def _wait_ready(
        self, progress: Callable[[int, int], None] | None, timeout_s: float | None
    ) -> _Ready:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            # poll with a timeout, only at start-up: a child that dies before a word is noticed
            if not self._conn.poll(1.0):
                if not self._process.is_alive():
                    raise RuntimeError(
                        f"the engine process exited (code {self._process.exitcode}) "
                        "before it was ready; its log says why"
                    )
                if deadline is not None and time.monotonic() > deadline:
                    raise RuntimeError(f"the engine process was not ready in {timeout_s} s")
                continue
            try:
                message = self._conn.recv()
            except EOFError as exc:
                raise RuntimeError("the engine process exited before it was ready") from exc
            if isinstance(message, _Progress):
                if progress is not None:
                    progress(message.done, message.total)
            elif isinstance(message, _Failed):
                raise RuntimeError(f"the engine process failed to start: {message.message}")
            else:
                assert isinstance(message, _Ready), message
                return message

    def _stop_process(self) -> None:
        self._process.join(JOIN_TIMEOUT_S)
        if self._process.is_alive():
            logger.warning("the engine process did not stop; terminating it")
            self._process.terminate()
            self._process.join(JOIN_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    # --- commands: this process -> the child --------------------------------------------------------
    def _send(self, command: Command) -> None:
        if self._dead is not None:
            return  # the streams have their EngineDeadError; nothing to tell a dead child
        try:
            payload = pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise RequestError(f"the request cannot reach the engine process: {exc}") from exc
        # The id travels beside the pickled command: a command the child cannot unpickle (a
        # processor's class it cannot import) is refused for that request, not fatal to all.
        self._post(pickle.dumps((command.request_id, payload), protocol=pickle.HIGHEST_PROTOCOL))

    def _post(self, payload: bytes | None) -> None:
        with self._outbox_ready:
            self._outbox.append(payload)
            self._outbox_ready.notify()

    def _write(self) -> None:
        """The writer thread: a full pipe (a child busy in a long step) blocks it, not the loop."""
        while True:
            with self._outbox_ready:
                while not self._outbox:
                    self._outbox_ready.wait()
                payloads = list(self._outbox)
                self._outbox.clear()
            for payload in payloads:
                if payload is None:
                    return
                try:
                    self._conn.send_bytes(payload)
                except OSError as exc:  # the child died; the reader reports it
                    logger.debug("sending to the engine process failed: %r", exc)
                    return

    # --- outputs: the child -> this process ---------------------------------------------------------
    def _read(self) -> None:
        """The reader thread: one message per step, handed over in one call per event loop."""
        try:
            while True:
                message = self._conn.recv()
                if message == _BYE:
                    return
                outputs, refused, self._stats = _decode_step(message)
                if outputs:
                    self._deliver_step(outputs)
                for request_id, reason in refused:
                    self._deliver(request_id, RequestError(reason))
        except (EOFError, OSError) as exc:
            if self._stopping:
                return  # a shutdown that did not wait for the child's goodbye
            self._process.join(1.0)
            self._died(f"the engine process died (exit code {self._process.exitcode})", exc)
        except Exception as exc:  # a message this side cannot take: the two sides disagree
            logger.exception("reading the engine process's messages failed")
            self._process.kill()
            self._died("the engine process's messages could not be read", exc)

    def _died(self, reason: str, cause: BaseException) -> None:
        self._dead = f"{reason}; the server must be restarted"
        logger.error("%s (%r)", self._dead, cause)
        self._fail_all(EngineDeadError(self._dead))


def _aborted(request_id: str) -> RequestOutput:
    return RequestOutput(request_id, (), None, 0, 0, 0, FinishReason.ABORT)


# --- the child -----------------------------------------------------------------------------------------
def _child_main(spec: EngineSpec, conn: Connection) -> None:
    """The engine process's entry point (runs after `spawn` re-imported this module)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=spec.log_level, format="%(asctime)s %(levelname)s engine-core %(name)s: %(message)s"
    )
    try:
        engine = _build(spec, conn)
    except Exception as exc:  # reported to the parent, which raises it at start-up
        logger.exception("the engine process could not start")
        conn.send(_Failed(f"{type(exc).__name__}: {exc}"))
        conn.close()
        raise SystemExit(1) from exc
    conn.send(_Ready(engine.validator, engine.stats()))
    try:
        _serve(engine, conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.info("the server went away; the engine process ends")  # its socket closed


def _build(spec: EngineSpec, conn: Connection) -> LLMEngine:
    if spec.torch_threads is not None:
        torch.set_num_threads(spec.torch_threads)
    model = GptOss.from_checkpoint(
        spec.model_path,
        dtype=DTYPES[spec.dtype],
        device=spec.device,
        progress=lambda done, total: conn.send(_Progress(done, total)),
    )
    positions = model.config.max_position_embeddings
    config = dataclasses.replace(
        spec.config, max_model_len=min(spec.config.max_model_len, positions)
    )
    engine = LLMEngine(model, config, spec.grammar_vocabulary)
    started = time.perf_counter()
    engine.warm_up()
    elapsed = time.perf_counter() - started
    logger.info("warm-up step done in %.1f s (kernels: %s)", elapsed, model.kernels.name)
    return engine


def _serve(engine: LLMEngine, conn: Connection) -> None:
    """Commands in, a step, its outputs out, until a shutdown command or the parent goes away."""
    while True:
        # Block for a command only when idle; with work, take what arrived and step on.
        received = [] if engine.has_work else [conn.recv()]
        while conn.poll():
            received.append(conn.recv())
        outputs: list[RequestOutput] = []
        refused: list[tuple[str, str]] = []
        commands = _unpickle(received, refused)
        for command in commands:
            if isinstance(command, _Shutdown):
                outputs += [o for rid in list(engine.requests) if (o := engine.abort(rid))]
                conn.send(_encode_step(outputs, refused, engine.stats()))
                conn.send(_BYE)
                return
            _apply(engine, command, outputs, refused)
        if engine.has_work:
            outputs += engine.step()
        # Idle or not, the parent's snapshot must show the change (an abort, a queued request).
        if outputs or refused or received or not engine.has_work:
            conn.send(_encode_step(outputs, refused, engine.stats()))


def _unpickle(
    received: list[tuple[str, bytes]], refused: list[tuple[str, str]]
) -> list[Command | _Shutdown]:
    commands = []
    for request_id, payload in received:
        try:
            commands.append(pickle.loads(payload))
        except Exception as exc:  # that request is refused with the reason; the engine goes on
            logger.exception("the command for request %s cannot be unpickled", request_id)
            refused.append((request_id, f"the engine process cannot read the request: {exc!r}"))
    return commands


def _apply(
    engine: LLMEngine,
    command: Command,
    outputs: list[RequestOutput],
    refused: list[tuple[str, str]],
) -> None:
    if isinstance(command, _Abort):
        output = engine.abort(command.request_id)
        if output is not None:
            outputs.append(output)
        return
    assert isinstance(command, _Add), command
    try:
        engine.add_request(command.request_id, command.prompt_token_ids, command.params)
    except ValueError as exc:  # validated in the parent, but the engine's state may have moved
        refused.append((command.request_id, str(exc)))
