"""Stop strings, matched on detokenized text as it streams, across token boundaries.

The engine stops on token ids; stop *strings* live in the output path, where text exists. A
matcher is fed each text delta and returns only text that can no longer turn out to be the start
of a stop string: it holds back the longest tail that is a prefix of some stop string, and when a
stop string completes it returns the text before it and reports the match, so the text is cut
exactly there (the stop string itself is not emitted, as in OpenAI's API). Where stop strings
overlap, the one that completes first wins, however the text was split into deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StopMatch:
    text: str  # safe to emit now
    stopped: bool  # a stop string completed; nothing after it may be emitted


class StopStringMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = tuple(stops)
        self._held = ""
        self._stopped = False

    def feed(self, delta: str) -> StopMatch:
        if self._stopped:
            return StopMatch("", True)
        if not self.stops:
            return StopMatch(delta, False)
        text = self._held + delta
        # The match that completes first wins (as generation meets it), the longer one on a tie:
        # the outcome must not depend on how the text was split into deltas.
        matches = [(i + len(stop), i) for stop in self.stops if (i := text.find(stop)) >= 0]
        if matches:
            _, start = min(matches)
            self._held = ""
            self._stopped = True
            return StopMatch(text[:start], True)
        keep = self._longest_partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return StopMatch(text[: len(text) - keep], False)

    def flush(self) -> str:
        """At the end of the stream: what was held back was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self._stopped else held

    def _longest_partial_suffix(self, text: str) -> int:
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
