"""The loading progress: a bar redrawn in place on a terminal, a log line per quarter elsewhere."""

from __future__ import annotations

import io
import logging

import pytest

from server.services import LoadProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_one_bar_is_redrawn_and_ends_the_line() -> None:
    stream = Terminal()
    progress = LoadProgress("tiny", stream)
    for done in range(1, 5):
        progress(done, 4)
    frames = stream.getvalue().split("\r")[1:]
    assert len(frames) == 4
    assert "[" + "#" * 15 + "." * 15 + "] 2/4 layers" in frames[1]
    assert "[" + "#" * 30 + "] 4/4 layers" in frames[3]
    assert frames[3].endswith("\n") and not frames[2].endswith("\n")


def test_elsewhere_a_log_line_per_quarter(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    progress = LoadProgress("tiny", stream)
    with caplog.at_level(logging.INFO, logger="server.services"):
        for done in range(1, 25):
            progress(done, 24)
    assert stream.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[1].split("(")[0].strip() for line in lines] == [
        "25%",
        "50%",
        "75%",
        "100%",
    ]
    assert "24/24 layers" in lines[-1]
