"""The scheduler: which requests run this step, and how many of their tokens.

The invariant, stated once: every request has `num_computed` tokens whose KV is cached and
`num_tokens` it knows (prompt + output). A step closes part of each gap under a token budget
(`max_num_batched_tokens`): a decode closes a gap of one, a prefill closes its gap in chunks, a
prefix-cache hit starts the gap smaller. A request whose gap closes this step samples a token.

Every step, running requests go first (oldest first), so decodes keep flowing while long prompts
prefill in chunks; then waiting requests are admitted first-come first-served while the budget,
`max_num_seqs` and the KV cache allow. When blocks run out, the newest running request is
preempted: its blocks are freed and it waits at the front of the queue to be recomputed, keeping its
outputs, so its final output is what it would have been without preemption.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.kv_cache import KVCacheManager
from engine.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # The most tokens (prompt + output) one request may reach: the context limit, or less when
    # the KV cache is smaller, so that a request always fits once it runs alone.
    max_model_len: int = 131072


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    request: Request
    num_new: int  # tokens computed this step, from request.num_computed on

    @property
    def samples(self) -> bool:
        """Whether this step closes the request's gap, so its logits give the next token."""
        return self.request.num_computed + self.num_new == self.request.num_tokens


@dataclass(frozen=True, slots=True)
class ScheduledBatch:
    requests: list[ScheduledRequest]
    num_tokens: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prompt_tokens_seen = 0
        self.prompt_tokens_cached = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted = False
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(request.num_tokens - request.num_computed, budget)
            while not self.kv.allocate(request.request_id, request.num_computed, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request.status is RequestStatus.RUNNING:
                scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
        # No admissions in a step that had to preempt: memory is short.
        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            hit = self.kv.find_prefix(request.all_token_ids)
            num_new = min(request.num_tokens - hit.num_tokens, budget)
            if not self.kv.allocate(request.request_id, hit.num_tokens, num_new, hit):
                break
            self.waiting.popleft()
            if request.num_preemptions == 0:
                request.num_cached_prompt_tokens = hit.num_tokens
                self.prompt_tokens_seen += len(request.prompt_token_ids)
                self.prompt_tokens_cached += hit.num_tokens
            request.num_computed = hit.num_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        return ScheduledBatch(scheduled, self.config.max_num_batched_tokens - budget)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, batch: ScheduledBatch, sampled: dict[str, int]) -> list[Request]:
        """Advance the scheduled requests; append sampled tokens; return those that finished."""
        finished = []
        for item in batch.requests:
            request = item.request
            if request.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed += item.num_new
            # Name the blocks this step completed before anything can free them.
            self.kv.cache_computed_blocks(
                request.request_id, request.all_token_ids, request.num_computed
            )
            token = sampled.get(request.request_id)
            if token is not None:
                request.output_token_ids.append(token)
                reason = self._stop_reason(request, token)
                if reason is not None:
                    self.finish(request, reason)
                    finished.append(request)
        return finished

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        n_out = len(request.output_token_ids)
        if token in params.stop_token_ids and n_out >= params.min_tokens:
            return FinishReason.STOP
        if n_out >= params.max_tokens or request.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(self, request: Request, reason: FinishReason, error: str | None = None) -> None:
        """End a request wherever it is (running, waiting) and give back its blocks at once."""
        if request.status is RequestStatus.FINISHED:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.error = error
