"""The console entry point: `gpt-oss-server` and `python -m server` are one command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server.cli import main


def test_python_dash_m_server_reports_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gpt-oss-server ")


def test_serve_says_plainly_that_it_is_not_built_yet(caplog: pytest.LogCaptureFixture) -> None:
    assert main(["serve"]) == 2
    assert "not built yet" in caplog.text


def test_unknown_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
