"""Start-up: from settings to the loaded vocabulary, model and engine the routes use."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

import torch

from engine.async_engine import AsyncEngine
from engine.config import DTYPES
from engine.engine import EngineConfig, LLMEngine
from engine.model.gpt_oss import GptOss
from harmony import ReasoningEffort, load_harmony_encoding
from server.config import Settings
from server.harmony_bridge import PromptDefaults
from server.model_source import resolve_model
from server.state import Services

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return device


class LoadProgress:
    """The weights' loading progress: a bar redrawn in place on a terminal, else a log line at
    each quarter (logs and containers have no terminal to redraw)."""

    WIDTH = 30

    def __init__(self, what: str, stream: TextIO | None = None) -> None:
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.on_terminal = self.stream.isatty()
        self.start = time.perf_counter()
        self._logged_quarter = 0

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.start
        if self.on_terminal:
            filled = self.WIDTH * done // total
            bar = "#" * filled + "." * (self.WIDTH - filled)
            end = "\n" if done == total else ""
            self.stream.write(
                f"\rloading {self.what} [{bar}] {done}/{total} layers {elapsed:.1f} s{end}"
            )
            self.stream.flush()
            return
        quarter = 4 * done // total
        if quarter > self._logged_quarter:
            self._logged_quarter = quarter
            logger.info(
                "loading %s: %d%% (%d/%d layers, %.1f s)",
                self.what,
                100 * done // total,
                done,
                total,
                elapsed,
            )


def load_services(settings: Settings) -> Services:
    start = time.perf_counter()
    source = resolve_model(settings.model, allow_download=settings.allow_download)
    encoding = load_harmony_encoding(
        settings.tokenizer, model_dir=source.path, allow_download=settings.allow_download
    )
    logger.info("tokenizer %s", encoding)
    device = resolve_device(settings.device)
    model = GptOss.from_checkpoint(
        source.path,
        dtype=DTYPES[settings.dtype],
        device=device,
        progress=LoadProgress(f"{source.path.name} on {device}"),
    )
    vocab = model.config.vocab_size
    beyond = [
        name for name, i in encoding.special_tokens.items() if i >= vocab and "reserved" not in name
    ]
    if beyond:
        raise RuntimeError(
            f"the tokenizer's {beyond} lie outside the model's {vocab}-token vocabulary"
        )
    engine = LLMEngine(
        model,
        EngineConfig(
            kv_cache_tokens=settings.kv_cache_tokens,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            max_model_len=min(settings.max_model_len, model.config.max_position_embeddings),
        ),
    )
    warm_up_start = time.perf_counter()
    engine.warm_up()
    logger.info("warm-up step done in %.1f s", time.perf_counter() - warm_up_start)
    logger.info(
        "model %s on %s (%s) loaded in %.1f s",
        source.path,
        device,
        settings.dtype,
        time.perf_counter() - start,
    )
    return Services(
        encoding=encoding,
        engine=AsyncEngine(engine),
        max_model_len=engine.max_request_tokens,
        prompt_defaults=PromptDefaults(
            reasoning_effort=ReasoningEffort(settings.default_reasoning_effort)
        ),
    )
