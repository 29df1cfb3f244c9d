"""The model runner: a scheduled batch -> tensors -> model -> sampler -> one token per sampling request.

The host builds the flat batch once per step and reads back only the sampled ids (one transfer per
step, not per token). When constrained requests sample this step, their grammar masks are filled
in a worker thread while the forward runs, and joined just before sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.constraints import GrammarConstraints, MaskJob
from engine.kv_cache import KVCacheManager
from engine.model.forward_batch import PagedKVCache, SequenceChunk, build_forward_batch
from engine.model.gpt_oss import GptOss
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The sampled token's logprob and the top alternatives (raw model distribution)."""

    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True, slots=True)
class StepResult:
    sampled: dict[str, int]  # request id -> token, for requests whose gap closed this step
    logprobs: dict[str, TokenLogprobs]


class ModelRunner:
    def __init__(
        self,
        model: GptOss,
        cache: PagedKVCache,
        sampler: Sampler,
        constraints: GrammarConstraints | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.sampler = sampler
        self.constraints = constraints

    def execute(self, batch: ScheduledBatch, kv: KVCacheManager) -> StepResult:
        chunks = []
        for item in batch.requests:
            request = item.request
            start = request.num_computed
            tokens = request.all_token_ids[start : start + item.num_new]
            chunks.append(SequenceChunk(tokens, start, kv.block_tables(request.request_id)))
        rows = [i for i, item in enumerate(batch.requests) if item.samples]
        sampling = [batch.requests[i].request for i in rows]
        masks: MaskJob | None = None
        if self.constraints is not None and self.constraints.active and rows:
            masks = self.constraints.start_masks([r.request_id for r in sampling])
        try:
            forward = build_forward_batch(chunks, self.cache.block_size, self.model.device)
            hidden = self.model.forward(forward, self.cache)
            if not rows:
                return StepResult({}, {})
            last_tokens = forward.logits_indices[torch.tensor(rows, device=hidden.device)]
            logits = self.model.compute_logits(hidden[last_tokens])
        except BaseException:
            if masks is not None:
                masks.join()  # the worker lets go of the matchers before anything else runs
            raise
        mask = masks.wait(logits.device) if masks is not None else None
        out = self.sampler.sample(logits, [r.sampling for r in sampling], mask)
        token_ids = out.token_ids.tolist()  # the step's one device-to-host transfer
        sampled = {r.request_id: t for r, t in zip(sampling, token_ids, strict=True)}
        logprobs: dict[str, TokenLogprobs] = {}
        if out.logprobs is not None:
            chosen = out.logprobs.sampled.tolist()
            top_ids = out.logprobs.top_ids.tolist()
            top_values = out.logprobs.top_logprobs.tolist()
            for i, request in enumerate(sampling):
                count = out.logprobs.counts[i]
                if count is None:
                    continue
                top = tuple(zip(top_ids[i][:count], top_values[i][:count], strict=True))
                logprobs[request.request_id] = TokenLogprobs(chosen[i], top)
        return StepResult(sampled, logprobs)
