"""Engine fixtures: tiny random gpt-oss models, built once per session, and a one-thread switch.

The checkpoints have the real Hugging Face layout (experts really MXFP4); the models compute in
float32 so that "batched equals alone" comparisons are about scheduling, not bf16 rounding. A model
holds no per-request state (the KV cache belongs to each `LLMEngine`), so tests build their own
engines on top of the shared models: `tiny_model` (the `tiny` preset, a 128-token window) and
`small_window_model` (a 32-token window, for short property-test prompts that still slide).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.config import preset
from engine.model.gpt_oss import GptOss
from engine.model.random_checkpoint import write_random_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-engine-checkpoint")
    return write_random_checkpoint(directory, preset("tiny"), layout="hf", seed=11)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path) -> GptOss:
    return GptOss.from_checkpoint(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="session")
def small_window_model(tmp_path_factory: pytest.TempPathFactory) -> GptOss:
    """The tiny model with a 32-token sliding window: short prompts cross it many times."""
    directory = tmp_path_factory.mktemp("tiny-window-32")
    config = dataclasses.replace(preset("tiny"), sliding_window=32)
    path = write_random_checkpoint(directory, config, layout="hf", seed=12)
    return GptOss.from_checkpoint(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run the tiny model on one intra-op thread: its ops are too small to split, and when other
    processes share the cores, spinning OpenMP workers make a step many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
