"""Shared fixtures: the official o200k_base vocabulary from ../shared (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_TIKTOKEN_DIR = Path(
    os.environ.get("GPT_OSS_SHARED_TIKTOKEN", REPO_ROOT.parent / "shared" / "tiktoken")
)
SHARED_VOCAB = SHARED_TIKTOKEN_DIR / "o200k_base.tiktoken"
NO_SHARED_VOCAB = (
    f"needs the official o200k_base vocabulary at {SHARED_VOCAB} "
    "(../shared/tiktoken beside the project root)"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return  # importing torch costs seconds: only ask about CUDA when a GPU test is collected
    import torch

    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in gpu_items:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def o200k_encoding():
    """The real o200k_harmony encoding, built from ../shared/tiktoken/o200k_base.tiktoken."""
    if not SHARED_VOCAB.is_file():
        pytest.skip(NO_SHARED_VOCAB)
    from harmony import load_harmony_encoding

    return load_harmony_encoding(SHARED_VOCAB)


@pytest.fixture(scope="session")
def oracle():
    """openai-harmony's HarmonyGptOss encoding, loaded offline from ../shared/tiktoken."""
    if not SHARED_VOCAB.is_file():
        pytest.skip(NO_SHARED_VOCAB)
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(SHARED_TIKTOKEN_DIR)
    import openai_harmony

    return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
