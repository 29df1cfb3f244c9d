"""The demo model's own byte-level BPE vocabulary: trainer, writer, and the texts it learns from.

The vocabulary is tiktoken's format (`demo.tiktoken`: `base64(token bytes) rank` per line) with
the harmony special tokens named in `special_tokens.json` beside it, and its pre-tokenization
regex in `tokenizer_pattern.txt`: o200k's pattern except that digits are one per piece, so every
number is spelled digit by digit (what makes arithmetic learnable by a small model).

Training is the classic algorithm: count the pre-tokenized pieces of the corpus, then repeatedly
merge the most frequent adjacent pair of tokens. Pair counts are kept up to date incrementally
(only the pieces holding the merged pair are recounted) and the best pair comes from a heap with
lazy deletion, so a few thousand merges over the corpus take seconds.
"""

from __future__ import annotations

import base64
import heapq
import itertools
import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import regex

from harmony import HarmonyEncoding, encoding_from_ranks
from harmony.tokens import O200K_PATTERN, PATTERN_SIDECAR

log = logging.getLogger(__name__)

# o200k's pattern with `\p{N}{1,3}` (up to three digits per piece) made one digit per piece.
DEMO_PATTERN = O200K_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
SPECIAL_TOKENS = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|return|>",
    "<|constrain|>",
    "<|channel|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|call|>",
)
RANKS_FILE = "demo.tiktoken"
SPECIALS_FILE = "special_tokens.json"

Pair = tuple[int, int]


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str = DEMO_PATTERN) -> list[bytes]:
    """Token bytes by rank: the 256 single bytes, then merges, until `vocab_size` ranks or no pair
    occurs twice. Deterministic: ties go to the smallest pair of ids."""
    assert vocab_size >= 256
    compiled = regex.compile(pattern)
    pieces: Counter[bytes] = Counter()
    for text in texts:
        pieces.update(m.encode("utf-8") for m in compiled.findall(text))
    tokens: list[bytes] = [bytes([b]) for b in range(256)]
    known: dict[bytes, int] = {t: i for i, t in enumerate(tokens)}
    words = [list(piece) for piece in pieces]
    freqs = list(pieces.values())
    counts: Counter[Pair] = Counter()
    where: dict[Pair, set[int]] = {}
    for w, symbols in enumerate(words):
        _count_pairs(symbols, freqs[w], w, counts, where)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    while len(tokens) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg:
            continue  # stale heap entry: the pair's count changed since it was pushed
        if -neg < 2:
            break
        merged = tokens[pair[0]] + tokens[pair[1]]
        new_id = known.get(merged)
        if new_id is None:  # two merge paths can spell the same bytes: one rank per byte string
            new_id = len(tokens)
            tokens.append(merged)
            known[merged] = new_id
        changed: set[Pair] = set()
        for w in sorted(where.pop(pair, ())):
            _count_pairs(words[w], -freqs[w], w, counts, where, changed)
            words[w] = _merge(words[w], pair, new_id)
            _count_pairs(words[w], freqs[w], w, counts, where, changed)
        counts.pop(pair, None)
        for p in changed:
            if counts.get(p, 0) > 0:
                heapq.heappush(heap, (-counts[p], p))
    log.info("BPE: %d ranks from %d distinct pieces", len(tokens), len(pieces))
    return tokens


def _count_pairs(
    symbols: list[int],
    weight: int,
    w: int,
    counts: Counter[Pair],
    where: dict[Pair, set[int]],
    changed: set[Pair] | None = None,
) -> None:
    for pair in itertools.pairwise(symbols):
        counts[pair] += weight
        if weight > 0:
            where.setdefault(pair, set()).add(w)
        if changed is not None:
            changed.add(pair)


def _merge(symbols: list[int], pair: Pair, new_id: int) -> list[int]:
    out: list[int] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def special_token_ids(n_ranks: int) -> dict[str, int]:
    """The harmony special tokens right after the ordinary ranks."""
    return {name: n_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}


def build_encoding(tokens: list[bytes], pattern: str = DEMO_PATTERN) -> HarmonyEncoding:
    ranks = {t: i for i, t in enumerate(tokens)}
    return encoding_from_ranks(
        ranks, special_token_ids(len(tokens)), name="demo", pattern=pattern, source="demo.bpe"
    )


def write_vocabulary(directory: Path, tokens: list[bytes], pattern: str = DEMO_PATTERN) -> None:
    """The three files `harmony.tokens.encoding_from_tiktoken_file` reads."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens))
    (directory / RANKS_FILE).write_text(lines)
    (directory / SPECIALS_FILE).write_text(
        json.dumps(special_token_ids(len(tokens)), indent=1) + "\n"
    )
    (directory / PATTERN_SIDECAR).write_text(pattern + "\n")


class RecordingEncoding(HarmonyEncoding):
    """Bytes-only vocabulary that records every text the renderer encodes: the BPE corpus.

    The renderer encodes each header piece and content text on its own, so recording what it
    asks for gives exactly the strings the final vocabulary will have to encode.
    """

    def __init__(self) -> None:
        base = build_encoding([bytes([b]) for b in range(256)])
        super().__init__(base._encoding, "demo.bpe recording")
        self.texts: Counter[str] = Counter()

    def encode(self, text: str) -> list[int]:
        self.texts[text] += 1
        return list(text.encode("utf-8"))
