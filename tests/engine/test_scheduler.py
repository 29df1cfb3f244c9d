"""The scheduler and the engine core on a tiny float32 model: batching, preemption and caching are
invisible in the outputs, and no KV block is ever lost.

Proven here: 64 concurrent greedy requests (prompts of 1..300 tokens, outputs of 1..40) produce
exactly the tokens each produces alone; so they do when the KV cache is too small for all of them
and requests are preempted and recomputed, and so do seeded sampled requests. After every request
finishes or is aborted (waiting, mid-prefill, mid-decode) every block is back in its pool. Random
interleavings of add / abort / step (hypothesis) keep the block manager's invariants, the
`max_num_seqs` bound and block tables that cover each running request's computed tokens, and lose
no request. A shared prefix is served from the cache (reported in `num_cached_tokens` and the hit
rate) with the same outputs as without caching, multi-turn included. Stop tokens, `max_tokens`,
`min_tokens` and the context limit end requests with the right reason; bad requests are refused
with `RequestError`; a failing logits processor or model step fails only its own requests.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.config import FULL, SLIDING
from engine.engine import EngineConfig, LLMEngine, RequestError, RequestOutput
from engine.model.gpt_oss import GptOss
from engine.request import FinishReason, RequestStatus
from engine.sampler import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 512  # the tiny preset's
Streams = dict[str, list[RequestOutput]]


@dataclass(frozen=True)
class Job:
    request_id: str
    prompt: list[int]
    params: SamplingParams


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def greedy(max_tokens: int = 16, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def drain(engine: LLMEngine, streams: Streams | None = None, max_steps: int = 5000) -> Streams:
    """Step until the engine is idle, collecting every output; fail instead of spinning forever."""
    streams = {} if streams is None else streams
    for _ in range(max_steps):
        if not engine.has_work:
            return streams
        for out in engine.step():
            streams.setdefault(out.request_id, []).append(out)
    raise AssertionError(f"the engine still has work after {max_steps} steps: it makes no progress")


def drain_steps(engine: LLMEngine, n: int, streams: Streams | None = None) -> Streams:
    """Exactly `n` steps, collecting their outputs."""
    streams = {} if streams is None else streams
    for _ in range(n):
        for out in engine.step():
            streams.setdefault(out.request_id, []).append(out)
    return streams


def tokens_of(stream: Iterable[RequestOutput]) -> list[int]:
    return [t for out in stream for t in out.new_token_ids]


def run_together(
    model: GptOss, config: EngineConfig, jobs: list[Job]
) -> tuple[dict[str, list[int]], LLMEngine, Streams]:
    engine = LLMEngine(model, config)
    for job in jobs:
        engine.add_request(job.request_id, job.prompt, job.params)
    streams = drain(engine)
    return {rid: tokens_of(s) for rid, s in streams.items()}, engine, streams


def run_alone(model: GptOss, jobs: list[Job]) -> dict[str, list[int]]:
    """Each job on its own: one engine, no prefix caching, one request at a time."""
    engine = LLMEngine(model, EngineConfig(enable_prefix_caching=False))
    out = {}
    for job in jobs:
        engine.add_request(job.request_id, job.prompt, job.params)
        out[job.request_id] = tokens_of(drain(engine).get(job.request_id, []))
    return out


def assert_all_blocks_free(engine: LLMEngine) -> None:
    engine.kv.check_invariants()
    for group, pool in engine.kv.pools.items():
        assert pool.num_free == pool.num_usable, (
            f"{group}: {pool.num_usable - pool.num_free} blocks still held"
        )
    assert not engine.requests and not engine.has_work


def assert_finished_normally(streams: Streams, jobs: list[Job]) -> None:
    for job in jobs:
        stream = streams[job.request_id]
        assert stream[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH), job.request_id
        assert all(out.finish_reason is None for out in stream[:-1])
        assert stream[-1].num_output_tokens == len(tokens_of(stream)) <= job.params.max_tokens


# --- batched, preempted, sampled: the same tokens as alone -------------------------------------


def mixed_jobs(n: int, seed: int, make_params: Callable[[int, int], SamplingParams]) -> list[Job]:
    rng = random.Random(seed)
    lengths = [1, 300] + [rng.randint(1, 300) for _ in range(n - 2)]
    return [
        Job(f"r{i}", random_prompt(rng, length), make_params(i, rng.randint(1, 40)))
        for i, length in enumerate(lengths)
    ]


@pytest.fixture(scope="module")
def greedy_jobs() -> list[Job]:
    return mixed_jobs(64, seed=2024, make_params=lambda i, n: greedy(n))


@pytest.fixture(scope="module")
def greedy_alone(tiny_model: GptOss, greedy_jobs: list[Job]) -> dict[str, list[int]]:
    return run_alone(tiny_model, greedy_jobs)


def test_64_concurrent_greedy_requests_equal_each_alone(
    tiny_model: GptOss, greedy_jobs: list[Job], greedy_alone: dict[str, list[int]]
) -> None:
    engine = LLMEngine(tiny_model, EngineConfig())
    for job in greedy_jobs:
        engine.add_request(job.request_id, job.prompt, job.params)
    streams: Streams = {}
    most_running = 0
    while engine.has_work:
        for out in engine.step():
            streams.setdefault(out.request_id, []).append(out)
        most_running = max(most_running, engine.stats().running)
    assert most_running >= 48, most_running  # they really ran side by side
    assert engine.stats().num_preemptions == 0
    got = {rid: tokens_of(s) for rid, s in streams.items()}
    assert got == greedy_alone
    assert_finished_normally(streams, greedy_jobs)
    assert all(s[-1].finish_reason == FinishReason.LENGTH for s in streams.values())
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-caching", "no-caching"])
def test_preemption_keeps_outputs_identical(
    tiny_model: GptOss,
    greedy_jobs: list[Job],
    greedy_alone: dict[str, list[int]],
    caching: bool,
) -> None:
    config = EngineConfig(
        kv_cache_tokens=1024, max_num_batched_tokens=256, enable_prefix_caching=caching
    )
    got, engine, streams = run_together(tiny_model, config, greedy_jobs)
    assert engine.stats().num_preemptions > 0
    assert got == greedy_alone
    assert_finished_normally(streams, greedy_jobs)
    assert_all_blocks_free(engine)


def test_seeded_sampling_is_the_same_alone_batched_and_preempted(tiny_model: GptOss) -> None:
    def params(i: int, n: int) -> SamplingParams:
        top_k = (-1, 20)[i % 2]
        return SamplingParams(temperature=1.0, top_k=top_k, seed=1000 + i, max_tokens=n)

    jobs = mixed_jobs(24, seed=7, make_params=params)
    alone = run_alone(tiny_model, jobs)
    batched, _, _ = run_together(tiny_model, EngineConfig(), jobs)
    small = EngineConfig(kv_cache_tokens=512, max_num_batched_tokens=128)
    preempted, engine, _ = run_together(tiny_model, small, jobs)
    assert engine.stats().num_preemptions > 0
    assert batched == alone
    assert preempted == alone
    # The seeds matter: sampling is not secretly greedy.
    greedy_out = run_alone(tiny_model, [Job(j.request_id, j.prompt, greedy(40)) for j in jobs[:4]])
    assert any(
        greedy_out[j.request_id][: len(alone[j.request_id])] != alone[j.request_id]
        for j in jobs[:4]
    )


# --- aborts: every block comes back ------------------------------------------------------------


def test_abort_mid_prefill_frees_every_block(tiny_model: GptOss) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(max_num_batched_tokens=32))
    prompt = random_prompt(random.Random(1), 300)
    request = engine.add_request("long", prompt, greedy(8))
    assert engine.step() == [] and engine.step() == []  # two 32-token chunks, nothing sampled
    assert request.status is RequestStatus.RUNNING and request.num_computed == 64
    out = engine.abort("long")
    assert out is not None and out.finish_reason == FinishReason.ABORT
    assert out.new_token_ids == () and out.num_output_tokens == 0
    assert engine.abort("long") is None  # a second abort is a no-op
    assert_all_blocks_free(engine)


def test_abort_mid_decode_frees_every_block(tiny_model: GptOss) -> None:
    engine = LLMEngine(tiny_model, EngineConfig())
    rng = random.Random(2)
    engine.add_request("a", random_prompt(rng, 150), greedy(30))
    engine.add_request("b", random_prompt(rng, 20), greedy(30))
    streams: Streams = {}
    for _ in range(5):
        for out in engine.step():
            streams.setdefault(out.request_id, []).append(out)
    assert len(tokens_of(streams["a"])) == 5
    out = engine.abort("a")
    assert out is not None and out.finish_reason == FinishReason.ABORT
    assert out.num_output_tokens == 5
    assert engine.abort("b") is not None
    assert_all_blocks_free(engine)


def test_abort_of_a_waiting_request_and_the_others_go_on(
    tiny_model: GptOss, greedy_jobs: list[Job], greedy_alone: dict[str, list[int]]
) -> None:
    jobs = greedy_jobs[:6]
    engine = LLMEngine(tiny_model, EngineConfig(max_num_seqs=2, max_num_batched_tokens=64))
    for job in jobs:
        engine.add_request(job.request_id, job.prompt, job.params)
    streams: Streams = {}
    for _ in range(3):
        for out in engine.step():
            streams.setdefault(out.request_id, []).append(out)
    waiting = [r.request_id for r in engine.scheduler.waiting]
    running = [r.request_id for r in engine.scheduler.running]
    assert waiting and running
    aborted = {waiting[-1], running[0]}
    for request_id in aborted:
        out = engine.abort(request_id)
        assert out is not None and out.finish_reason == FinishReason.ABORT
        engine.kv.check_invariants()
    drain(engine, streams)
    rest = [j for j in jobs if j.request_id not in aborted]
    assert {rid: tokens_of(streams[rid]) for rid in (j.request_id for j in rest)} == {
        j.request_id: greedy_alone[j.request_id] for j in rest
    }
    assert_finished_normally(streams, rest)
    assert_all_blocks_free(engine)


# --- random interleavings: invariants after every action ---------------------------------------

PROPERTY_KV_TOKENS = 128  # 8 blocks of 16: two or three requests fill it
configs = st.builds(
    EngineConfig,
    kv_cache_tokens=st.just(PROPERTY_KV_TOKENS),
    max_num_seqs=st.integers(1, 3),
    max_num_batched_tokens=st.sampled_from([16, 40, 2048]),
)
_base_rng = random.Random(99)
PREFIX_BASES = [random_prompt(_base_rng, 80) for _ in range(2)]

request_specs = st.tuples(
    st.sampled_from([None, 0, 1]),  # share a prefix with a base prompt, or not
    st.integers(1, 100),  # prompt length
    # max_tokens: prompt + output fit the cache alone (requests that outgrow it are cut at the
    # cache's size: test_a_request_that_outgrows_the_kv_cache_ends_instead_of_hanging)
    st.integers(1, 12),
    st.sampled_from([(), (3,), tuple(range(0, VOCAB, 7))]),  # stop tokens
    st.booleans(),  # seeded sampling instead of greedy
)
add_action = st.tuples(st.just("add"), request_specs)
actions = st.lists(
    st.one_of(  # adds drawn twice as often as aborts or steps
        add_action,
        add_action,
        st.tuples(st.just("abort"), st.integers(0, 30)),
        st.tuples(st.just("step"), st.integers(1, 6)),
    ),
    min_size=4,
    max_size=30,
)


def check_engine_state(engine: LLMEngine) -> None:
    """What must hold between any two actions."""
    kv, scheduler = engine.kv, engine.scheduler
    kv.check_invariants()
    assert len(scheduler.running) <= engine.config.max_num_seqs
    bs, window = kv.block_size, kv.sliding_window
    held = dict.fromkeys(kv.pools, 0)
    for request in scheduler.running:
        assert request.status is RequestStatus.RUNNING
        assert 0 < request.num_computed < request.num_tokens  # a step always has work to do
        tables = kv.block_tables(request.request_id)
        computed_blocks = -(-request.num_computed // bs)
        assert len(tables[FULL]) >= computed_blocks
        assert 0 not in tables[FULL][:computed_blocks], "a computed full-attention block is null"
        first_visible = max(0, request.num_computed - window + 1) // bs
        assert len(tables[SLIDING]) >= computed_blocks
        assert 0 not in tables[SLIDING][first_visible:computed_blocks], (
            "a block inside the sliding window is null"
        )
        for group, table in tables.items():
            held[group] += sum(1 for b in table if b != 0)
    for request in scheduler.waiting:
        assert request.status is RequestStatus.WAITING and request.num_computed == 0
    # Only running requests hold blocks (a waiting or finished one holds none).
    for group, pool in kv.pools.items():
        assert sum(pool.ref_count) == held[group]


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(config=configs, script=actions)
def test_random_add_abort_step_keeps_every_invariant(
    small_window_model: GptOss, config: EngineConfig, script: list
) -> None:
    engine = LLMEngine(small_window_model, config)
    rng = random.Random(len(script))
    added: list[tuple[str, SamplingParams]] = []
    aborted: set[str] = set()
    streams: Streams = {}

    def collect(outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = streams.setdefault(out.request_id, [])
            assert not stream or stream[-1].finish_reason is None, "output after the last one"
            stream.append(out)

    for kind, arg in script:
        if kind == "add":
            base, length, max_tokens, stops, sampled = arg
            prompt = random_prompt(rng, length)
            if base is not None:
                shared = 3 * length // 4
                prompt = PREFIX_BASES[base][:shared] + prompt[shared:]
            assert length + max_tokens <= PROPERTY_KV_TOKENS
            request_id = f"q{len(added)}"
            params = SamplingParams(
                temperature=1.0 if sampled else 0.0,
                seed=len(added) if sampled else None,
                max_tokens=max_tokens,
                stop_token_ids=stops,
            )
            engine.add_request(request_id, prompt, params)
            added.append((request_id, params))
        elif kind == "abort" and added:
            request_id = added[arg % len(added)][0]
            ended = request_id in aborted or (
                request_id in streams and streams[request_id][-1].finish_reason is not None
            )
            running = any(r.request_id == request_id for r in engine.scheduler.running)
            out = engine.abort(request_id)
            assert (out is None) == ended
            event("aborted a running request" if running else "aborted a waiting/ended request")
            if out is not None:
                assert out.finish_reason == FinishReason.ABORT
                collect([out])
                aborted.add(request_id)
        elif kind == "step":
            for _ in range(arg):
                collect(engine.step())
                check_engine_state(engine)
        check_engine_state(engine)

    for _ in range(2000):
        if not engine.has_work:
            break
        collect(engine.step())
        check_engine_state(engine)
    stats = engine.stats()
    event(f"adds: {min(len(added), 5)}")
    event(f"preempted: {stats.num_preemptions > 0}")
    event(f"prefix cache hit: {stats.cached_prompt_tokens_total > 0}")
    for request_id, params in added:
        stream = streams.get(request_id)
        assert stream, f"{request_id} was lost: no output at all"
        last = stream[-1]
        if request_id in aborted:
            assert last.finish_reason == FinishReason.ABORT
            continue
        assert last.finish_reason in (FinishReason.STOP, FinishReason.LENGTH), request_id
        produced = tokens_of(stream)
        assert last.num_output_tokens == len(produced) <= params.max_tokens
        if last.finish_reason == FinishReason.STOP:
            assert produced[-1] in params.stop_token_ids
        else:
            assert len(produced) == params.max_tokens
    assert_all_blocks_free(engine)


# --- prefix caching ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_prefix() -> list[int]:
    return random_prompt(random.Random(5), 200)


def test_a_shared_prefix_is_served_from_the_cache(
    tiny_model: GptOss, shared_prefix: list[int]
) -> None:
    rng = random.Random(6)
    first = Job("first", [*shared_prefix, *random_prompt(rng, 20)], greedy(10))
    second = Job("second", [*shared_prefix, *random_prompt(rng, 30)], greedy(10))
    uncached, _, _ = run_together(
        tiny_model, EngineConfig(enable_prefix_caching=False), [first, second]
    )

    engine = LLMEngine(tiny_model, EngineConfig())
    engine.add_request(first.request_id, first.prompt, first.params)
    streams = drain(engine)
    assert {out.num_cached_tokens for out in streams["first"]} == {0}
    engine.add_request(second.request_id, second.prompt, second.params)
    drain(engine, streams)
    # 200 shared tokens = 12 whole blocks of 16 (the 13th block mixes in the tails).
    assert {out.num_cached_tokens for out in streams["second"]} == {192}
    stats = engine.stats()
    assert stats.cached_prompt_tokens_total == 192
    assert stats.prompt_tokens_total == len(first.prompt) + len(second.prompt)
    assert stats.prefix_cache_hit_rate == pytest.approx(192 / stats.prompt_tokens_total)
    assert tokens_of(streams["first"]) == uncached["first"]
    assert tokens_of(streams["second"]) == uncached["second"]
    assert_all_blocks_free(engine)


def test_a_prefix_is_shared_with_a_request_still_running(
    tiny_model: GptOss, shared_prefix: list[int]
) -> None:
    rng = random.Random(8)
    first = Job("first", [*shared_prefix, *random_prompt(rng, 5)], greedy(30))
    second = Job("second", [*shared_prefix, *random_prompt(rng, 9)], greedy(30))
    uncached, _, _ = run_together(
        tiny_model, EngineConfig(enable_prefix_caching=False), [first, second]
    )
    engine = LLMEngine(tiny_model, EngineConfig())
    engine.add_request(first.request_id, first.prompt, first.params)
    streams = drain_steps(engine, 2)  # the first prompt is computed, its decode goes on
    engine.add_request(second.request_id, second.prompt, second.params)
    drain_steps(engine, 1, streams)
    # Both hold the 12 shared blocks at once.
    shared = engine.kv.block_tables("first")[FULL][:12]
    assert engine.kv.block_tables("second")[FULL][:12] == shared
    assert all(engine.kv.pools[FULL].ref_count[b] == 2 for b in shared)
    drain(engine, streams)
    assert streams["second"][0].num_cached_tokens == 192
    assert {rid: tokens_of(s) for rid, s in streams.items()} == uncached
    assert_all_blocks_free(engine)


def test_multi_turn_reuses_the_first_turn_including_its_output(tiny_model: GptOss) -> None:
    rng = random.Random(9)
    turn1 = random_prompt(rng, 200)
    engine = LLMEngine(tiny_model, EngineConfig())
    engine.add_request("turn1", turn1, greedy(20))
    answer = tokens_of(drain(engine)["turn1"])
    assert len(answer) == 20
    turn2 = [*turn1, *answer, *random_prompt(rng, 30)]
    engine.add_request("turn2", turn2, greedy(15))
    streams = drain(engine)
    # Turn 1 computed the KV of 219 tokens (the last answer token never ran): 13 whole blocks.
    assert streams["turn2"][0].num_cached_tokens == 13 * 16
    assert tokens_of(streams["turn2"]) == run_alone(tiny_model, [Job("t", turn2, greedy(15))])["t"]
    assert_all_blocks_free(engine)


def test_a_request_finishing_in_its_first_step_still_fills_the_prefix_cache(
    tiny_model: GptOss, shared_prefix: list[int]
) -> None:
    engine = LLMEngine(tiny_model, EngineConfig())
    engine.add_request("first", [*shared_prefix, 1, 2, 3], greedy(1))
    drain(engine)
    engine.add_request("second", [*shared_prefix, 4, 5, 6], greedy(1))
    assert drain(engine)["second"][0].num_cached_tokens == 192


# --- stop conditions ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stop_prompt() -> list[int]:
    return random_prompt(random.Random(10), 70)


@pytest.fixture(scope="module")
def free_run(tiny_model: GptOss, stop_prompt: list[int]) -> list[int]:
    """The greedy continuation of `stop_prompt` with nothing to stop it but max_tokens."""
    return run_alone(tiny_model, [Job("x", stop_prompt, greedy(30))])["x"]


def run_one(model: GptOss, prompt: list[int], params: SamplingParams, **config) -> RequestOutput:
    engine = LLMEngine(model, EngineConfig(**config))
    engine.add_request("x", prompt, params)
    stream = drain(engine)["x"]
    assert_all_blocks_free(engine)
    # The last output, carrying every token of the stream.
    return dataclasses.replace(stream[-1], new_token_ids=tuple(tokens_of(stream)))


def test_a_stop_token_ends_the_request_and_is_its_last_token(
    tiny_model: GptOss, stop_prompt: list[int], free_run: list[int]
) -> None:
    # A token of the free run at its first occurrence, some way in.
    k = next(i for i in range(3, len(free_run)) if free_run[i] not in free_run[:i])
    stop = free_run[k]
    out = run_one(tiny_model, stop_prompt, greedy(30, stop_token_ids=(stop, VOCAB - 1)))
    assert out.finish_reason == FinishReason.STOP
    assert list(out.new_token_ids) == free_run[: k + 1]
    assert out.new_token_ids[-1] == stop


def test_max_tokens_ends_with_length(
    tiny_model: GptOss, stop_prompt: list[int], free_run: list[int]
) -> None:
    out = run_one(tiny_model, stop_prompt, greedy(7))
    assert out.finish_reason == FinishReason.LENGTH
    assert list(out.new_token_ids) == free_run[:7]
    assert out.num_output_tokens == 7


def test_min_tokens_suppresses_an_early_stop(
    tiny_model: GptOss, stop_prompt: list[int], free_run: list[int]
) -> None:
    stop = free_run[0]  # without min_tokens the request stops at once
    early = run_one(tiny_model, stop_prompt, greedy(30, stop_token_ids=(stop,)))
    assert early.finish_reason == FinishReason.STOP and list(early.new_token_ids) == [stop]
    out = run_one(tiny_model, stop_prompt, greedy(30, stop_token_ids=(stop,), min_tokens=5))
    produced = list(out.new_token_ids)
    assert len(produced) > 5
    assert stop not in produced[:5]
    if out.finish_reason == FinishReason.STOP:
        assert produced[-1] == stop and stop not in produced[:-1]
    else:
        assert out.finish_reason == FinishReason.LENGTH and len(produced) == 30


def test_the_context_limit_ends_with_length(tiny_model: GptOss, stop_prompt: list[int]) -> None:
    out = run_one(tiny_model, stop_prompt[:60], greedy(20), max_model_len=64)
    assert out.finish_reason == FinishReason.LENGTH
    assert len(out.new_token_ids) == 4  # 60 + 4 = 64 tokens
    last = run_one(tiny_model, stop_prompt[:63], greedy(20), max_model_len=64)
    assert last.finish_reason == FinishReason.LENGTH and len(last.new_token_ids) == 1


def test_a_request_that_outgrows_the_kv_cache_ends_instead_of_hanging(tiny_model: GptOss) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(kv_cache_tokens=256))
    prompt = random_prompt(random.Random(11), 250)
    try:
        engine.add_request("x", prompt, greedy(20))
    except RequestError:
        return  # refusing it up front would be correct too
    stream = drain(engine, max_steps=200)["x"]
    assert stream[-1].finish_reason == FinishReason.LENGTH
    assert len(prompt) + len(tokens_of(stream)) <= 256
    assert_all_blocks_free(engine)


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "params", "config", "message"),
    [
        ([], greedy(), {}, "at least one token"),
        ([1, VOCAB], greedy(), {}, r"\[512\] are outside the vocabulary \(0\.\.511\)"),
        ([-1, 2], greedy(), {}, "outside the vocabulary"),
        (list(range(64)), greedy(), {"max_model_len": 64}, "64 tokens; at most 63 fit"),
        ([1] * 256, greedy(), {"kv_cache_tokens": 256}, "256 tokens; at most 255 fit"),
        ([1], greedy(stop_token_ids=(VOCAB,)), {}, "stop_token_ids"),
        ([1], SamplingParams(logit_bias={VOCAB + 3: 1.0}), {}, "logit_bias"),
    ],
    ids=["empty", "too-big-id", "negative-id", "context", "kv-cache", "stop-id", "bias-id"],
)
def test_bad_requests_are_refused_with_a_clear_message(
    tiny_model: GptOss, prompt: list[int], params: SamplingParams, config: dict, message: str
) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(**config))
    with pytest.raises(RequestError, match=message):
        engine.add_request("bad", prompt, params)
    assert not engine.requests and not engine.has_work  # nothing half-added
    engine.add_request("bad", [1, 2, 3], greedy(2))  # the id was not taken


@pytest.mark.parametrize("bad_id", [1.5, True, "7"], ids=["float", "bool", "str"])
def test_non_integer_token_ids_are_refused(tiny_model: GptOss, bad_id: object) -> None:
    engine = LLMEngine(tiny_model, EngineConfig())
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request("bad", [1, bad_id, 3], greedy())  # type: ignore[list-item]


def test_a_duplicate_request_id_is_refused(tiny_model: GptOss) -> None:
    assert issubclass(RequestError, ValueError)
    engine = LLMEngine(tiny_model, EngineConfig())
    engine.add_request("same", [1, 2, 3], greedy(5))
    with pytest.raises(RequestError, match="'same' is already in use"):
        engine.add_request("same", [4, 5], greedy(5))
    streams = drain(engine)
    assert len(tokens_of(streams["same"])) == 5  # the first one was not disturbed


# --- failure isolation -------------------------------------------------------------------------


def test_a_failing_logits_processor_fails_only_its_request(tiny_model: GptOss) -> None:
    rng = random.Random(12)
    bad_prompt, good_prompt = random_prompt(rng, 40), random_prompt(rng, 70)

    def explodes_on_third_token(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_ids) == 2:
            raise RuntimeError("grammar exploded")
        return logits

    alone = run_alone(
        tiny_model, [Job("bad", bad_prompt, greedy(12)), Job("good", good_prompt, greedy(12))]
    )
    engine = LLMEngine(tiny_model, EngineConfig())
    engine.add_request("bad", bad_prompt, greedy(12, logits_processors=(explodes_on_third_token,)))
    engine.add_request("good", good_prompt, greedy(12))
    streams = drain_steps(engine, 1)
    assert set(streams) == {"bad", "good"}  # one batch
    drain(engine, streams)
    bad = streams["bad"][-1]
    assert bad.finish_reason == FinishReason.ERROR
    assert bad.error is not None and "grammar exploded" in bad.error
    assert tokens_of(streams["bad"])[:2] == alone["bad"][:2]
    assert len(tokens_of(streams["bad"])) <= 3
    assert streams["good"][-1].finish_reason == FinishReason.LENGTH
    assert streams["good"][-1].error is None
    assert tokens_of(streams["good"]) == alone["good"]
    assert_all_blocks_free(engine)


def test_a_processor_failing_on_the_last_token_is_not_swallowed(tiny_model: GptOss) -> None:
    def explodes_on_last_token(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_ids) == 2:
            raise RuntimeError("grammar exploded")
        return logits

    engine = LLMEngine(tiny_model, EngineConfig())
    engine.add_request("x", [1, 2, 3], greedy(3, logits_processors=(explodes_on_last_token,)))
    last = drain(engine)["x"][-1]
    assert_all_blocks_free(engine)
    assert last.finish_reason == FinishReason.ERROR
    assert last.error is not None and "grammar exploded" in last.error


def test_a_failed_model_step_fails_its_requests_and_the_engine_goes_on(
    tiny_model: GptOss, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = LLMEngine(tiny_model, EngineConfig())
    execute = engine.runner.execute
    calls = {"n": 0}

    def fails_on_second_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return execute(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", fails_on_second_step)
    engine.add_request("a", [1, 2, 3], greedy(10))
    engine.add_request("b", [4, 5, 6, 7], greedy(10))
    streams = drain(engine)
    for request_id in ("a", "b"):
        last = streams[request_id][-1]
        assert last.finish_reason == FinishReason.ERROR
        assert last.error is not None and "device lost" in last.error
        assert len(tokens_of(streams[request_id])) == 1  # from the step before
    assert_all_blocks_free(engine)
    engine.add_request("a", [1, 2, 3], greedy(10))  # the engine still serves
    expected = run_alone(tiny_model, [Job("a", [1, 2, 3], greedy(10))])["a"]
    assert tokens_of(drain(engine)["a"]) == expected
