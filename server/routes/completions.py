"""POST /v1/completions: a raw prompt in, raw text out, for clients that render harmony themselves.

The prompt is a string (harmony's control tokens written as text become control tokens), token ids,
or a batch of either; each prompt gets `n` choices, indexed prompt-major as OpenAI does. Nothing is
added to the prompt and no stop token is implied: a raw completion ends on `max_tokens` (16 unless
given), a stop string, or the vLLM extension `stop_token_ids`. Output tokens are decoded to text
incrementally (a character split across tokens waits for its last byte; special tokens show as
their names; ids the tokenizer lacks as U+FFFD) and cut by stop strings exactly where one starts;
a stop token, like a stop string, is not shown.
Legacy `logprobs` (tokens, token_logprobs, top_logprobs, text_offset) cover the tokens whose text
was shown. The route records its own TTFT, inter-token latencies and token counts in the metrics.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from engine.engine import RequestError, RequestOutput
from engine.request import FinishReason
from engine.runner import TokenLogprobs
from engine.sampler import SamplingParams
from server.config import Settings
from server.errors import InvalidRequestError, envelope
from server.metrics import ServerMetrics, metrics_of
from server.protocol.chat import StreamOptions
from server.routes.common import (
    check_model,
    check_queue,
    check_stops,
    output_budget,
    parse_logit_bias,
    sampling_params,
    seeded,
)
from server.state import Services, ServicesDep
from server.stop_strings import StopStringMatcher

logger = logging.getLogger(__name__)
router = APIRouter()

REPLACEMENT = "\ufffd".encode()


class CompletionRequest(BaseModel):
    """OpenAI's legacy completions fields, in its order, and the vLLM extensions clients send."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str | list[int] | list[str] | list[list[int]]
    best_of: int | None = Field(None, ge=1)
    echo: bool = False
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(16, ge=1)
    n: int = Field(1, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    # vLLM extensions.
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False  # accepted: a raw completion adds no end-of-sequence token anyway

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request, svc: ServicesDep) -> Any:
    arrived = time.perf_counter()
    settings: Settings = request.app.state.server.settings
    prompts = _prompt_ids(body, svc)
    _check(body, settings, svc, len(prompts))
    params = _sampling_params(body, svc, max(len(p) for p in prompts))
    completion_id = "cmpl-" + secrets.token_hex(12)
    try:  # refuse now, before a stream has started, what the engine would refuse
        for i, prompt in enumerate(prompts):
            svc.engine.validate(f"{completion_id}-check-{i}", prompt, params)
    except RequestError as exc:
        raise InvalidRequestError(str(exc), param="prompt") from exc
    metrics = metrics_of(request.app)
    metrics.observe_prompt_tokens(sum(len(p) for p in prompts))
    table = svc.encoding.token_bytes_table()
    choices, streams = [], []
    for p, prompt in enumerate(prompts):
        prefix = _Detokenizer(table).text(prompt) if body.echo else ""
        for j in range(body.n):
            index = p * body.n + j
            choices.append(_Choice(index, p, prefix, _Detokenizer(table), body))
            choice_params = seeded(params, body.seed, index)
            streams.append(svc.engine.generate(prompt, choice_params, f"{completion_id}-{index}"))
    head = {"id": completion_id, "created": int(time.time()), "model": settings.model_id}
    events = _events(choices, streams, metrics, arrived)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(_sse(head, prompts, choices, events, include_usage), ping=15)
    logprobs: dict[int, list[_Entry]] = {c.index: [] for c in choices}
    try:
        async for choice, _, entries, _ in events:
            logprobs[choice.index].extend(entries)
    except RequestError as exc:
        raise InvalidRequestError(str(exc)) from exc
    return {
        **head,
        "object": "text_completion",
        "choices": [
            {
                "text": c.prefix + "".join(c.text),
                "index": c.index,
                "logprobs": _logprobs_json(logprobs[c.index]) if c.logprobs else None,
                "finish_reason": c.finish_reason(),
            }
            for c in choices
        ],
        "usage": _usage(prompts, choices),
        "system_fingerprint": None,
    }


# --- validation and parameters --------------------------------------------------------------------


def _prompt_ids(body: CompletionRequest, svc: Services) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [svc.encoding.encode_with_special_tokens(prompt)]
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]  # type: ignore[arg-type]
    return [
        svc.encoding.encode_with_special_tokens(p) if isinstance(p, str) else list(p)
        for p in prompt  # type: ignore[union-attr]
    ]


def _check(body: CompletionRequest, settings: Settings, svc: Services, num_prompts: int) -> None:
    check_model(body.model, settings)
    if body.suffix is not None:
        raise InvalidRequestError("suffix is not supported (no fill-in-the-middle)", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError(
            "best_of is not supported (other than best_of = n)", param="best_of"
        )
    if body.echo and body.logprobs is not None:
        raise InvalidRequestError(
            "echo with logprobs is not supported (no prompt logprobs)", param="echo"
        )
    if body.n > settings.max_n:
        raise InvalidRequestError(f"n must be at most {settings.max_n}, got {body.n}", param="n")
    check_stops(body.stop_strings(), settings)
    if body.logprobs is not None and body.logprobs > settings.max_top_logprobs:
        raise InvalidRequestError(
            f"logprobs must be at most {settings.max_top_logprobs}", param="logprobs"
        )
    if num_prompts * body.n > settings.max_waiting_requests:
        raise InvalidRequestError(
            f"{num_prompts} prompts x n={body.n} is more than the "
            f"{settings.max_waiting_requests} sequences the queue holds",
            param="prompt",
        )
    check_queue(svc, settings)


def _sampling_params(body: CompletionRequest, svc: Services, prompt_len: int) -> SamplingParams:
    # OpenAI's default for raw completions is 16 tokens.
    max_tokens = output_budget(
        svc, prompt_len, body.max_tokens, 16, param="max_tokens", prompt_param="prompt"
    )
    bias = parse_logit_bias(body.logit_bias, svc.encoding.n_vocab)
    return sampling_params(
        body,
        logit_bias=bias,
        logprobs=body.logprobs,
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        stop_token_ids=tuple(body.stop_token_ids or ()),
    )


# --- one choice: tokens -> text, stop strings, logprobs ----------------------------------------


class _Detokenizer:
    """Token ids -> text incrementally: the bytes of a character split across tokens wait."""

    def __init__(self, table: Sequence[bytes | None]) -> None:
        self.table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def token_bytes(self, token: int) -> bytes:
        data = self.table[token] if 0 <= token < len(self.table) else None
        return REPLACEMENT if data is None else data

    def feed(self, token: int) -> str:
        return self._utf8.decode(self.token_bytes(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)

    def text(self, tokens: Sequence[int]) -> str:
        return "".join(self.feed(t) for t in tokens) + self.flush()


@dataclass(frozen=True, slots=True)
class _Entry:
    """One output token's logprobs, at `offset` characters into the choice's text."""

    offset: int
    token: str
    logprob: float
    top: dict[str, float]


@dataclass
class _Choice:
    index: int
    prompt_index: int
    prefix: str  # the echoed prompt
    detok: _Detokenizer
    body: CompletionRequest
    text: list[str] = field(default_factory=list)
    shown: int = 0  # characters of generated text emitted so far
    decoded: int = 0  # characters of generated text decoded so far (some may be held back)
    pending: list[_Entry] = field(default_factory=list)
    last: RequestOutput | None = None
    stopped: bool = False  # a stop string matched
    done: bool = False
    last_token_at: float | None = None

    def __post_init__(self) -> None:
        self.stops = StopStringMatcher(self.body.stop_strings())
        self.stop_ids = frozenset(self.body.stop_token_ids or ())

    @property
    def logprobs(self) -> bool:
        return self.body.logprobs is not None

    @property
    def num_output_tokens(self) -> int:
        return self.last.num_output_tokens if self.last is not None else 0

    def feed(self, output: RequestOutput) -> str:
        """The text this output adds (after stop strings); notes its tokens' logprobs."""
        self.last = output
        pieces = []
        tokens = output.new_token_ids
        if output.finish_reason == FinishReason.STOP and tokens and tokens[-1] in self.stop_ids:
            tokens = tokens[:-1]  # a stop token is not shown, as a stop string is not
        for k, token in enumerate(tokens):
            piece = self.detok.feed(token)
            if self.logprobs and output.new_logprobs is not None:
                self.pending.append(self._entry(token, output.new_logprobs[k]))
            self.decoded += len(piece)
            match = self.stops.feed(piece)
            pieces.append(match.text)
            if match.stopped:
                self.stopped = True
                break
        return self._show("".join(pieces))

    def finish(self) -> str:
        """The held-back text at the end of generation (none after a stop string)."""
        self.done = True
        if self.stopped:
            return ""
        match = self.stops.feed(self.detok.flush())
        self.stopped = match.stopped
        return self._show(match.text if match.stopped else match.text + self.stops.flush())

    def take_logprobs(self) -> list[_Entry]:
        """Entries of the tokens whose text has been shown (all of them once finished)."""
        if self.done and not self.stopped:
            taken, self.pending = self.pending, []
            return taken
        cut = next((i for i, e in enumerate(self.pending) if e.offset >= self.shown), None)
        if cut is None:
            cut = len(self.pending)
        taken, self.pending = self.pending[:cut], self.pending[cut:]
        if self.done:
            self.pending = []
        return taken

    def finish_reason(self) -> str | None:
        if self.stopped:
            return "stop"
        reason = self.last.finish_reason if self.last is not None else None
        return None if reason is None else str(reason)

    def _show(self, text: str) -> str:
        self.shown += len(text)
        if text:
            self.text.append(text)
        return text

    def _entry(self, token: int, lp: TokenLogprobs) -> _Entry:
        def name(t: int) -> str:
            return self.detok.token_bytes(t).decode("utf-8", errors="replace")

        top = {name(t): v for t, v in lp.top}
        top.setdefault(name(token), lp.logprob)  # the sampled token is always listed
        return _Entry(len(self.prefix) + self.decoded, name(token), lp.logprob, top)


def _logprobs_json(entries: list[_Entry]) -> dict[str, list]:
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [e.top for e in entries],
        "text_offset": [e.offset for e in entries],
    }


def _usage(prompts: list[list[int]], choices: list[_Choice]) -> dict:
    completion = sum(c.num_output_tokens for c in choices)
    cached: dict[int, int] = {}
    for c in choices:
        if c.last is not None:
            cached[c.prompt_index] = max(cached.get(c.prompt_index, 0), c.last.num_cached_tokens)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": sum(cached.values())},
    }


# --- running --------------------------------------------------------------------------------------

Stream = AsyncIterator[RequestOutput]


async def _merge(
    choices: list[_Choice], streams: list[Stream]
) -> AsyncIterator[tuple[_Choice, RequestOutput | None]]:
    """Outputs of all choices as they come; (choice, None) when a choice's stream has ended.

    Leaving early (a stop string, a disconnect) closes the streams, which aborts their requests.
    """
    if len(streams) == 1:  # the common case, without tasks or a queue in the token path
        choice, stream = choices[0], streams[0]
        try:
            async for output in stream:
                yield choice, output
                if choice.stopped:
                    break
        finally:
            await stream.aclose()
        yield choice, None
        return
    queue: asyncio.Queue[tuple[_Choice, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(choice: _Choice, stream: Stream) -> None:
        item: Exception | None = None
        try:
            async for output in stream:
                queue.put_nowait((choice, output))
                if choice.stopped:
                    break
        except Exception as exc:  # handed to the consumer, which raises it
            item = exc
        finally:
            await stream.aclose()
            queue.put_nowait((choice, item))

    tasks = [asyncio.create_task(pump(c, s)) for c, s in zip(choices, streams, strict=True)]
    try:
        while not all(c.done for c in choices):
            choice, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            yield choice, item
    finally:
        for task in tasks:
            task.cancel()


async def _events(
    choices: list[_Choice], streams: list[Stream], metrics: ServerMetrics, arrived: float
) -> AsyncIterator[tuple[_Choice, str, list[_Entry], bool]]:
    """(choice, new text, its logprob entries, whether the choice ended); times every token."""
    try:
        async for choice, output in _merge(choices, streams):
            if choice.done:
                continue
            text = ""
            if output is not None:
                if output.new_token_ids:
                    now = time.perf_counter()
                    if choice.last_token_at is None:
                        metrics.observe_ttft(now - arrived)
                    else:
                        metrics.observe_itl(now - choice.last_token_at)
                    choice.last_token_at = now
                text = choice.feed(output)
            if output is None or choice.stopped:
                text += choice.finish()
                yield choice, text, choice.take_logprobs(), True
            elif text:
                yield choice, text, choice.take_logprobs(), False
    finally:
        metrics.observe_generated_tokens(sum(c.num_output_tokens for c in choices))


async def _sse(
    head: dict,
    prompts: list[list[int]],
    choices: list[_Choice],
    events: AsyncIterator[tuple[_Choice, str, list[_Entry], bool]],
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(choice: _Choice, text: str, entries: list[_Entry], end: bool) -> str:
        data = {
            **head,
            "object": "text_completion",
            "choices": [
                {
                    "text": text,
                    "index": choice.index,
                    "logprobs": _logprobs_json(entries) if choice.logprobs else None,
                    "finish_reason": choice.finish_reason() if end else None,
                }
            ],
        }
        if include_usage:
            data["usage"] = None
        return json.dumps(data, ensure_ascii=False)

    for choice in choices:
        if choice.prefix:
            yield chunk(choice, choice.prefix, [], False)
    try:
        async for choice, text, entries, end in events:
            yield chunk(choice, text, entries, end)
    except Exception as exc:  # the stream has started: report in-band, as OpenAI does
        logger.exception("completion stream %s failed", head["id"])
        yield json.dumps(envelope(f"generation failed: {type(exc).__name__}", "server_error"))
    else:
        if include_usage:
            usage = {**head, "object": "text_completion", "choices": [], "usage": None}
            usage["usage"] = _usage(prompts, choices)
            yield json.dumps(usage)
    yield "[DONE]"
