"""Batched sampling: one step's logits [B, V] -> next token ids [B], with logprobs on request.

This file owns `SamplingParams` (what a request asked for, validated once at the edge),
`SamplingState` (the per-request inputs the sampler reads each step: prompt and output ids, and the
request's own seeded generator) and `Sampler`, which runs the whole pipeline as tensor ops over the
batch. Order of operations, per step (each stage is skipped when no row in the batch needs it):

  0. logits -> a float32 copy (bf16 input is upcast; the caller's tensor is never written).
  1. logprobs, when any row asked: log_softmax of these *raw* logits, before anything below (vLLM's
     default "raw logprobs"), so they describe the model and not the sampling settings.
  2. logits_processors, per row, in the order given: they see the model's logits (a grammar decides
     on the model's view) and a -inf they write survives every stage after. A row they leave
     with no finite logit (or that min_tokens empties) has no defined sample: theirs to avoid.
     Then the grammar mask (`TokenMask`, computed for the batch by engine/constraints.py): its
     banned tokens -> -inf, in the constrained rows only, in one op.
  3. penalties, as vLLM: repetition (prompt + output ids: positive logits / r, negative * r), then
     frequency and presence (output ids only: logit -= frequency * count + presence * (count > 0)).
  4. logit_bias, added after the penalties so that -100 and +100 mean the same whatever the history.
  5. min_tokens: stop ids -> -inf while fewer than min_tokens were generated (last, so nothing revives).
     Greedy rows stop here: token = argmax of these processed logits (ties -> lowest id).
  6. temperature, then top-k, top-p (over the top-k renormalised distribution), then min-p.
  7. exponential race: argmax(probs / E), E ~ Exponential(1) per token, which draws exactly from
     `probs`. A seeded request draws E from its own generator, so its tokens do not depend on what
     else is in the batch; the others share the sampler's generator (or torch's global RNG).

Which stages run is decided from the params in Python, never from tensor values: no device syncs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain

import torch

# (output_token_ids, logits_row [V] float32) -> logits_row. Must not mutate the id list.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

# Below this temperature a row is greedy: dividing by it would overflow float32 to inf (and NaN).
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20
MAX_ABS_PENALTY = 2.0
MAX_ABS_LOGIT_BIAS = 100.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _invalid(name: str, expected: str, found: object) -> ValueError:
    return ValueError(f"SamplingParams.{name}: expected {expected}, found {found!r}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What one request asked for. Immutable and hashable (collections are normalised to tuples)."""

    temperature: float = 1.0  # 0 (below GREEDY_TEMPERATURE) means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    # Token id -> bias. A mapping or (id, bias) pairs; stored as pairs sorted by id.
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # top alternatives to return per token; None: no logprobs
    max_tokens: int = 16
    # Every id that ends the request (the engine adds the model's own end tokens here).
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    logits_processors: tuple[LogitsProcessor, ...] = ()
    # A grammar the output must follow (llguidance's Lark dialect), run by engine/constraints.py.
    grammar: str | None = None

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_counts()
        bias = dict(self.logit_bias)  # a mapping or pairs; later pairs win, as in a dict literal
        for token, value in bias.items():
            if not _is_int(token) or token < 0:
                raise _invalid("logit_bias", "token ids that are ints >= 0", token)
            if not _is_real(value) or abs(value) > MAX_ABS_LOGIT_BIAS:
                raise _invalid("logit_bias", f"biases in [-100, 100] (token {token})", value)
        object.__setattr__(self, "logit_bias", tuple(sorted(bias.items())))
        stops = tuple(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in stops):
            raise _invalid("stop_token_ids", "ints >= 0", stops)
        object.__setattr__(self, "stop_token_ids", stops)
        processors = tuple(self.logits_processors)
        if not all(callable(p) for p in processors):
            raise _invalid(
                "logits_processors", "callables (output_ids, logits_row) -> row", processors
            )
        object.__setattr__(self, "logits_processors", processors)
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar):
            raise _invalid("grammar", "None or a non-empty string", self.grammar)

    def _check_numbers(self) -> None:
        if not _is_real(self.temperature) or self.temperature < 0:
            raise _invalid("temperature", "a finite number >= 0", self.temperature)
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise _invalid("top_p", "a number in (0, 1]", self.top_p)
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise _invalid("min_p", "a number in [0, 1]", self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or abs(value) > MAX_ABS_PENALTY:
                raise _invalid(name, "a number in [-2, 2]", value)
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise _invalid("repetition_penalty", "a finite number > 0", self.repetition_penalty)

    def _check_counts(self) -> None:
        if not _is_int(self.top_k) or self.top_k < -1:
            raise _invalid("top_k", "an int >= 1, or -1 / 0 for off", self.top_k)
        if self.seed is not None and not _is_int(self.seed):
            raise _invalid("seed", "an int or None", self.seed)
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise _invalid("logprobs", f"None or an int in [0, {MAX_LOGPROBS}]", self.logprobs)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise _invalid("max_tokens", "an int >= 1", self.max_tokens)
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise _invalid(
                "min_tokens", f"an int in [0, max_tokens={self.max_tokens}]", self.min_tokens
            )

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError for token ids the model does not have (call at the edge, once)."""
        for name, ids in (
            ("logit_bias", [t for t, _ in self.logit_bias]),
            ("stop_token_ids", self.stop_token_ids),
        ):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise _invalid(name, f"token ids below the vocabulary size {vocab_size}", bad)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)


@dataclass(slots=True)
class SamplingState:
    """One request's inputs to the sampler. The engine appends each sampled id to `output_token_ids`."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: list[int] = field(default_factory=list)
    # Made from params.seed on the request's first sample, on the logits' device; advanced only by
    # this request's own draws, so the same seed gives the same tokens in any batch.
    generator: torch.Generator | None = field(default=None, init=False, repr=False)
    _prompt_ids: torch.Tensor | None = field(default=None, init=False, repr=False)

    def generator_on(self, device: torch.device) -> torch.Generator | None:
        if self.params.seed is None:
            return None
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.params.seed)
        return self.generator

    def prompt_ids_on(self, device: torch.device) -> torch.Tensor:
        # The prompt never changes: copy it to the device once, not every step.
        if self._prompt_ids is None or self._prompt_ids.device != device:
            self._prompt_ids = torch.tensor(self.prompt_token_ids, dtype=torch.long, device=device)
        return self._prompt_ids


@dataclass(frozen=True, slots=True)
class Logprobs:
    """Logprobs of the model's raw logits (log_softmax before penalties, bias and temperature)."""

    sampled: torch.Tensor  # [B] float32: each row's sampled token
    top_ids: torch.Tensor  # [B, K] int64, K = the largest `logprobs` asked in the batch
    top_logprobs: torch.Tensor  # [B, K] float32, sorted descending along K
    # Row i asked for counts[i] alternatives: its first counts[i] columns. None: it asked for none.
    counts: tuple[int | None, ...]


@dataclass(frozen=True, slots=True)
class TokenMask:
    """Tokens a step's rows may not take (grammars): `banned[j]` is the mask of row `rows[j]`."""

    rows: torch.Tensor | None  # [k] int64 row indices; None: every row, in order
    banned: torch.Tensor  # [k, V] bool, on the logits' device


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: Logprobs | None = None  # present when any row asked for logprobs


class Sampler:
    """Turns a step's logits into next tokens for a batch of requests (see the module docstring)."""

    def __init__(self, seed: int | None = None) -> None:
        # Unseeded requests draw from this generator (per device), or from torch's global RNG.
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def sample(
        self,
        logits: torch.Tensor,
        requests: Sequence[SamplingState],
        mask: TokenMask | None = None,
    ) -> SamplerOutput:
        """logits [B, V] (float32 or bf16), one row per request -> next tokens (and logprobs)."""
        assert logits.dim() == 2 and logits.shape[0] == len(requests), (logits.shape, len(requests))
        counts = tuple(r.params.logprobs for r in requests)
        raw_logprobs = None
        if any(c is not None for c in counts):
            raw_logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
        processed = self.process_logits(logits, requests, mask)
        token_ids = self._choose(processed, requests)
        if raw_logprobs is None:
            return SamplerOutput(token_ids)
        k = max(c for c in counts if c is not None)
        top = raw_logprobs.topk(k, dim=-1)  # sorted, descending
        sampled = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
        return SamplerOutput(token_ids, Logprobs(sampled, top.indices, top.values, counts))

    def process_logits(
        self,
        logits: torch.Tensor,
        requests: Sequence[SamplingState],
        mask: TokenMask | None = None,
    ) -> torch.Tensor:
        """Stages 0, 2-5: a float32 copy of `logits` with processors, the grammar mask,
        penalties, bias and min_tokens applied; what a greedy row takes the argmax of."""
        out = logits.to(torch.float32, copy=True)
        _apply_processors(out, requests)
        if mask is not None:
            _apply_token_mask(out, mask)
        _apply_penalties(out, requests)
        _apply_logit_bias(out, [r.params for r in requests])
        _apply_min_tokens(out, requests)
        return out

    def _choose(self, logits: torch.Tensor, requests: Sequence[SamplingState]) -> torch.Tensor:
        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if not random_rows:
            return logits.argmax(dim=-1)
        if len(random_rows) == len(requests):
            return self._sample_random(logits, requests)
        tokens = logits.argmax(dim=-1)
        rows = torch.tensor(random_rows, device=logits.device)
        sampled = self._sample_random(logits[rows], [requests[i] for i in random_rows])
        return tokens.index_copy_(0, rows, sampled)

    def _sample_random(
        self, logits: torch.Tensor, requests: Sequence[SamplingState]
    ) -> torch.Tensor:
        """Stages 6-7 over rows that all sample at temperature > 0 (edits `logits` in place)."""
        params = [r.params for r in requests]
        if any(p.temperature != 1 for p in params):
            logits.div_(_column([p.temperature for p in params], logits))
        logits = _top_k_top_p(logits, params)
        _min_p(logits, params)
        probs = logits.softmax(dim=-1)
        noise = self._exponential_noise(requests, logits)
        return probs.div_(noise).argmax(dim=-1)

    def _exponential_noise(
        self, requests: Sequence[SamplingState], like: torch.Tensor
    ) -> torch.Tensor:
        noise = torch.empty_like(like)
        device = like.device
        unseeded = [i for i, r in enumerate(requests) if r.params.seed is None]
        if len(unseeded) == len(requests):
            noise.exponential_(generator=self._generator_on(device))
        elif unseeded:
            rows = torch.tensor(unseeded, device=device)
            shared = torch.empty(len(unseeded), like.shape[1], device=device)
            noise.index_copy_(0, rows, shared.exponential_(generator=self._generator_on(device)))
        # One draw of V per seeded row from its own generator: a loop over rows, not tokens.
        for i, request in enumerate(requests):
            if request.params.seed is not None:
                noise[i].exponential_(generator=request.generator_on(device))
        # Exponential draws can be exactly 0; 0/0 is NaN and argmax would pick a banned token.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _generator_on(self, device: torch.device) -> torch.Generator | None:
        if self._seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]


# --- stages: each edits logits [B, V] float32 in place and returns at once when no row needs it ---


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]  # [B, 1]


def _apply_processors(logits: torch.Tensor, requests: Sequence[SamplingState]) -> None:
    # Arbitrary Python per row (grammars): cannot be batched, and rows without processors skip it.
    for i, request in enumerate(requests):
        for processor in request.params.logits_processors:
            logits[i] = processor(request.output_token_ids, logits[i])


def _apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> None:
    if mask.rows is None:
        logits.masked_fill_(mask.banned, -math.inf)
    else:  # only the constrained rows are read and written: the others keep their logits
        rows = logits.index_select(0, mask.rows).masked_fill_(mask.banned, -math.inf)
        logits.index_copy_(0, mask.rows, rows)


def _apply_penalties(logits: torch.Tensor, requests: Sequence[SamplingState]) -> None:
    rows = [i for i, r in enumerate(requests) if r.params.has_penalties]
    if not rows:
        return
    whole = len(rows) == len(requests)
    index = None if whole else torch.tensor(rows, device=logits.device)
    sub = logits if index is None else logits[index]  # [n, V]
    reqs = [requests[i] for i in rows]
    params = [r.params for r in reqs]
    out_rows, out_ids = _flat_ids([r.output_token_ids for r in reqs], sub.device)
    if any(p.repetition_penalty != 1 for p in params):
        prompts = [r.prompt_ids_on(sub.device) for r in reqs]
        prompt_rows = _row_index([len(p) for p in prompts], sub.device)
        seen = torch.zeros_like(sub, dtype=torch.bool)
        seen[prompt_rows, torch.cat(prompts)] = True
        seen[out_rows, out_ids] = True
        penalty = _column([p.repetition_penalty for p in params], sub)
        sub.copy_(torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub))
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        counts = torch.zeros_like(sub)
        counts.index_put_(
            (out_rows, out_ids), torch.ones_like(out_ids, dtype=sub.dtype), accumulate=True
        )
        sub -= _column([p.frequency_penalty for p in params], sub) * counts
        sub -= _column([p.presence_penalty for p in params], sub) * (counts > 0)
    if index is not None:
        logits[index] = sub


def _flat_ids(
    id_lists: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists -> (row index, id) pairs, flat: no padding however long one list is."""
    ids = torch.tensor(list(chain.from_iterable(id_lists)), dtype=torch.long, device=device)
    return _row_index([len(x) for x in id_lists], device), ids


def _row_index(lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    rows = torch.arange(len(lengths), device=device)
    # output_size given: repeat_interleave would otherwise sync to learn it on a GPU.
    return rows.repeat_interleave(torch.tensor(lengths, device=device), output_size=sum(lengths))


def _apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    rows = [i for i, p in enumerate(params) for _ in p.logit_bias]
    if not rows:
        return
    pairs = list(chain.from_iterable(p.logit_bias for p in params))
    ids = torch.tensor([t for t, _ in pairs], dtype=torch.long, device=logits.device)
    bias = torch.tensor([b for _, b in pairs], dtype=logits.dtype, device=logits.device)
    logits.index_put_((torch.tensor(rows, device=logits.device), ids), bias, accumulate=True)


def _apply_min_tokens(logits: torch.Tensor, requests: Sequence[SamplingState]) -> None:
    rows: list[int] = []
    ids: list[int] = []
    for i, request in enumerate(requests):
        stops = request.params.stop_token_ids
        if len(request.output_token_ids) < request.params.min_tokens:
            rows.extend([i] * len(stops))
            ids.extend(stops)
    if rows:
        device = logits.device
        logits[torch.tensor(rows, device=device), torch.tensor(ids, device=device)] = -math.inf


def _top_k_top_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    vocab = logits.shape[1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]  # vocab: off
    need_k = any(k < vocab for k in ks)
    need_p = any(p.top_p < 1 for p in params)
    if not need_p:
        if need_k:
            _top_k_only(logits, ks)
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    if need_k:
        rank = torch.arange(vocab, device=logits.device)
        ordered.masked_fill_(rank >= torch.tensor(ks, device=logits.device)[:, None], -math.inf)
    probs = ordered.softmax(dim=-1)
    # Keep a token while the mass before it is < p: the top token always stays. Off rows get
    # p = inf, since the float cumsum can reach 1 before the tail and would cut it.
    top_p = _column([p.top_p if p.top_p < 1 else math.inf for p in params], probs)
    ordered.masked_fill_(probs.cumsum(dim=-1) - probs >= top_p, -math.inf)
    return logits.scatter_(1, order, ordered)  # `order` is a permutation: every entry rewritten


def _top_k_only(logits: torch.Tensor, ks: list[int]) -> None:
    # topk of the largest k asked, not a full sort; ties with the k-th value are all kept.
    vocab = logits.shape[1]
    max_k = max(k for k in ks if k < vocab)
    kth_index = torch.tensor([min(k, max_k) - 1 for k in ks], device=logits.device)[:, None]
    kth = logits.topk(max_k, dim=-1).values.gather(1, kth_index)
    off = torch.tensor([k >= vocab for k in ks], device=logits.device)[:, None]
    logits.masked_fill_((logits < kth) & ~off, -math.inf)


def _min_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    if not any(p.min_p > 0 for p in params):
        return
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * _column([p.min_p for p in params], probs)
    logits.masked_fill_(probs < threshold, -math.inf)
