"""The async engine: the door the server uses, driven from asyncio with the engine in its thread.

Proven here: streams carry exactly the tokens `LLMEngine` produces (greedy and seeded sampling), 20
concurrent `generate()` calls all complete with their solo tokens; a client that stops iterating
(breaks out of `async for`) aborts its request and every KV block comes back; `abort(id)` from
outside ends the stream with finish_reason 'abort'; a bad request raises `RequestError` before any
output; `stats()` shows running, waiting and generated tokens; the event loop keeps running while
the engine thread is inside a model step; `shutdown()` ends open streams with 'abort'.

Races are pinned down, not slept through: a logits processor holds the engine thread at a chosen
step (a `threading.Event`), so "while the model runs" and "after the abort was sent" are exact
points. Waits are bounded polls with `asyncio.sleep`; nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
from collections.abc import Callable, Iterator

import pytest
import torch

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.engine import EngineConfig, LLMEngine, RequestError, RequestOutput
from engine.model.gpt_oss import GptOss
from engine.request import FinishReason
from engine.sampler import SamplingParams
from tests.engine.streams import collect, eventually, sync_tokens, tokens_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 512
HOLD_LIMIT_S = 30.0  # a held engine thread gives up after this long (a failing test, not a hang)


def greedy(max_tokens: int = 16, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


@pytest.fixture
def make_engine(tiny_model: GptOss) -> Iterator[Callable[..., AsyncEngine]]:
    made: list[AsyncEngine] = []

    def make(**config) -> AsyncEngine:
        engine = AsyncEngine(LLMEngine(tiny_model, EngineConfig(**config)))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.shutdown()


def all_blocks_free(engine: AsyncEngine) -> bool:
    pools = engine.engine.kv.pools.values()
    return not engine.engine.requests and all(p.num_free == p.num_usable for p in pools)


class Hold:
    """A logits processor that holds the engine thread once a request has `at` output tokens,
    until `release()`: the test then knows exactly where the engine is."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.reached = threading.Event()
        self._released = threading.Event()
        self.held_too_long = False

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_ids) >= self.at and not self._released.is_set():
            self.reached.set()
            self.held_too_long = not self._released.wait(HOLD_LIMIT_S)
        return logits

    def release(self) -> None:
        self._released.set()


# --- streams -----------------------------------------------------------------------------------


def test_a_stream_carries_the_tokens_of_the_sync_engine(
    tiny_model: GptOss, make_engine: Callable[..., AsyncEngine]
) -> None:
    rng = random.Random(1)
    cases = [
        (random_prompt(rng, 1), greedy(5)),
        (random_prompt(rng, 150), greedy(12)),
        (random_prompt(rng, 40), SamplingParams(temperature=1.0, seed=5, max_tokens=9)),
    ]
    engine = make_engine()

    async def main() -> list[list[RequestOutput]]:
        return [await collect(engine.generate(p, params)) for p, params in cases]

    streams = asyncio.run(main())
    for (prompt, params), stream in zip(cases, streams, strict=True):
        assert tokens_of(stream) == sync_tokens(tiny_model, prompt, params)
        assert [out.finish_reason for out in stream] == [None] * (len(stream) - 1) + ["length"]
        counts = [len(out.new_token_ids) for out in stream]
        assert [out.num_output_tokens for out in stream] == list(itertools.accumulate(counts))
        assert {out.num_prompt_tokens for out in stream} == {len(prompt)}
        assert len({out.request_id for out in stream}) == 1
    assert len({stream[0].request_id for stream in streams}) == len(cases)  # fresh ids


def test_a_consumer_that_fell_behind_gets_the_queued_outputs_as_one(
    tiny_model: GptOss, make_engine: Callable[..., AsyncEngine]
) -> None:
    prompt = random_prompt(random.Random(2), 20)
    hold = Hold(at=1)  # the second step waits until the first output was taken, not merged
    params = greedy(10, logprobs=2, logits_processors=(hold,))
    engine = make_engine()

    async def main() -> list[RequestOutput]:
        stream = engine.generate(prompt, params)
        first = await anext(stream)
        hold.release()
        # Every later step's output queues up while this consumer is away.
        await eventually(lambda: not engine.engine.requests, "the request finished")
        return [first, *await collect(stream)]

    first, *rest = asyncio.run(main())
    assert len(first.new_token_ids) == 1
    assert len(rest) == 1, "the queued outputs come as one"
    (merged,) = rest
    assert list(first.new_token_ids + merged.new_token_ids) == sync_tokens(
        tiny_model, prompt, params
    )
    assert merged.num_output_tokens == 10
    assert merged.finish_reason == "length"
    assert merged.new_logprobs is not None and len(merged.new_logprobs) == 9


def test_20_concurrent_generations_complete_with_their_solo_tokens(
    tiny_model: GptOss, make_engine: Callable[..., AsyncEngine]
) -> None:
    rng = random.Random(2)
    cases = []
    for i in range(20):
        prompt = random_prompt(rng, rng.randint(1, 200))
        n = rng.randint(1, 20)
        params = greedy(n) if i % 2 else SamplingParams(temperature=1.0, seed=i, max_tokens=n)
        cases.append((prompt, params))
    engine = make_engine(max_num_batched_tokens=256)

    async def main() -> list[list[RequestOutput]]:
        streams = [
            collect(engine.generate(p, params, request_id=f"c{i}"))
            for i, (p, params) in enumerate(cases)
        ]
        result = await asyncio.gather(*streams)
        total = sum(len(tokens_of(s)) for s in result)
        await eventually(
            lambda: engine.stats().generated_tokens_total == total and all_blocks_free(engine),
            "stats counting every token and every block back",
        )
        return result

    streams = asyncio.run(main())
    for i, ((prompt, params), stream) in enumerate(zip(cases, streams, strict=True)):
        assert {out.request_id for out in stream} == {f"c{i}"}
        assert stream[-1].finish_reason == FinishReason.LENGTH
        assert tokens_of(stream) == sync_tokens(tiny_model, prompt, params)
    stats = engine.stats()
    assert stats.running == stats.waiting == 0


# --- aborts ------------------------------------------------------------------------------------


def test_a_client_that_stops_listening_aborts_and_frees_its_blocks(
    make_engine: Callable[..., AsyncEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine()
    hold = Hold(at=3)
    prompt = random_prompt(random.Random(3), 180)
    aborts: list[str] = []
    abort = engine.abort

    def recording_abort(request_id: str) -> None:
        abort(request_id)
        aborts.append(request_id)

    monkeypatch.setattr(engine, "abort", recording_abort)

    async def main() -> int:
        received = 0
        async for out in engine.generate(prompt, greedy(50, logits_processors=(hold,)), "d"):
            received += len(out.new_token_ids)
            if received == 3:
                break  # the client went away; the loop closes the dropped stream
        await eventually(lambda: aborts == ["d"], "the closed stream's abort")
        # The engine thread is held computing token 4 (or, if the abort came first, never got
        # there): let it go on; it must stop at the next step boundary.
        hold.release()
        await eventually(lambda: all_blocks_free(engine), "every block back in the pool")
        await eventually(lambda: engine.stats().running == 0, "stats after the abort")
        return engine.stats().generated_tokens_total

    try:
        generated = asyncio.run(main())
    finally:
        hold.release()
    assert generated in (3, 4)  # not 50: the request was aborted, not run to the end
    assert not hold.held_too_long
    engine.shutdown()
    engine.engine.kv.check_invariants()


def test_abort_from_outside_ends_the_stream_with_abort(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    engine = make_engine()
    hold = Hold(at=2)

    async def main() -> list[RequestOutput]:
        outputs = []
        async for out in engine.generate([5, 6, 7], greedy(50, logits_processors=(hold,)), "x"):
            outputs.append(out)
            if len(tokens_of(outputs)) == 2:  # two outputs, or one if the consumer fell behind
                await eventually(hold.reached.is_set, "the engine thread reaching the hold")
                engine.abort("x")
                hold.release()
        return outputs

    try:
        outputs = asyncio.run(main())
    finally:
        hold.release()
    assert outputs[-1].finish_reason == FinishReason.ABORT
    assert all(out.finish_reason is None for out in outputs[:-1])
    # The step in flight when the abort came finished (its token may come merged with the end).
    assert len(tokens_of(outputs)) == 3
    engine.shutdown()
    assert all_blocks_free(engine)
    engine.engine.kv.check_invariants()


def test_shutdown_ends_open_streams_and_refuses_new_ones(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    engine = make_engine()

    async def main() -> list[RequestOutput]:
        stream = engine.generate([1, 2, 3], greedy(5000))
        outputs = [await anext(stream)]
        engine.shutdown()
        outputs += [out async for out in stream]
        with pytest.raises(EngineDeadError):
            await anext(engine.generate([1, 2, 3], greedy(5)))
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finish_reason == FinishReason.ABORT
    assert len(tokens_of(outputs)) < 5000
    assert all_blocks_free(engine)
    engine.engine.kv.check_invariants()


# --- bad requests ------------------------------------------------------------------------------


def test_a_bad_request_raises_before_any_output(make_engine: Callable[..., AsyncEngine]) -> None:
    engine = make_engine(max_model_len=64)

    async def main() -> list[RequestOutput]:
        for prompt, message in (
            ([], "at least one token"),
            ([1, VOCAB + 1], "outside the vocabulary"),
            (list(range(64)), "at most 63 fit"),
        ):
            yielded = []
            with pytest.raises(RequestError, match=message):
                async for out in engine.generate(prompt, greedy(4)):
                    yielded.append(out)
            assert yielded == []
        outputs = await collect(engine.generate([1, 2, 3], greedy(4)))  # the engine still serves
        await eventually(lambda: engine.stats().generated_tokens_total == 4, "final stats")
        return outputs

    outputs = asyncio.run(main())
    assert len(tokens_of(outputs)) == 4
    assert engine.stats().prompt_tokens_total == 3  # the bad ones never reached the engine


def test_a_duplicate_request_id_raises_request_error(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    engine = make_engine()

    async def main() -> None:
        first = engine.generate([1, 2, 3], greedy(50), request_id="dup")
        try:
            await anext(first)
            with pytest.raises(RequestError, match="already in use"):
                await anext(engine.generate([4, 5], greedy(5), request_id="dup"))
        finally:
            await first.aclose()

    asyncio.run(main())


# --- stats and the event loop ------------------------------------------------------------------


def test_stats_show_running_waiting_and_generated_tokens(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    engine = make_engine(max_num_seqs=1)  # a second request has to wait
    start = Hold(at=1)  # holds "a" in its second step, so "b" is queued in time
    b_known = threading.Event()
    observed = Hold(at=0)  # holds "a" one step after "b" was seen waiting

    def hold_once_b_waited(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if b_known.is_set():
            return observed(output_ids, logits)
        if "b" in engine.engine.requests:
            b_known.set()
        return logits

    params_a = greedy(8, logits_processors=(start, hold_once_b_waited))

    async def main() -> tuple[object, object, int]:
        task_a = asyncio.create_task(collect(engine.generate([1, 2, 3], params_a, "a")))
        await eventually(start.reached.is_set, "'a' reaching its second step")
        task_b = asyncio.create_task(collect(engine.generate([4, 5, 6], greedy(4), "b")))
        for _ in range(3):
            await asyncio.sleep(0)  # let task b send its request
        start.release()
        await eventually(observed.reached.is_set, "'a' held after 'b' was queued")
        during = engine.stats()
        observed.release()
        a, b = await asyncio.gather(task_a, task_b)
        total = len(tokens_of(a)) + len(tokens_of(b))
        await eventually(lambda: engine.stats().generated_tokens_total == total, "final stats")
        return during, engine.stats(), total

    try:
        during, after, total = asyncio.run(main())
    finally:
        start.release()
        observed.release()
    assert (during.running, during.waiting) == (1, 1)
    assert during.generated_tokens_total == 3  # "a" sampled three tokens before the hold
    assert during.prompt_tokens_total == 3 and during.kv_cache_usage > 0
    assert total == 12
    assert (after.running, after.waiting, after.kv_cache_usage) == (0, 0, 0.0)
    assert after.prompt_tokens_total == 6


def test_the_event_loop_runs_while_the_model_steps(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    engine = make_engine()
    in_step = threading.Event()
    ticked = threading.Event()
    waited = []

    def wait_for_ticks(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_ids) == 1:  # inside the second step's model call
            in_step.set()
            waited.append(ticked.wait(HOLD_LIMIT_S))
        return logits

    async def ticker() -> int:
        await eventually(in_step.is_set, "the engine thread entering a step")
        ticks = 0
        for _ in range(5):  # each tick is a full trip through the event loop
            await asyncio.sleep(0)
            ticks += 1
        ticked.set()
        return ticks

    async def main() -> tuple[int, list[RequestOutput]]:
        params = greedy(4, logits_processors=(wait_for_ticks,))
        return await asyncio.gather(ticker(), collect(engine.generate([1, 2, 3], params)))

    try:
        ticks, outputs = asyncio.run(main())
    finally:
        ticked.set()
    # The engine thread sat inside a step until the loop had ticked: a blocked loop never would.
    assert waited == [True]
    assert ticks == 5
    assert len(tokens_of(outputs)) == 4
