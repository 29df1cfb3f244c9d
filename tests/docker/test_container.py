"""The CPU image, built and run for real with podman: health, one chat completion, a clean stop,
the fused CPU kernels in use.

Needs podman, runc and the local base image that `scripts/container_prereqs.sh` installs and
makes (CI runs it first). Without them the test skips and says so, except under CI=true, where
it fails: CI must not pass without having run the image.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.docker.serving import (
    chat_once,
    free_port,
    stream_through_stop,
    wait_healthy,
    write_tiny_model,
)

pytestmark = [pytest.mark.slow, pytest.mark.container]
logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("GPT_OSS_TEST_BASE_IMAGE", "localhost/gpt-oss-base:bookworm")
IMAGE = "localhost/gpt-oss-server:test"
PREREQS = "bash scripts/container_prereqs.sh"
# Docker's default stop timeout: the server must drain and exit 0 within it.
STOP_TIMEOUT_S = 10
MAX_IMAGE_BYTES = 1_500_000_000
# What lets podman run containers inside this sandbox (see scripts/container_prereqs.sh).
CONTAINERS_CONF = """\
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


@dataclass
class Podman:
    env: dict[str, str]
    log_dir: Path

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        result = subprocess.run(
            ["podman", "--runtime", "runc", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}"
            )
        return result.stdout.strip()

    def logs(self, name: str) -> str:
        """The container's stdout and stderr, interleaved as written."""
        result = subprocess.run(
            ["podman", "logs", name],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
            check=False,
        )
        return result.stdout


def _missing() -> str | None:
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    found = subprocess.run(["podman", "image", "exists", BASE_IMAGE], check=False)
    if found.returncode != 0:
        return f"the base image {BASE_IMAGE} is not there"
    return None


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    reason = _missing()
    if reason is not None:
        message = f"{reason}: `{PREREQS}` installs podman, runc and makes the base image"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the container test; {message}")
        pytest.skip(message)
    directory = tmp_path_factory.mktemp("podman")
    conf = directory / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return Podman({**os.environ, "CONTAINERS_CONF": str(conf)}, directory)


def _local_torch_wheels() -> Path | None:
    links = os.environ.get("PIP_FIND_LINKS", "")
    if links and Path(links).is_dir() and any(Path(links).glob("torch-*.whl")):
        return Path(links)
    return None


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    """Build the image from the repository's Dockerfile (layers cached by podman between runs)."""
    args = [
        "build",
        "--isolation=chroot",  # the sandbox's cgroups are not usable for RUN steps
        "--format=docker",  # OCI images drop HEALTHCHECK
        f"--build-arg=BASE_IMAGE={BASE_IMAGE}",
        f"--tag={IMAGE}",
    ]
    ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if ca and Path(ca).is_file():  # pip inside the build trusts what pip here trusts
        args += [f"--volume={ca}:/run/host-ca.crt:ro", "--env=PIP_CERT=/run/host-ca.crt"]
    wheels = _local_torch_wheels()
    if wheels is not None:  # the local CPU wheel of torch instead of the CPU index
        args += [
            f"--volume={wheels}:/run/wheels:ro",
            "--env=PIP_FIND_LINKS=/run/wheels",
            "--build-arg=TORCH_INDEX_URL=",
        ]
    previous = podman("image", "inspect", "--format={{.Id}}", IMAGE, check=False)
    log = podman.log_dir / "build.log"
    started = time.monotonic()
    with log.open("w") as out:
        result = subprocess.run(
            ["podman", *args, str(REPO_ROOT)],
            env=podman.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=900,
            check=False,
        )
    assert result.returncode == 0, f"podman build failed:\n{log.read_text()[-5000:]}"
    logger.info("podman build: %.1f s", time.monotonic() - started)
    if previous and previous != podman("image", "inspect", "--format={{.Id}}", IMAGE):
        # The last build's image goes, and with it the layers only it had (the venv, 100+ MB):
        # each run whose sources changed would leave them behind. The build cache stays.
        podman("rmi", previous, check=False)
    return IMAGE


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = write_tiny_model(tmp_path / "model")
    for path in [directory, *directory.iterdir()]:  # the image's user is not root
        path.chmod(0o755 if path.is_dir() else 0o644)
    return directory


@pytest.fixture
def container(podman: Podman, image: str, model_dir: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    name = f"gpt-oss-server-test-{os.getpid()}-{port}"
    podman(
        "run",
        "--detach",
        f"--name={name}",
        "--network=host",  # the test reaches it on loopback
        f"--volume={model_dir}:/models/tiny-gpt-oss:ro",
        "--env=GPT_OSS_MODEL=/models/tiny-gpt-oss",
        f"--env=GPT_OSS_PORT={port}",  # configured through the environment, like the flags
        "--env=GPT_OSS_API_KEY=test-key",
        image,
    )
    try:
        yield name, port
    finally:
        logs = podman.logs(name)
        (podman.log_dir / f"{name}.log").write_text(logs)
        podman("rm", "--force", "--time=0", name, check=False)


def test_the_image_is_small_and_runs_as_a_user(podman: Podman, image: str) -> None:
    size = int(podman("image", "inspect", "--format={{.Size}}", image))
    logger.info("image size: %.2f GB", size / 1e9)
    assert size < MAX_IMAGE_BYTES, f"the image is {size / 1e9:.2f} GB"
    user = podman("image", "inspect", "--format={{.Config.User}}", image)
    assert user and user.split(":")[0] not in {"0", "root"}


def test_the_container_serves_and_stops_cleanly(
    podman: Podman, container: tuple[str, int], model_dir: Path
) -> None:
    name, port = container
    base_url = f"http://127.0.0.1:{port}"

    def running() -> bool:
        return podman("inspect", "--format={{.State.Running}}", name) == "true"

    started = time.monotonic()
    wait_healthy(base_url, running, timeout=180)
    logger.info("healthy %.1f s after the start", time.monotonic() - started)
    # The image's own HEALTHCHECK command, run inside the container, agrees.
    podman("healthcheck", "run", name)
    assert podman("exec", name, "id", "-u") == "10001"
    headers = {"Authorization": "Bearer test-key"}
    chat_once(base_url, headers)

    stop_took: list[float] = []

    def stop() -> None:
        def run() -> None:
            started = time.monotonic()
            podman("stop", f"--time={STOP_TIMEOUT_S}", name, timeout=STOP_TIMEOUT_S + 60)
            stop_took.append(time.monotonic() - started)

        threading.Thread(target=run, daemon=True).start()

    stream_through_stop(base_url, model_dir, stop, headers=headers)
    deadline = time.monotonic() + STOP_TIMEOUT_S + 60
    while not stop_took and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stop_took, "podman stop did not return"
    exit_code = podman("inspect", "--format={{.State.ExitCode}}", name)
    logger.info("podman stop: %.1f s, exit code %s", stop_took[0], exit_code)
    logs = podman.logs(name)
    assert exit_code == "0", f"exit code {exit_code} after {stop_took[0]:.1f} s:\n{logs[-3000:]}"
    assert stop_took[0] < STOP_TIMEOUT_S
    assert "Traceback" not in logs, logs[-3000:]
    # The image has no compiler: the fused CPU kernels compiled in its builder stage are used.
    assert "(kernels: cpu-" in logs, logs[-3000:]


def test_the_image_serves_the_bundled_demo_with_no_arguments(podman: Podman, image: str) -> None:
    """`docker run IMAGE` as the README gives it: no model mounted, no variables."""
    port = free_port()
    name = f"gpt-oss-server-demo-{os.getpid()}-{port}"
    podman(
        "run",
        "--detach",
        f"--name={name}",
        "--network=host",
        f"--env=GPT_OSS_PORT={port}",  # the only change: the test's free port
        image,
    )
    try:
        base_url = f"http://127.0.0.1:{port}"

        def running() -> bool:
            return podman("inspect", "--format={{.State.Running}}", name) == "true"

        wait_healthy(base_url, running, timeout=180)
        completion = chat_once(base_url)
        assert completion["model"] == "gpt-oss-demo"
        assert "bundled demo model" in podman.logs(name)
    finally:
        (podman.log_dir / f"{name}.log").write_text(podman.logs(name))
        podman("rm", "--force", "--time=0", name, check=False)
