"""What the async-engine tests share, whichever engine (thread or process) they drive: the sync
engine's tokens as the oracle, collecting a stream, and bounded polling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from engine.engine import EngineConfig, LLMEngine, RequestOutput
from engine.model.gpt_oss import GptOss
from engine.sampler import SamplingParams


def sync_tokens(model: GptOss, prompt: list[int], params: SamplingParams) -> list[int]:
    """What the synchronous engine in this process produces for this request alone."""
    engine = LLMEngine(model, EngineConfig())
    engine.add_request("x", prompt, params)
    tokens: list[int] = []
    while engine.has_work:
        for out in engine.step():
            tokens.extend(out.new_token_ids)
    return tokens


async def collect(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    return [out async for out in stream]


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


async def eventually(condition: Callable[[], bool], what: str, polls: int = 3000) -> None:
    """Poll `condition` between short sleeps; fail (not hang) if it never holds."""
    for _ in range(polls):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")
