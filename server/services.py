"""Start-up: from settings to the loaded vocabulary, model and engine the routes use.

The engine core runs in its own process by default (`ProcessEngine`: the front end and the engine
each get a GIL), or in a thread of this one with `--no-engine-process` (`AsyncEngine`).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import torch

from engine.async_engine import AsyncEngine, AsyncEngineBase
from engine.config import DTYPES
from engine.constraints import GrammarVocabulary
from engine.engine import EngineConfig, LLMEngine
from engine.engine_process import EngineSpec, ProcessEngine
from engine.model.gpt_oss import GptOss
from harmony import HarmonyEncoding, ReasoningEffort, load_harmony_encoding
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
    config = EngineConfig(
        kv_cache_tokens=settings.kv_cache_tokens,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_model_len=settings.max_model_len,  # capped at the model's positions where it loads
    )
    progress = LoadProgress(f"{source.path.name} on {device}")
    vocabulary = grammar_vocabulary(encoding)
    engine: AsyncEngineBase
    if settings.engine_process:
        spec = EngineSpec(
            str(source.path),
            dtype=settings.dtype,
            device=device,
            config=config,
            torch_threads=torch.get_num_threads(),  # what this process was given
            log_level=logging.getLogger().getEffectiveLevel(),
            grammar_vocabulary=vocabulary,
        )
        engine = ProcessEngine(spec, progress=progress)  # returns after the warm-up step
    else:
        engine = AsyncEngine(
            _thread_engine(source.path, settings, device, config, progress, vocabulary)
        )
    vocab = engine.vocab_size
    beyond = [
        name for name, i in encoding.special_tokens.items() if i >= vocab and "reserved" not in name
    ]
    if beyond:
        engine.shutdown()
        raise RuntimeError(
            f"the tokenizer's {beyond} lie outside the model's {vocab}-token vocabulary"
        )
    logger.info(
        "model %s on %s (%s) loaded in %.1f s, engine in %s",
        source.path,
        device,
        settings.dtype,
        time.perf_counter() - start,
        "its own process" if settings.engine_process else "a thread",
    )
    return Services(
        encoding=encoding,
        engine=engine,
        max_model_len=engine.max_request_tokens,
        prompt_defaults=PromptDefaults(
            reasoning_effort=ReasoningEffort(settings.default_reasoning_effort)
        ),
    )


def grammar_vocabulary(encoding: HarmonyEncoding) -> GrammarVocabulary:
    """The vocabulary as the engine's grammar library reads it; a grammar that is complete has
    ended on its own token, so the end token it names is the end of an assistant turn."""
    return GrammarVocabulary(
        mergeable_ranks=encoding.mergeable_ranks,
        special_tokens=encoding.special_tokens,
        pattern=encoding.pattern,
        eos_token_id=encoding.ids.return_,
    )


def _thread_engine(
    path: Path,
    settings: Settings,
    device: str,
    config: EngineConfig,
    progress: LoadProgress,
    vocabulary: GrammarVocabulary,
) -> LLMEngine:
    """The engine core in this process (`--no-engine-process`), loaded and warmed up."""
    model = GptOss.from_checkpoint(
        path, dtype=DTYPES[settings.dtype], device=device, progress=progress
    )
    positions = model.config.max_position_embeddings
    engine = LLMEngine(
        model, replace(config, max_model_len=min(config.max_model_len, positions)), vocabulary
    )
    warm_up_start = time.perf_counter()
    engine.warm_up()
    logger.info("warm-up step done in %.1f s", time.perf_counter() - warm_up_start)
    return engine
