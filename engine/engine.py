"""The engine core: requests in, one step at a time: schedule -> execute -> update -> outputs.

Synchronous and single-threaded; the server drives it from a child process (`engine_process.py`)
or a thread (`async_engine.py`).

A failure stays with the request it belongs to: a request's own logits processor raising fails that
request only; a failed model step fails the requests of that step, and the engine goes on.

Constrained requests (`SamplingParams.grammar`) need the engine built with a `GrammarVocabulary`;
their matchers live in `GrammarConstraints` (engine/constraints.py) from add to finish: a grammar
that does not compile refuses the request, a complete grammar ends it ('stop').
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.config import FULL, SLIDING
from engine.constraints import GrammarConstraints, GrammarError, GrammarVocabulary
from engine.host_memory import release_large_frees_to_os
from engine.kv_cache import KVCacheManager
from engine.model.gpt_oss import GptOss
from engine.request import FinishReason, Request
from engine.runner import ModelRunner, TokenLogprobs
from engine.sampler import Sampler, SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot take (bad token ids, too long, a duplicate id, ...)."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    block_size: int = 16
    # Tokens of KV the full-attention layers can hold across all requests.
    kv_cache_tokens: int = 65536
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 131072
    enable_prefix_caching: bool = True
    seed: int | None = None  # for requests without their own seed


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step produced for one request (the stream's unit)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[TokenLogprobs, ...] | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    finish_reason: FinishReason | None = None
    error: str | None = None

    def followed_by(self, later: RequestOutput) -> RequestOutput:
        """This output and the next one of the same request as one: the tokens of both, the
        counters and the ending of the later."""
        logprobs = None
        if self.new_logprobs is not None or later.new_logprobs is not None:
            logprobs = (self.new_logprobs or ()) + (later.new_logprobs or ())
        return dataclasses.replace(
            later,
            new_token_ids=self.new_token_ids + later.new_token_ids,
            new_logprobs=logprobs,
        )


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    generation_tokens_per_s: float = 0.0
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    cached_prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    # KV blocks a request could get now (cached idle ones count as free), and all usable ones,
    # summed over the cache groups: equal when no request holds a block.
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0


@dataclass(frozen=True, slots=True)
class RequestValidator:
    """What a request needs to run to completion, from numbers alone (no model, no cache): so an
    engine in another process can be asked in this one, before a stream starts."""

    vocab_size: int
    max_request_tokens: int  # prompt + output tokens one request may reach
    grammars: bool = False  # whether the engine can run grammars (it has their vocabulary)

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError unless the engine can run this request to completion."""
        if not prompt_token_ids:
            raise RequestError("the prompt must hold at least one token")
        vocab = self.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_token_ids):
            raise RequestError("prompt token ids must be integers")
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(
                f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})"
            )
        limit = self.max_request_tokens
        if len(prompt_token_ids) >= limit:
            raise RequestError(
                f"the prompt has {len(prompt_token_ids)} tokens; at most {limit - 1} fit "
                "(the context limit or the KV cache)"
            )
        try:
            params.check_vocab(vocab)
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        if params.grammar is not None and not self.grammars:
            raise RequestError(
                "this engine was started without a grammar vocabulary: it cannot run grammars"
            )


def sliding_pool_blocks(config: EngineConfig, window: int) -> int:
    """Blocks the sliding-window layers need: a window and a block per running sequence, plus one
    budget's worth of prefill chunk in flight, plus room to keep recent blocks cached."""
    per_seq = window // config.block_size + 2
    in_flight = -(-config.max_num_batched_tokens // config.block_size) + config.max_num_seqs
    return int(1.25 * (config.max_num_seqs * per_seq + in_flight)) + 1


class LLMEngine:
    def __init__(
        self,
        model: GptOss,
        config: EngineConfig,
        grammar_vocabulary: GrammarVocabulary | None = None,
    ) -> None:
        self.model = model
        self.config = config
        if model.device.type == "cpu":
            release_large_frees_to_os()
        mc = model.config
        if config.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's "
                f"{mc.max_position_embeddings} positions"
            )
        num_blocks = {FULL: -(-config.kv_cache_tokens // config.block_size) + 1}
        num_blocks[SLIDING] = sliding_pool_blocks(config, mc.sliding_window)
        num_blocks = {g: n for g, n in num_blocks.items() if g in mc.layer_types}
        self.kv = KVCacheManager(
            num_blocks, config.block_size, mc.sliding_window, config.enable_prefix_caching
        )
        self.cache = model.new_kv_cache(num_blocks, config.block_size)
        self.max_request_tokens = min(
            config.max_model_len, (num_blocks.get(FULL, 2) - 1) * config.block_size
        )
        self.constraints = None
        if grammar_vocabulary is not None:
            # Masks overlap the forward where a core is free for them: beside a GPU (the host
            # thread mostly launches kernels), or on a CPU that torch does not fill.
            overlap = model.device.type != "cpu" or (os.cpu_count() or 1) > torch.get_num_threads()
            self.constraints = GrammarConstraints(grammar_vocabulary, mc.vocab_size, overlap)
        self.validator = RequestValidator(
            mc.vocab_size, self.max_request_tokens, grammars=self.constraints is not None
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_seqs, config.max_num_batched_tokens, self.max_request_tokens
            ),
            self.kv,
        )
        self.runner = ModelRunner(model, self.cache, Sampler(config.seed), self.constraints)
        self.requests: dict[str, Request] = {}
        self._failed: dict[str, str] = {}  # request id -> error raised by its own processors
        self._generated: deque[tuple[float, int]] = deque()
        self._generated_total = 0

    # --- requests ---------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Request:
        self.validate(request_id, prompt_token_ids, params)
        if params.grammar is not None:
            assert self.constraints is not None  # validate() refuses grammars otherwise
            try:
                self.constraints.add(request_id, params.grammar)
            except GrammarError as exc:
                raise RequestError(str(exc)) from exc
        params = self._isolate_processors(request_id, params)
        request = Request(request_id, list(prompt_token_ids), params, arrival=time.monotonic())
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request

    def validate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """Raise RequestError unless the engine can run this request to completion."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        self.validator.check(prompt_token_ids, params)

    def _isolate_processors(self, request_id: str, params: SamplingParams) -> SamplingParams:
        """Wrap a request's logits processors so that an exception fails only that request."""
        if not params.logits_processors:
            return params

        def guard(processor: Callable) -> Callable:
            def guarded(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
                if request_id in self._failed:
                    return logits
                try:
                    return processor(output_ids, logits)
                except (
                    Exception
                ) as exc:  # the request's own code: its failure is reported, not raised
                    logger.exception("logits processor of request %s failed", request_id)
                    self._failed[request_id] = f"logits processor failed: {exc!r}"
                    return logits

            return guarded

        return dataclasses.replace(
            params, logits_processors=tuple(guard(p) for p in params.logits_processors)
        )

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self._forget(request_id)
        if request is None or request.is_finished:
            return None
        self.scheduler.finish(request, FinishReason.ABORT)
        return self._output(request, ())

    def warm_up(self) -> None:
        """One token through the whole path (schedule, forward, sample) before serving, so a
        model that cannot run fails at start-up rather than on the first request; on the CPU it
        also pages in the mapped weights of the layers' dense part."""
        if self.requests:
            raise RuntimeError("warm_up() is for an idle engine")
        request = self.add_request("warm-up", [0], SamplingParams(temperature=0.0, max_tokens=1))
        while self.has_work:
            self.step()
        if request.finish_reason is FinishReason.ERROR:
            raise RuntimeError(f"the model failed its warm-up step: {request.error}")
        self._generated.clear()
        self._generated_total = 0

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # --- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.requests:
            return []
        try:
            result = self.runner.execute(batch, self.kv)
        except Exception as exc:  # a failed step fails its requests, not the engine
            logger.exception("model step failed; failing its %d requests", len(batch.requests))
            outputs = []
            for item in batch.requests:
                self.scheduler.finish(
                    item.request, FinishReason.ERROR, f"model step failed: {exc!r}"
                )
                outputs.append(self._output(item.request, ()))
                self._forget(item.request.request_id)
            return outputs
        # A request whose own logits processor failed gets no token from this step: it ends.
        failed = {rid: self._failed.pop(rid) for rid in list(self._failed) if rid in result.sampled}
        sampled = {rid: t for rid, t in result.sampled.items() if rid not in failed}
        complete: list[str] = []
        if self.constraints is not None and self.constraints.active:
            # So does one whose grammar rejects its token (the mask makes that a bug).
            broken, complete = self.constraints.advance(sampled)
            failed.update(broken)
            for rid in broken:
                del sampled[rid]
        self.scheduler.update(batch, sampled)
        for rid in complete:  # the grammar allows nothing more: the output is whole
            self.scheduler.finish(self.requests[rid], FinishReason.STOP)
        self._generated.append((time.monotonic(), len(sampled)))
        self._generated_total += len(sampled)
        outputs = []
        for item in batch.requests:
            request = item.request
            if request.request_id in failed:
                self.scheduler.finish(request, FinishReason.ERROR, failed[request.request_id])
                outputs.append(self._output(request, ()))
            elif request.request_id in sampled:
                token = (sampled[request.request_id],)
                logprobs = result.logprobs.get(request.request_id)
                outputs.append(
                    self._output(request, token, None if logprobs is None else (logprobs,))
                )
            if request.is_finished:
                self._forget(request.request_id)
        return outputs

    def _forget(self, request_id: str) -> Request | None:
        if self.constraints is not None:
            self.constraints.remove(request_id)
        return self.requests.pop(request_id, None)

    def _output(
        self,
        request: Request,
        new_tokens: tuple[int, ...],
        logprobs: tuple[TokenLogprobs, ...] | None = None,
    ) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new_tokens,
            new_logprobs=logprobs,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=request.num_cached_prompt_tokens,
            num_output_tokens=len(request.output_token_ids),
            finish_reason=request.finish_reason,
            error=request.error,
        )

    def stats(self, window_s: float = 10.0) -> EngineStats:
        now = time.monotonic()
        while self._generated and self._generated[0][0] < now - window_s:
            self._generated.popleft()
        recent = sum(n for _, n in self._generated)
        span = (now - self._generated[0][0]) if len(self._generated) > 1 else 0.0
        s = self.scheduler
        return EngineStats(
            running=len(s.running),
            waiting=len(s.waiting),
            kv_cache_usage=self.kv.usage(),
            prefix_cache_hit_rate=s.prompt_tokens_cached / s.prompt_tokens_seen
            if s.prompt_tokens_seen
            else 0.0,
            generation_tokens_per_s=recent / span if span > 0 else 0.0,
            num_preemptions=s.num_preemptions,
            prompt_tokens_total=s.prompt_tokens_seen,
            cached_prompt_tokens_total=s.prompt_tokens_cached,
            generated_tokens_total=self._generated_total,
            kv_blocks_free=sum(pool.num_free for pool in self.kv.pools.values()),
            kv_blocks_total=sum(pool.num_usable for pool in self.kv.pools.values()),
        )
