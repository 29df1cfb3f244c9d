"""The image's own command, run outside a container: same program, flags and environment.

ENTRYPOINT, CMD and the final stage's ENV are read from the Dockerfile; only the paths inside the
image (/opt/venv, /models, the state directory) and the port are replaced by local ones.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.docker.dockerfile import final_stage
from tests.docker.serving import (
    chat_once,
    free_port,
    stream_through_stop,
    wait_healthy,
    write_tiny_model,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO_ROOT / "Dockerfile", REPO_ROOT / "docker" / "Dockerfile.cuda"]
IMAGE_VENV = "/opt/venv"


def image_command(dockerfile: Path, paths: dict[str, Path], port: int) -> tuple[list[str], dict]:
    """argv and environment of the image's command, with image paths mapped to local ones."""
    stage = final_stage(dockerfile)
    image_env = stage.environment({"PATH": os.environ["PATH"]})

    def local(value: str) -> str:
        for inside, outside in paths.items():
            value = value.replace(inside, str(outside))
        return value

    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT_OSS_")}
    env.update({name: local(value) for name, value in image_env.items()})
    env["GPT_OSS_PORT"] = str(port)
    argv = [local(arg) for arg in stage.argv]
    program = shutil.which(argv[0], path=env["PATH"])
    assert program is not None, f"{argv[0]} is not on the image's PATH ({env['PATH']})"
    return [program, *argv[1:]], env


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_runs_the_server_as_pid_1_in_exec_form(dockerfile: Path) -> None:
    stage = final_stage(dockerfile)
    assert stage.argv[:2] == ["gpt-oss-server", "serve"]
    assert stage.stopsignal == "SIGTERM"
    assert stage.user is not None and stage.user.split(":")[0] not in {"0", "root"}
    assert "/health" in (stage.healthcheck or "")
    assert "8000" in stage.expose
    assert "/models" in stage.volumes
    env = stage.environment({"PATH": "/usr/bin"})
    assert env["GPT_OSS_HOST"] == "0.0.0.0"
    assert "GPT_OSS_MODEL" not in env  # the user's (-e GPT_OSS_MODEL=/models/...); else the demo
    assert env["GPT_OSS_PORT"] == "8000"
    assert env["PATH"].startswith(IMAGE_VENV + "/bin:")
    # Every GPT_OSS_* variable the image sets is a server setting (a typo would be an error).
    from server.config import Settings

    for name in env:
        if name.startswith("GPT_OSS_"):
            assert name[len("GPT_OSS_") :].lower() in Settings.model_fields, name


@pytest.mark.slow
def test_the_image_command_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path / "model")
    port = free_port()
    paths = {
        IMAGE_VENV: Path(sys.prefix),
        "/models": model_dir,
        "/var/lib/gpt-oss-server": tmp_path / "state",
    }
    argv, env = image_command(REPO_ROOT / "Dockerfile", paths, port)
    env["GPT_OSS_MODEL"] = str(model_dir)  # as `docker run -e GPT_OSS_MODEL=/models` would
    base_url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        statuses = wait_healthy(base_url, lambda: process.poll() is None, timeout=120)
        assert statuses == [503, 200]  # "loading" while the model loads, then ready
        chat_once(base_url)

        stopped_at: list[float] = []

        def sigterm() -> None:
            stopped_at.append(time.monotonic())
            process.send_signal(signal.SIGTERM)

        outcome = stream_through_stop(base_url, model_dir, sigterm)
        code = process.wait(timeout=60)
        took = time.monotonic() - stopped_at[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log_text = log_path.read_text(errors="replace")
    assert code == 0, f"exit status {code}\n{log_text[-3000:]}"
    assert took < 35, f"the stop took {took:.1f} s"
    assert "Traceback" not in log_text, log_text[-3000:]
    assert outcome.chunks, outcome
