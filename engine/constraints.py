"""Grammar-constrained decoding: one llguidance matcher per constrained request, masks per batch.

The engine runs a request's grammar (`SamplingParams.grammar`, llguidance's Lark dialect; the
server's harmony layer writes it) as opaque text over token ids. This file owns:

- `GrammarVocabulary`: the vocabulary as llguidance builds its tokenizer from it (the ordinary
  tokens' bytes by id, the special tokens by name, the pre-tokenization regex, the end token):
  plain data, so the engine's own process builds the same tokenizer;
- `GrammarConstraints`, the batch constraint manager: it compiles a matcher when a constrained
  request is added, fills the token bitmasks of a step's constrained rows together (llguidance's
  parallel fill, which releases the GIL) in a worker thread started before the forward and joined
  before sampling (only the native fill runs there: the forward's Python keeps the GIL; with no
  core free for it, the fill runs at once instead), turns
  them into one boolean tensor of banned tokens for the sampler (numpy unpacks the bits on the
  CPU; for a GPU the packed bits cross and torch unpacks them there), and advances the matchers
  with the sampled tokens.

Requests without a grammar pay nothing: with no constrained request in the engine nothing here
runs, and with some, the masks touch only the constrained rows (unconstrained rows keep their
logits bit for bit). A matcher that rejects a sampled token (it cannot happen through the mask, so
it is a bug somewhere) fails its request; a grammar that is complete ends its request.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from llguidance import LLExecutor, LLMatcher, LLTokenizer

from engine.sampler import TokenMask

logger = logging.getLogger(__name__)

_BITS = 32  # llguidance's bitmask: one int32 word per 32 token ids, bit k of word w is id 32w + k


class GrammarError(ValueError):
    """A grammar that does not compile (against this engine's vocabulary)."""


@dataclass(frozen=True, slots=True)
class GrammarVocabulary:
    """What llguidance needs to build its tokenizer for the model's vocabulary (picklable)."""

    mergeable_ranks: Mapping[bytes, int]  # ordinary tokens: bytes -> id
    special_tokens: Mapping[str, int]  # name -> id; grammars name control tokens `<|end|>`
    pattern: str  # the pre-tokenization regex
    eos_token_id: int  # the token a complete grammar allows (grammars here end on their own)

    def tokenizer(self, vocab_size: int) -> LLTokenizer:
        """llguidance's tokenizer over at least `vocab_size` ids (ids with no bytes never match)."""
        top = max([*self.mergeable_ranks.values(), *self.special_tokens.values()]) + 1
        return LLTokenizer.from_tiktoken(  # type: ignore[attr-defined]
            encoder=dict(self.mergeable_ranks),
            special_tokens=dict(self.special_tokens),
            pattern=self.pattern,
            eos_token=self.eos_token_id,
            n_vocab=max(vocab_size, top),
        )


def banned_from_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """llguidance's bitmask [k, W] int32 -> [k, vocab] bool, True where a token is banned."""
    shifts = torch.arange(_BITS, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [k, W, 32]: bit j of word w is id 32w + j
    return (bits == 0).view(bitmask.shape[0], -1)[:, :vocab]


class MaskJob:
    """The bitmasks of one step's constrained rows, being filled by the worker thread."""

    def __init__(
        self, future: Future[None], bitmask: np.ndarray, rows: list[int], batch: int, vocab: int
    ) -> None:
        self._future = future
        self._bitmask = bitmask  # [k, W] int32, written by llguidance
        self._rows = rows
        self._batch = batch
        self._vocab = vocab

    def wait(self, device: torch.device) -> TokenMask:
        """Join the worker; the masks as the sampler applies them, on the logits' device."""
        self._future.result()
        if device.type == "cpu":
            # Bit j of a row's little-endian bytes is token j: numpy unpacks it 15x faster than
            # torch shifts on the CPU (1.2 ms for 32 rows of o200k's 201,088 ids).
            allowed = np.unpackbits(
                self._bitmask.view(np.uint8), axis=1, count=self._vocab, bitorder="little"
            )
            banned = torch.from_numpy(allowed == 0)
        else:  # the packed bits cross (32x smaller than booleans), the device unpacks them
            packed = torch.from_numpy(self._bitmask).to(device, non_blocking=True)
            banned = banned_from_bitmask(packed, self._vocab)
        rows = None
        if len(self._rows) != self._batch:
            rows = torch.tensor(self._rows, dtype=torch.long, device=device)
        return TokenMask(rows, banned)

    def join(self) -> None:
        """Wait for the worker to let go of the matchers (a step that failed half way)."""
        self._future.exception()


class GrammarConstraints:
    """The matchers of the constrained requests, and their masks step by step."""

    def __init__(self, vocabulary: GrammarVocabulary, vocab_size: int, overlap: bool) -> None:
        self.vocab_size = vocab_size  # the model's logits width
        # Fill the masks in the worker thread while the forward runs (True), or at once when the
        # step starts: overlap pays only when a core is free for it (the thread handoff costs
        # ~0.1 ms that a busy core does not earn back; LLMEngine decides).
        self.overlap = overlap
        self._tokenizer = vocabulary.tokenizer(vocab_size)  # ~1 s for o200k: once, at start-up
        self._words = -(-self._tokenizer.vocab_size // _BITS)
        self._executor = LLExecutor()
        # One worker: a step's masks are one parallel fill; steps do not overlap.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")
        self._matchers: dict[str, LLMatcher] = {}

    @property
    def active(self) -> bool:
        """Whether any constrained request is in the engine (if not, steps skip this file)."""
        return bool(self._matchers)

    def add(self, request_id: str, grammar: str) -> None:
        """Compile `grammar` for a new request; GrammarError when it does not compile."""
        matcher = LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the grammar does not compile: {matcher.get_error()}")
        self._matchers[request_id] = matcher

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def start_masks(self, request_ids: Sequence[str]) -> MaskJob | None:
        """Start filling the masks of the constrained ones among a step's sampling rows (in
        order); None when none is constrained."""
        if not self._matchers:
            return None
        rows = [i for i, rid in enumerate(request_ids) if rid in self._matchers]
        if not rows:
            return None
        targets = [(self._matchers[request_ids[i]], j) for j, i in enumerate(rows)]
        bitmask = np.empty((len(rows), self._words), dtype=np.int32)
        # The worker runs only llguidance's parallel fill, which releases the GIL throughout:
        # the forward's Python keeps the interpreter. (This is what
        # llguidance.torch.fill_next_token_bitmask_par does, without importing that module: it
        # pulls in torch.compile's inductor, seconds at start-up.)
        args = (targets, bitmask.ctypes.data, self._words * 4, len(rows))
        if self.overlap:
            future = self._worker.submit(self._executor.unsafe_compute_mask_ptr, *args)
        else:
            future = Future()
            future.set_result(self._executor.unsafe_compute_mask_ptr(*args))
        return MaskJob(future, bitmask, rows, len(request_ids), self.vocab_size)

    def advance(self, sampled: Mapping[str, int]) -> tuple[dict[str, str], list[str]]:
        """Feed each constrained request its sampled token. Returns the requests that failed
        (id -> why) and those whose grammar is now complete."""
        pairs = [(rid, m, sampled[rid]) for rid, m in self._matchers.items() if rid in sampled]
        if not pairs:
            return {}, []
        accepted = self._executor.consume_token_par([(m, t) for _, m, t in pairs])
        failed: dict[str, str] = {}
        complete: list[str] = []
        for (rid, matcher, token), ok in zip(pairs, accepted, strict=True):
            if not ok:
                logger.error("request %s: token %d broke its grammar", rid, token)
                failed[rid] = (
                    f"the sampled token {token} is not allowed by the request's grammar: "
                    f"{matcher.get_error()}"
                )
            elif matcher.is_stopped():
                complete.append(rid)
        return failed, complete
