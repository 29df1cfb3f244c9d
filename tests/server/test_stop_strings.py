"""Stop strings on streamed text: the output is cut exactly before the first stop string, however
the text is split into deltas.

Proven here (hypothesis, random texts over a small alphabet so that partial matches are frequent,
split into random deltas): with a stop string somewhere in the text, the emitted text is exactly
what comes before its first occurrence and the matcher reports the stop; with no stop string in
the text, everything comes out once `flush()` is called, and never more than a stop string's
length minus one is held back; with several stop strings (none inside another) the one that
completes first wins. Plus the examples that motivate the design: overlapping partial prefixes
('aab' with stop 'ab'), a held-back prefix that turns out not to be a stop, and nothing after a stop.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from server.stop_strings import StopMatch, StopStringMatcher

ALPHABET = "abc "
texts = st.text(alphabet=ALPHABET, max_size=40)
stop_strings = st.text(alphabet=ALPHABET, min_size=1, max_size=5)


def split(text: str, cuts: Sequence[int]) -> list[str]:
    """`text` cut at the given positions (duplicates give empty deltas, which must be harmless)."""
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def stream(stops: Sequence[str], deltas: Sequence[str]) -> tuple[str, bool, list[str]]:
    """Feed every delta (even after a stop); return all emitted text, whether it stopped, and the
    text each feed returned."""
    matcher = StopStringMatcher(stops)
    pieces, stopped = [], False
    for delta in deltas:
        match = matcher.feed(delta)
        assert isinstance(match, StopMatch)
        if stopped:
            assert match == StopMatch("", True), "text emitted after a stop"
        pieces.append(match.text)
        stopped = stopped or match.stopped
    tail = matcher.flush()
    if stopped:
        assert tail == ""
    return "".join(pieces) + tail, stopped, pieces


def expected_cut(text: str, stops: Sequence[str]) -> str | None:
    """The text before the stop string that completes first (at the same end, the longest one);
    None when no stop string occurs."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if end >= len(s) and text.startswith(s, end - len(s))]
        if done:
            return text[: end - max(len(s) for s in done)]
    return None


@st.composite
def split_text(draw: st.DrawFn, text: str) -> list[str]:
    cuts = draw(st.lists(st.integers(0, len(text)), max_size=max(1, len(text))))
    return split(text, cuts)


@settings(max_examples=300, deadline=None)
@given(before=texts, stop=stop_strings, after=texts, data=st.data())
def test_the_text_is_cut_exactly_before_the_first_stop_string(
    before: str, stop: str, after: str, data: st.DataObject
) -> None:
    text = before + stop + after
    deltas = data.draw(split_text(text))
    emitted, stopped, _ = stream([stop], deltas)
    assert stopped
    assert emitted == text[: text.index(stop)]


@settings(max_examples=300, deadline=None)
@given(text=texts, stops=st.lists(stop_strings, min_size=1, max_size=3), data=st.data())
def test_without_a_stop_string_everything_comes_out(
    text: str, stops: list[str], data: st.DataObject
) -> None:
    assume(not any(s in text for s in stops))
    deltas = data.draw(split_text(text))
    emitted, stopped, pieces = stream(stops, deltas)
    assert not stopped
    assert emitted == text
    # Before the flush, only a possible start of a stop string is held back.
    held = len(text) - len("".join(pieces))
    assert held <= max(len(s) for s in stops) - 1


@settings(max_examples=300, deadline=None)
@given(text=texts, stops=st.lists(stop_strings, min_size=2, max_size=4), data=st.data())
def test_with_several_stop_strings_the_first_to_complete_wins(
    text: str, stops: list[str], data: st.DataObject
) -> None:
    # None inside another: then "starts first" and "completes first" name the same occurrence.
    assume(not any(a in b for a in stops for b in stops if a is not b))
    cut = expected_cut(text, stops)
    deltas = data.draw(split_text(text))
    emitted, stopped, _ = stream(stops, deltas)
    assert stopped == (cut is not None)
    assert emitted == (text if cut is None else cut)


@pytest.mark.parametrize(
    ("stops", "deltas", "expected"),
    [
        (["ab"], ["a", "a", "b", "c"], "a"),  # the first 'a' is given up when 'aa' arrives
        (["ab"], ["aab"], "a"),
        (["aab"], ["a", "a", "a", "b"], "a"),  # 'aaa': only the last 'aa' can still start 'aab'
        (["world", "lo"], ["hello world"], "hel"),
        (["lo", "world"], ["hel", "lo wor", "ld"], "hel"),
        (["\n\n", "END"], ["line", "\n", "E", "ND\n\n"], "line\n"),
    ],
)
def test_examples(stops: list[str], deltas: list[str], expected: str) -> None:
    emitted, stopped, _ = stream(stops, deltas)
    assert stopped
    assert emitted == expected


def test_a_held_prefix_comes_out_when_it_is_not_a_stop_after_all() -> None:
    matcher = StopStringMatcher(["world"])
    assert matcher.feed("hello wo") == StopMatch("hello ", False)
    assert matcher.feed("r") == StopMatch("", False)
    assert matcher.feed("m!") == StopMatch("worm!", False)
    assert matcher.feed("w") == StopMatch("", False)
    assert matcher.flush() == "w"
    assert matcher.flush() == ""


def test_nothing_comes_out_after_a_stop() -> None:
    matcher = StopStringMatcher(["</s>"])
    assert matcher.feed("done</") == StopMatch("done", False)
    assert matcher.feed("s>and more") == StopMatch("", True)
    assert matcher.feed("even more") == StopMatch("", True)
    assert matcher.flush() == ""


def test_no_stop_strings_pass_text_through_and_empty_ones_are_refused() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == StopMatch("anything", False)
    assert matcher.flush() == ""
    with pytest.raises(ValueError, match="must not be empty"):
        StopStringMatcher(["ok", ""])


def test_a_stop_string_inside_another_cuts_the_same_however_the_text_is_split() -> None:
    stops = ["END", "THE END."]
    whole, _, _ = stream(stops, ["THE END."])
    by_char, _, _ = stream(stops, list("THE END."))
    assert whole == by_char
