"""`--model`: nothing (the bundled demo), a directory, or a Hugging Face repo id (local cache, or a
download only when allowed); everything else is a clear error naming the fix."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest

from server import model_source
from server.config import Settings
from server.model_source import ModelNotFoundError, resolve_model, served_name


def test_a_directory_is_served_as_it_is(tmp_path: Path) -> None:
    source = resolve_model(str(tmp_path), allow_download=False)
    assert source.path == tmp_path and not source.is_demo


def test_no_model_is_the_bundled_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(model_source, "DEMO_MODEL_DIR", tmp_path)
    with caplog.at_level("INFO", logger="server.model_source"):
        source = resolve_model(None, allow_download=False)
    assert source.path == tmp_path and source.is_demo
    assert "--model /path/to/gpt-oss-20b" in caplog.text
    assert Settings().model_id == "gpt-oss-demo"


def test_a_missing_demo_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_source, "DEMO_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(ModelNotFoundError, match="--model"):
        resolve_model(None, allow_download=False)


def test_a_path_that_does_not_exist_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        resolve_model(str(tmp_path / "nope" / "gpt-oss-20b" / "x"), allow_download=False)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def test_a_repo_id_in_the_local_cache_is_served_offline(hf_cache: Path) -> None:
    snapshot = hf_cache / "models--acme--tiny-gpt-oss" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    source = resolve_model("acme/tiny-gpt-oss", allow_download=False)
    assert source.path == snapshot
    assert served_name("acme/tiny-gpt-oss") == "tiny-gpt-oss"


def test_a_repo_id_absent_offline_says_how_to_download(hf_cache: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="pass --allow-download"):
        resolve_model("openai/gpt-oss-20b", allow_download=False)
