"""A small synthetic byte-level vocabulary carrying the harmony special tokens at unusual ids.

It lets the harmony suite run without the official vocabulary, and proves that nothing looks a
special token up by a hard-coded id: here `<|start|>` is not 200006.
"""

from __future__ import annotations

from harmony import HarmonyEncoding, encoding_from_ranks

_MERGES = [
    "th",
    "he",
    "in",
    "er",
    "an",
    "re",
    "on",
    "at",
    "en",
    "nd",
    "the",
    " t",
    " a",
    " th",
    " the",
    "ing",
    "is",
    " is",
    "to",
    " to",
    "as",
    "ar",
    "ou",
    "it",
    "st",
    "functions",
    ".get",
    "_weather",
    "assistant",
    "user",
    "system",
    "developer",
    "analysis",
    "commentary",
    "final",
    "json",
    " to=",
]

# Deliberately not harmony's order, so ids differ from o200k_harmony's in every position.
_SPECIALS = [
    "<|message|>",
    "<|call|>",
    "<|channel|>",
    "<|start|>",
    "<|return|>",
    "<|end|>",
    "<|constrain|>",
    "<|endoftext|>",
    "<|startoftext|>",
]


def synthetic_encoding() -> HarmonyEncoding:
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    for merge in _MERGES:
        ranks.setdefault(merge.encode(), len(ranks))
    first_special = len(ranks) + 17  # a gap of unused ids, as real vocabularies have
    specials = {name: first_special + i for i, name in enumerate(_SPECIALS)}
    return encoding_from_ranks(ranks, specials, name="synthetic_harmony", source="tests")
