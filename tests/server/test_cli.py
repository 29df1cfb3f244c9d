"""The console entry point: `gpt-oss-server` and `python -m server` are one command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server.cli import build_parser, main
from server.config import settings_from_args


def test_python_dash_m_server_reports_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gpt-oss-server ")


def test_flags_and_environment_make_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPT_OSS_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("GPT_OSS_PORT", "9000")
    monkeypatch.setenv("GPT_OSS_API_KEY", "secret")
    args = build_parser().parse_args(["serve", "--port", "8123", "--protect-metrics"])
    settings = settings_from_args(args)
    assert settings.port == 8123  # the flag wins over the environment
    assert settings.max_num_seqs == 7
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "secret"
    assert settings.protect_metrics is True


def test_invalid_settings_exit_with_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    assert main(["serve", "--max-num-seqs", "zero"]) == 2
    assert "max_num_seqs" in caplog.text


def test_unknown_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
