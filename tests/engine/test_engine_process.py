"""The process engine: the same stream semantics as the in-thread one, with the core in a child.

Proven here: streams carry exactly the tokens the synchronous `LLMEngine` produces (greedy, seeded,
a prompt past the sliding window), 20 concurrent streams all get their solo tokens; a consumer that
stops iterating aborts its request and every KV block comes back (read from `stats()`, the only
view of a child's cache); `abort(id)` ends a stream with 'abort'; a bad request raises
`RequestError` before any output, an unpicklable logits processor included (or one the child cannot unpickle), while a picklable one
runs in the child; a grammar runs in the child on the vocabulary its spec carried (and one that
does not compile is refused there); `shutdown()` ends open streams with 'abort' and leaves no child; a killed child
makes open streams and new requests raise `EngineDeadError`; a model that cannot load fails the
constructor with the child's message.

One engine serves the module (spawning a child imports torch: seconds); the tests that end their
engine make their own. Waits are bounded polls; nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from engine.async_engine import EngineDeadError
from engine.constraints import GrammarVocabulary
from engine.engine import EngineConfig, RequestError, RequestOutput
from engine.engine_process import EngineSpec, ProcessEngine
from engine.model.gpt_oss import GptOss
from engine.request import FinishReason
from engine.sampler import SamplingParams
from tests.engine.streams import collect, eventually, sync_tokens, tokens_of
from tests.harmony.synthetic_vocab import synthetic_encoding

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 512


def greedy(max_tokens: int = 16, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def spec_of(checkpoint: Path, **config) -> EngineSpec:
    return EngineSpec(
        str(checkpoint), dtype="float32", config=EngineConfig(**config), torch_threads=1
    )


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Iterator[ProcessEngine]:
    engine = ProcessEngine(spec_of(tiny_checkpoint, kv_cache_tokens=8192, max_model_len=1024))
    yield engine
    engine.shutdown()


@pytest.fixture
def make_engine(tiny_checkpoint: Path) -> Iterator[Callable[..., ProcessEngine]]:
    made: list[ProcessEngine] = []

    def make(**config) -> ProcessEngine:
        made.append(ProcessEngine(spec_of(tiny_checkpoint, **config)))
        return made[-1]

    yield make
    for engine in made:
        engine.shutdown()


def all_blocks_free(engine: ProcessEngine) -> bool:
    s = engine.stats()
    return s.running == s.waiting == 0 and s.kv_blocks_free == s.kv_blocks_total > 0


class BanToken:
    """A picklable logits processor (data, not a closure): it crosses into the child."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits[self.token] = float("-inf")
        return logits


class OnlyInThisProcess:
    """A logits processor that pickles here but cannot be unpickled in the child."""

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        return logits

    def __reduce__(self) -> tuple:
        return (_made_in, (os.getpid(),))


def _made_in(pid: int) -> OnlyInThisProcess:
    if os.getpid() != pid:
        raise RuntimeError("not in the process that made it")
    return OnlyInThisProcess()


# --- streams -----------------------------------------------------------------------------------


def test_streams_carry_the_tokens_of_the_sync_engine(
    tiny_model: GptOss, engine: ProcessEngine
) -> None:
    rng = random.Random(1)
    cases = [
        (random_prompt(rng, 1), greedy(5)),
        (random_prompt(rng, 150), greedy(12)),  # past the 128-token sliding window
        (random_prompt(rng, 40), SamplingParams(temperature=1.0, seed=5, max_tokens=9)),
        (random_prompt(rng, 7), greedy(6, logprobs=2)),
    ]

    async def main() -> list[list[RequestOutput]]:
        return [await collect(engine.generate(p, params)) for p, params in cases]

    streams = asyncio.run(main())
    for (prompt, params), stream in zip(cases, streams, strict=True):
        assert tokens_of(stream) == sync_tokens(tiny_model, prompt, params)
        assert stream[-1].finish_reason == "length"
        assert all(out.finish_reason is None for out in stream[:-1])
        assert stream[-1].num_output_tokens == params.max_tokens
        assert {out.num_prompt_tokens for out in stream} == {len(prompt)}
    logprobs = [lp for out in streams[3] for lp in out.new_logprobs or ()]
    assert len(logprobs) == 6 and all(len(lp.top) == 2 for lp in logprobs)


def test_20_concurrent_streams_complete_with_their_solo_tokens(
    tiny_model: GptOss, engine: ProcessEngine
) -> None:
    rng = random.Random(2)
    cases = []
    for i in range(20):
        prompt = random_prompt(rng, rng.randint(1, 200))
        n = rng.randint(1, 20)
        params = greedy(n) if i % 2 else SamplingParams(temperature=1.0, seed=i, max_tokens=n)
        cases.append((prompt, params))

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(engine.generate(p, s)) for p, s in cases))

    streams = asyncio.run(main())
    for (prompt, params), stream in zip(cases, streams, strict=True):
        assert tokens_of(stream) == sync_tokens(tiny_model, prompt, params)
    assert all_blocks_free(engine)


def test_a_picklable_logits_processor_runs_in_the_child(engine: ProcessEngine) -> None:
    prompt = [3, 1, 4, 1, 5]

    async def main() -> tuple[list[int], list[int]]:
        free = tokens_of(await collect(engine.generate(prompt, greedy(8))))
        banned = greedy(8, logits_processors=(BanToken(free[0]),))
        return free, tokens_of(await collect(engine.generate(prompt, banned)))

    free, banned = asyncio.run(main())
    assert banned[0] != free[0] and free[0] not in banned


# --- aborts ------------------------------------------------------------------------------------


def test_a_consumer_that_stops_aborts_and_every_block_comes_back(engine: ProcessEngine) -> None:
    async def main() -> int:
        before = engine.stats().generated_tokens_total
        stream = engine.generate([9, 8, 7], greedy(900), "stops")
        async for out in stream:
            if out.num_output_tokens >= 2:
                break
        await stream.aclose()  # what `async for` leaves to the garbage collector, done now
        await eventually(lambda: all_blocks_free(engine), "every block back in the pool")
        return engine.stats().generated_tokens_total - before

    assert asyncio.run(main()) < 900  # aborted, not run to the end


def test_abort_from_outside_ends_the_stream_with_abort(engine: ProcessEngine) -> None:
    async def main() -> list[RequestOutput]:
        outputs = []
        async for out in engine.generate([5, 6, 7], greedy(900), "x"):
            outputs.append(out)
            if len(outputs) == 2:
                engine.abort("x")
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finish_reason == FinishReason.ABORT
    assert outputs[-1].num_output_tokens < 900
    assert all(out.finish_reason is None for out in outputs[:-1])
    assert all_blocks_free(engine)


# --- bad requests ------------------------------------------------------------------------------


def test_a_bad_request_raises_before_any_output(engine: ProcessEngine) -> None:
    limit = engine.max_request_tokens
    assert limit == 1024 and engine.vocab_size == VOCAB

    async def main() -> list[RequestOutput]:
        for prompt, params, message in (
            ([], greedy(4), "at least one token"),
            ([1, VOCAB + 1], greedy(4), "outside the vocabulary"),
            ([1] * limit, greedy(4), f"at most {limit - 1} fit"),
            ([1, 2], greedy(4, logits_processors=(lambda ids, row: row,)), "must pickle"),
            ([1, 2], greedy(4, logits_processors=(OnlyInThisProcess(),)), "cannot read"),
            ([1, 2], greedy(4, grammar='start: "a"'), "without a grammar vocabulary"),
        ):
            yielded = []
            with pytest.raises(RequestError, match=message):
                async for out in engine.generate(prompt, params):
                    yielded.append(out)
            assert yielded == []
        with pytest.raises(RequestError, match="must pickle"):
            engine.validate("v", [1], greedy(4, logits_processors=(lambda ids, row: row,)))
        return await collect(engine.generate([1, 2, 3], greedy(4)))  # the engine still serves

    assert len(tokens_of(asyncio.run(main()))) == 4


def test_grammars_run_in_the_child_on_the_vocabulary_sent_to_it(tiny_checkpoint: Path) -> None:
    enc = synthetic_encoding()
    vocabulary = GrammarVocabulary(
        enc.mergeable_ranks, enc.special_tokens, enc.pattern, enc.ids.return_
    )
    spec = dataclasses.replace(
        spec_of(tiny_checkpoint, kv_cache_tokens=8192, max_model_len=1024),
        grammar_vocabulary=vocabulary,
    )
    engine = ProcessEngine(spec)
    try:
        grammar = 'start: "the" " is" <|end|>'
        params = SamplingParams(temperature=1.0, seed=2, max_tokens=30, grammar=grammar)

        async def main() -> list[RequestOutput]:
            with pytest.raises(RequestError, match="does not compile"):
                await collect(engine.generate([1, 2], greedy(4, grammar="start: <|nope|>")))
            return await collect(engine.generate([1, 2, 3], params))

        stream = asyncio.run(main())
        assert enc.decode(tokens_of(stream)) == "the is<|end|>"
        assert stream[-1].finish_reason == "stop"
    finally:
        engine.shutdown()


def test_a_duplicate_request_id_raises_request_error(engine: ProcessEngine) -> None:
    async def main() -> None:
        first = engine.generate([1, 2, 3], greedy(900), request_id="dup")
        try:
            await anext(first)
            with pytest.raises(RequestError, match="already in use"):
                await anext(engine.generate([4, 5], greedy(5), request_id="dup"))
        finally:
            await first.aclose()
        await eventually(lambda: all_blocks_free(engine), "the first one's blocks back")

    asyncio.run(main())


# --- the child's life --------------------------------------------------------------------------


def test_shutdown_ends_open_streams_with_abort_and_leaves_no_child(
    make_engine: Callable[..., ProcessEngine],
) -> None:
    engine = make_engine()
    pid = engine.pid

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
    assert not engine.alive
    assert pid is not None and not _process_exists(pid)


def test_a_killed_child_fails_open_streams_and_new_requests(
    make_engine: Callable[..., ProcessEngine],
) -> None:
    engine = make_engine()

    async def main() -> list[RequestOutput]:
        stream = engine.generate([1, 2, 3], greedy(5000))
        outputs = [await anext(stream)]
        assert engine.pid is not None
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="died"):
            async for out in stream:
                outputs.append(out)
        with pytest.raises(EngineDeadError, match="died"):
            await anext(engine.generate([1, 2, 3], greedy(5)))
        return outputs

    outputs = asyncio.run(main())
    assert all(out.finish_reason is None for out in outputs)
    assert not engine.alive
    assert engine.failure is not None and "exit code -9" in engine.failure
    engine.shutdown()  # after a death, still clean and quick


def test_a_model_that_cannot_load_fails_the_constructor_with_its_message(
    tmp_path: Path,
) -> None:
    expected = r"failed to start: CheckpointError: .*no-model is not a directory"
    with pytest.raises(RuntimeError, match=expected):
        ProcessEngine(spec_of(tmp_path / "no-model"))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
