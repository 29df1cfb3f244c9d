"""Every code snippet in README.md runs, as a new user would run it.

The README's fenced `bash` and `python` blocks are read in order and each must be claimed by one of
the runners below; a snippet no runner claims fails the suite, so a README change cannot add an
untested command:
- `bash scripts/serve.sh`: run verbatim from the repository root (it sets everything up and serves
  the bundled demo model), on a free port given through `GPT_OSS_PORT`, until `/health` is 200;
- `curl ...` and `python` snippets: run against that server, the address `127.0.0.1:8000`
  rewritten to its port; they must exit 0 and print something (the Python snippets check what
  they print themselves, with `assert`s a reader can see);
- `python -m engine.model.random_checkpoint ...`: run (it writes a tiny checkpoint);
- `bash scripts/test.sh`: the command CI runs (`.ci/run` must end by calling exactly it), so it
  runs on every CI run rather than recursively here;
- `docker ...`: the commands `tests/docker` runs for real with podman (it must use the same
  Dockerfile, port, volume and variables).
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.docker.serving import free_port, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
DEFAULT_ADDRESS = "127.0.0.1:8000"

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Snippet:
    lang: str
    code: str
    line: int

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def readme_snippets() -> list[Snippet]:
    text = README.read_text()
    return [
        Snippet(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
        for m in FENCE.finditer(text)
        if m.group(1) in ("bash", "sh", "python", "console", "shell")
    ]


def kind_of(snippet: Snippet) -> str:
    code = snippet.code
    if snippet.lang == "python":
        return "client"
    if snippet.lang != "bash":
        return "unclaimed"
    if code.strip() == "bash scripts/serve.sh":
        return "serve"
    if code.strip() == "bash scripts/test.sh":
        return "test"
    if code.lstrip().startswith("curl "):
        return "client"
    if code.lstrip().startswith("python -m engine.model.random_checkpoint"):
        return "command"
    if all(
        line.lstrip().startswith("docker ") or "docker compose" in line for line in _commands(code)
    ):
        return "docker"
    return "unclaimed"


def _commands(code: str) -> list[str]:
    """A shell snippet's commands, continuation lines joined."""
    return [c.strip() for c in code.replace("\\\n", " ").splitlines() if c.strip()]


SNIPPETS = readme_snippets()


def test_every_snippet_is_claimed_by_a_runner() -> None:
    unclaimed = [str(s) for s in SNIPPETS if kind_of(s) == "unclaimed"]
    assert not unclaimed, f"README snippets that no test runs: {unclaimed}"
    assert [kind_of(s) for s in SNIPPETS].count("serve") == 1


def test_the_test_command_is_what_ci_runs() -> None:
    (snippet,) = [s for s in SNIPPETS if kind_of(s) == "test"]
    last_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert last_command == "exec " + snippet.code.strip()


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The README's serve command, verbatim, on a free port."""
    (snippet,) = [s for s in SNIPPETS if kind_of(s) == "serve"]
    port = free_port()
    env = {
        **os.environ,
        "GPT_OSS_PORT": str(port),
        "GPT_OSS_STATE_DIR": str(tmp_path_factory.mktemp("readme-state")),
    }
    env.pop("GPT_OSS_MODEL", None)
    process = subprocess.Popen(
        ["bash", "-c", snippet.code], cwd=ROOT, env=env, start_new_session=True
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", lambda: process.poll() is None, timeout=600)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if kind_of(s) == "client"], ids=str)
def test_client_snippet_runs_against_the_served_demo(readme_server: str, snippet: Snippet) -> None:
    code = snippet.code.replace(DEFAULT_ADDRESS, readme_server)
    command = [sys.executable, "-c", code] if snippet.lang == "python" else ["bash", "-c", code]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"{snippet} failed:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), f"{snippet} printed nothing"
    if "curl" in code and '"stream": true' in code:
        assert result.stdout.rstrip().endswith("data: [DONE]"), result.stdout[-500:]


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if kind_of(s) == "command"], ids=str)
def test_command_snippet_runs(snippet: Snippet, tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", "-c", snippet.code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{snippet} failed:\n{result.stdout}\n{result.stderr}"


def test_docker_snippets_use_the_images_files_and_settings() -> None:
    """No Docker engine runs here: tests/docker builds and runs the CPU image with podman with
    these same settings; this checks the README's commands name real files and settings."""
    from server.config import Settings

    settings_env = {f"GPT_OSS_{name.upper()}" for name in Settings.model_fields}
    commands = [c for s in SNIPPETS if kind_of(s) == "docker" for c in _commands(s.code)]
    assert commands
    for command in commands:
        words = command.split()
        for flag, value in itertools.pairwise(words):
            if flag == "-f":
                assert (ROOT / value).is_file(), command
            if flag == "-e":
                assert value.split("=")[0] in settings_env, command
        for word in words:
            if "=" in word and word.startswith("GPT_OSS_") and "compose" in command:
                compose = (ROOT / "docker" / "compose.yaml").read_text()
                assert word.split("=")[0] in compose, command
