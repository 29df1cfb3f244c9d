"""docker/compose.yaml: the server and Open WebUI wired to it (checked as data: no Docker here)."""

from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE = REPO_ROOT / "docker" / "compose.yaml"


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_the_server_is_built_from_this_repository(services: dict) -> None:
    build = services["server"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO_ROOT
    assert (context / build["dockerfile"].split(":-")[-1].rstrip("}")).is_file()


def test_open_webui_waits_for_a_healthy_server_and_shares_its_key(services: dict) -> None:
    server, webui = services["server"], services["open-webui"]
    assert "/health" in " ".join(server["healthcheck"]["test"])
    assert webui["depends_on"] == {"server": {"condition": "service_healthy"}}
    assert webui["environment"]["OPENAI_API_BASE_URL"] == "http://server:8000/v1"
    key = server["environment"]["GPT_OSS_API_KEY"]
    assert key.startswith("${GPT_OSS_API_KEY")
    assert webui["environment"]["OPENAI_API_KEY"] == key


def test_the_model_is_a_volume_under_slash_models(services: dict) -> None:
    model = services["server"]["environment"]["GPT_OSS_MODEL"]
    assert model.startswith("/models/")
    assert any(v.endswith(f":{model}:ro") for v in services["server"]["volumes"])
