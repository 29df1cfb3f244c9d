"""Start-up: the weights report their loading progress layer by layer, and the warm-up step runs
one token through the whole engine, leaves it idle and clean, and fails loudly when the model
cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.engine import EngineConfig, LLMEngine
from engine.model.gpt_oss import GptOss
from engine.sampler import SamplingParams


def test_loading_reports_each_layer(tiny_checkpoint: Path) -> None:
    seen: list[tuple[int, int]] = []
    model = GptOss.from_checkpoint(
        tiny_checkpoint, dtype=torch.float32, progress=lambda d, t: seen.append((d, t))
    )
    n = model.config.num_layers
    assert seen == [(i, n) for i in range(1, n + 1)]


def test_warm_up_leaves_the_engine_idle_and_clean(tiny_model: GptOss) -> None:
    engine = LLMEngine(tiny_model, EngineConfig())
    engine.warm_up()
    assert not engine.has_work and not engine.requests
    assert all(p.num_free == p.num_usable for p in engine.kv.pools.values())
    assert engine.stats().generated_tokens_total == 0
    engine.add_request("after", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=2))
    outputs = [out for _ in range(2) for out in engine.step()]
    assert [out.num_output_tokens for out in outputs] == [1, 2]


def test_warm_up_fails_loudly_when_the_model_cannot_run(
    tiny_model: GptOss, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = LLMEngine(tiny_model, EngineConfig())

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(engine.runner, "execute", broken)
    with pytest.raises(RuntimeError, match=r"warm-up step: .*no kernel for this device"):
        engine.warm_up()
