"""The sampler: greedy, filters, seeds, penalties, bias, logprobs, processors, min_tokens, params.

Statistical tests draw many rows at once from a sampler with a fixed seed: deterministic, and each
bound is loose enough to hold for any seed yet tight enough to catch a wrong distribution.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import Sampler, SamplingParams, SamplingState, TokenMask

VOCAB = 32


def _logits(rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * scale


def _states(params: SamplingParams, rows: int) -> list[SamplingState]:
    return [SamplingState(params, prompt_token_ids=[]) for _ in range(rows)]


def _draw(
    row: list[float], params: SamplingParams, draws: int = 2000, seed: int = 0
) -> torch.Tensor:
    """`draws` independent samples from one row of logits (one batch row per draw)."""
    logits = torch.tensor([row]).expand(draws, -1).contiguous()
    return Sampler(seed=seed).sample(logits, _states(params, draws)).token_ids


# --- greedy ----------------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    logits = _logits(8)
    out = Sampler().sample(logits, _states(SamplingParams(temperature=0), 8))
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None


def test_greedy_ties_go_to_the_lowest_id() -> None:
    logits = torch.tensor([[1.0, 5.0, 5.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    out = Sampler().sample(logits, _states(SamplingParams(temperature=0), 2))
    assert out.token_ids.tolist() == [1, 0]


def test_greedy_with_penalties_is_argmax_of_the_penalised_logits() -> None:
    logits = torch.tensor([[3.0, 2.9, 2.5, -1.0, 0.0]])
    params = SamplingParams(temperature=0, presence_penalty=0.5, repetition_penalty=1.2)
    state = SamplingState(params, prompt_token_ids=[1], output_token_ids=[0])
    sampler = Sampler()
    processed = sampler.process_logits(logits, [state])
    # token 0: 3 / 1.2 - 0.5 (output); token 1: 2.9 / 1.2 (prompt: repetition only)
    expected = torch.tensor([[3.0 / 1.2 - 0.5, 2.9 / 1.2, 2.5, -1.0, 0.0]])
    torch.testing.assert_close(processed, expected)
    token = sampler.sample(logits, [state]).token_ids
    assert token.tolist() == [2] == processed.argmax(dim=-1).tolist()
    assert logits.argmax().item() == 0  # the penalties changed the winner


def test_greedy_rows_stay_argmax_beside_random_rows() -> None:
    logits = _logits(6, vocab=200, scale=1.0)
    greedy, hot = SamplingParams(temperature=0), SamplingParams(temperature=1.5, top_p=0.9)
    states = [SamplingState(greedy if i % 2 else hot, []) for i in range(6)]
    tokens = Sampler(seed=3).sample(logits, states).token_ids
    assert torch.equal(tokens[1::2], logits[1::2].argmax(dim=-1))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_top_k_one_is_greedy(temperature: float) -> None:
    logits = _logits(64)
    params = SamplingParams(temperature=temperature, top_k=1)
    tokens = Sampler(seed=1).sample(logits, _states(params, 64)).token_ids
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_tiny_top_p_is_greedy() -> None:
    logits = _logits(64)
    tokens = Sampler(seed=1).sample(logits, _states(SamplingParams(top_p=1e-6), 64)).token_ids
    assert torch.equal(tokens, logits.argmax(dim=-1))


# --- filters ---------------------------------------------------------------------------------


def test_min_p_never_samples_below_the_threshold() -> None:
    # threshold 0.3 * 0.4 = 0.12: tokens 3 (0.10) and 4 (0.05) must never come out
    row = [math.log(p) for p in (0.4, 0.3, 0.15, 0.1, 0.05)]
    tokens = _draw(row, SamplingParams(min_p=0.3))
    assert set(tokens.tolist()) == {0, 1, 2}
    assert set(_draw(row, SamplingParams()).tolist()) == {0, 1, 2, 3, 4}  # the control


@pytest.mark.parametrize("top_p", [1.0, 0.999])  # the top-k-only path and the sorted path
def test_top_k_restricts_to_the_k_best(top_p: float) -> None:
    row = _logits(1, scale=0.5)[0]
    best = set(row.topk(3).indices.tolist())
    tokens = _draw(row.tolist(), SamplingParams(top_k=3, top_p=top_p))
    assert set(tokens.tolist()) == best


def test_top_p_keeps_the_smallest_nucleus() -> None:
    row = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    # mass before token 2 is 0.8 >= 0.7: the nucleus is {0, 1}
    assert set(_draw(row, SamplingParams(top_p=0.7)).tolist()) == {0, 1}


def test_top_k_larger_than_the_vocabulary_is_off() -> None:
    row = [0.0, 0.0, 0.0]
    assert set(_draw(row, SamplingParams(top_k=50), draws=500).tolist()) == {0, 1, 2}


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_empirical_frequencies_match_the_distribution(temperature: float) -> None:
    probs = torch.tensor([0.5, 0.3, 0.2])
    tokens = _draw(probs.log().tolist(), SamplingParams(temperature=temperature), draws=20_000)
    expected = probs ** (1 / temperature)
    expected /= expected.sum()
    observed = torch.bincount(tokens, minlength=3).float() / tokens.numel()
    torch.testing.assert_close(observed, expected, atol=0.015, rtol=0)


# --- seeds -----------------------------------------------------------------------------------


def _run_seeded(batch_extra: bool, seed: int = 1234, steps: int = 6) -> list[int]:
    """The tokens of one seeded request, alone or at row 2 of a batch with other random rows."""
    vocab = 500
    target = SamplingState(SamplingParams(seed=seed), prompt_token_ids=[1, 2])
    others = [
        SamplingState(SamplingParams(), [3]),
        SamplingState(SamplingParams(seed=99, top_k=40), [4]),
        SamplingState(SamplingParams(temperature=0), [5]),
        SamplingState(SamplingParams(temperature=0.8), [6]),
    ]
    sampler = Sampler(seed=7 if batch_extra else None)
    for step in range(steps):
        row = _logits(1, vocab=vocab, seed=100 + step, scale=0.5)
        if batch_extra:
            logits = torch.cat(
                [_logits(2, vocab, seed=step), row, _logits(2, vocab, seed=50 + step)]
            )
            states = [*others[:2], target, *others[2:]]
        else:
            logits, states = row, [target]
        tokens = sampler.sample(logits, states).token_ids.tolist()
        for state, token in zip(states, tokens, strict=True):
            state.output_token_ids.append(token)
    return target.output_token_ids


def test_a_seeded_request_samples_the_same_alone_or_in_a_batch() -> None:
    alone = _run_seeded(batch_extra=False)
    assert _run_seeded(batch_extra=True) == alone
    assert len(set(alone)) > 1  # the draws vary from step to step
    assert _run_seeded(batch_extra=False, seed=4321) != alone  # and the seed matters


def test_two_requests_with_one_seed_in_one_batch_agree() -> None:
    params = SamplingParams(seed=5, temperature=1.3)
    states = [
        SamplingState(params, []),
        SamplingState(SamplingParams(), []),
        SamplingState(params, []),
    ]
    sampler = Sampler()
    for step in range(5):
        row = _logits(1, vocab=300, seed=step, scale=0.3)
        logits = torch.cat([row, _logits(1, vocab=300, seed=99), row])
        tokens = sampler.sample(logits, states).token_ids.tolist()
        assert tokens[0] == tokens[2], step
        for state, token in zip(states, tokens, strict=True):
            state.output_token_ids.append(token)


# --- penalties and bias ----------------------------------------------------------------------


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    penalised = SamplingState(params, prompt_token_ids=[4], output_token_ids=[1, 1, 3, 1])
    plain = SamplingState(SamplingParams(), prompt_token_ids=[4], output_token_ids=[1])
    logits = torch.zeros(2, 5)
    processed = Sampler().process_logits(logits, [plain, penalised])
    expected_row = [0.0, -(0.5 + 3 * 0.25), 0.0, -(0.5 + 0.25), 0.0]
    torch.testing.assert_close(processed, torch.tensor([[0.0] * 5, expected_row]))


@pytest.mark.parametrize("penalty", [2.0, 0.5])
def test_repetition_penalty_over_prompt_and_output(penalty: float) -> None:
    logits = torch.tensor([[2.0, -1.0, 2.0, -1.0, 0.5]])
    state = SamplingState(
        SamplingParams(repetition_penalty=penalty), prompt_token_ids=[0], output_token_ids=[1]
    )
    processed = Sampler().process_logits(logits, [state])
    # seen: 0 (prompt, positive: divided), 1 (output, negative: multiplied); 2-4 untouched
    expected = torch.tensor([[2.0 / penalty, -1.0 * penalty, 2.0, -1.0, 0.5]])
    torch.testing.assert_close(processed, expected)


def test_logit_bias_is_added() -> None:
    logits = torch.zeros(1, 4)
    params = SamplingParams(logit_bias={1: 2.5, 3: -1.0})
    processed = Sampler().process_logits(logits, [SamplingState(params, [])])
    torch.testing.assert_close(processed, torch.tensor([[0.0, 2.5, 0.0, -1.0]]))


def test_logit_bias_minus_100_bans_and_plus_100_forces() -> None:
    row = [10.0, 0.0, 0.0, -5.0]
    banned = _draw(row, SamplingParams(logit_bias={0: -100}), draws=1000)
    assert 0 not in banned.tolist()
    forced = _draw(row, SamplingParams(logit_bias={3: 100}), draws=1000)
    assert set(forced.tolist()) == {3}


def test_params_are_hashable_and_logit_bias_normalised() -> None:
    a = SamplingParams(logit_bias={3: 1.0, 1: -2.0}, stop_token_ids=[7])  # type: ignore[arg-type]
    b = SamplingParams(logit_bias=((1, -2.0), (3, 1.0)), stop_token_ids=(7,))
    assert a == b
    assert hash(a) == hash(b)
    assert a.logit_bias == ((1, -2.0), (3, 1.0))


# --- logprobs --------------------------------------------------------------------------------


def test_logprobs_are_of_the_raw_logits() -> None:
    logits = _logits(3, vocab=50)
    raw = torch.log_softmax(logits, dim=-1)
    params = [
        SamplingParams(logprobs=2, temperature=0.5, presence_penalty=1.0, logit_bias={0: 5}),
        SamplingParams(),
        SamplingParams(logprobs=5, temperature=0),
    ]
    states = [SamplingState(p, [1], output_token_ids=[2, 3]) for p in params]
    out = Sampler(seed=0).sample(logits, states)
    assert out.logprobs is not None
    lp = out.logprobs
    assert lp.counts == (2, None, 5)
    assert lp.top_ids.shape == lp.top_logprobs.shape == (3, 5)
    # top alternatives: the best of the raw distribution, sorted, whatever the sampling settings
    expected = raw.topk(5, dim=-1)
    assert torch.equal(lp.top_ids, expected.indices)
    torch.testing.assert_close(lp.top_logprobs, expected.values)
    assert torch.all(lp.top_logprobs[:, :-1] >= lp.top_logprobs[:, 1:])
    torch.testing.assert_close(lp.top_logprobs, raw.gather(1, lp.top_ids))
    # the sampled token's own logprob, also raw
    rows = torch.arange(3)
    torch.testing.assert_close(lp.sampled, raw[rows, out.token_ids])


def test_logprobs_zero_gives_only_the_sampled_token() -> None:
    logits = _logits(2)
    out = Sampler().sample(logits, _states(SamplingParams(logprobs=0, temperature=0), 2))
    assert out.logprobs is not None
    assert out.logprobs.top_ids.shape == (2, 0)
    torch.testing.assert_close(out.logprobs.sampled, torch.log_softmax(logits, -1).amax(dim=-1))


# --- processors, min_tokens ------------------------------------------------------------------


def test_logits_processors_see_the_output_ids_and_their_result_is_used() -> None:
    calls: list[tuple[list[int], torch.Tensor]] = []

    def only_seven(output_ids: list[int], row: torch.Tensor) -> torch.Tensor:
        calls.append((list(output_ids), row.clone()))
        forced = torch.full_like(row, -math.inf)
        forced[7] = 0.0
        return forced

    def record(output_ids: list[int], row: torch.Tensor) -> torch.Tensor:
        calls.append((list(output_ids), row.clone()))
        return row

    logits = _logits(2)
    logits[1, 3] = 50.0  # token 3 would win by far without the processor
    params = SamplingParams(logits_processors=(only_seven, record), logit_bias={3: 100})
    states = [SamplingState(SamplingParams(), []), SamplingState(params, [9], [4, 5])]
    tokens = Sampler(seed=0).sample(logits, states).token_ids
    assert tokens[1].item() == 7  # the processor's -inf survives a +100 bias
    assert [ids for ids, _ in calls] == [[4, 5], [4, 5]]
    torch.testing.assert_close(calls[0][1], logits[1])  # the first sees the model's logits
    assert calls[1][1][7] == 0.0 and calls[1][1][3] == -math.inf  # the second, the first's result


def test_a_token_mask_bans_in_its_rows_only_and_survives_a_bias() -> None:
    logits = _logits(4)
    banned = torch.zeros(2, VOCAB, dtype=torch.bool)
    banned[:, :30] = True  # rows 1 and 3 may take only tokens 30 and 31
    mask = TokenMask(torch.tensor([1, 3]), banned)
    params = SamplingParams(logit_bias={0: 100}, presence_penalty=0.5)
    states = [SamplingState(params, [], [2, 2]) for _ in range(4)]
    sampler = Sampler(seed=0)
    processed = sampler.process_logits(logits, states, mask)
    plain = sampler.process_logits(logits, states)
    assert torch.equal(processed[[0, 2]], plain[[0, 2]])  # bit for bit
    assert torch.isinf(processed[[1, 3], :30]).all()
    assert torch.equal(processed[[1, 3], 30:], plain[[1, 3], 30:])
    tokens = sampler.sample(logits.expand(4, -1), states, mask).token_ids
    assert tokens[0] == 0 and tokens[2] == 0  # the +100 bias wins where nothing is banned
    assert set(tokens[[1, 3]].tolist()) <= {30, 31}
    # A mask over every row, in order.
    every = TokenMask(
        None, torch.ones(4, VOCAB, dtype=torch.bool).index_fill_(1, torch.tensor([5]), False)
    )
    greedy = _states(SamplingParams(temperature=0), 4)
    assert Sampler().sample(logits, greedy, every).token_ids.tolist() == [5, 5, 5, 5]


def test_min_tokens_masks_stop_tokens_until_enough_were_generated() -> None:
    logits = torch.tensor([[0.0, 1.0, 0.5, 0.0, 0.0, 9.0]])
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(5,))
    state = SamplingState(params, [0])
    sampler = Sampler()
    for expected in (1, 1, 5):
        token = sampler.sample(logits, [state]).token_ids.item()
        assert token == expected
        state.output_token_ids.append(token)


# --- dtypes, inputs --------------------------------------------------------------------------


def test_bf16_logits() -> None:
    logits = _logits(4, vocab=100).to(torch.bfloat16)
    greedy = Sampler().sample(logits, _states(SamplingParams(temperature=0), 4)).token_ids
    assert torch.equal(greedy, logits.float().argmax(dim=-1))
    params = SamplingParams(top_k=5, top_p=0.9, min_p=0.05, logprobs=3, presence_penalty=0.1)
    out = Sampler(seed=0).sample(logits, [SamplingState(params, [1], [2]) for _ in range(4)])
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs is not None and out.logprobs.top_logprobs.dtype == torch.float32
    allowed = logits.float().topk(5, dim=-1).indices
    assert bool((allowed == out.token_ids[:, None]).any(dim=-1).all())
    torch.testing.assert_close(
        out.logprobs.top_logprobs, torch.log_softmax(logits.float(), -1).topk(3).values
    )


def test_the_callers_logits_are_not_written() -> None:
    logits = _logits(2)
    before = logits.clone()
    params = SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.5, logit_bias={0: -100})
    Sampler().sample(logits, [SamplingState(params, [0, 1], [2]) for _ in range(2)])
    assert torch.equal(logits, before)


# --- params validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("seed", 1.5),
        ("seed", True),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("repetition_penalty", 0),
        ("repetition_penalty", -1.0),
        ("logit_bias", {1: 101}),
        ("logit_bias", {-1: 1}),
        ("logit_bias", {"5": 1.0}),
        ("logprobs", -1),
        ("logprobs", 21),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("min_tokens", 17),  # above the default max_tokens of 16
        ("stop_token_ids", (-1,)),
        ("logits_processors", (1,)),
        ("grammar", ""),
        ("grammar", b"start: 'a'"),
    ],
)
def test_invalid_params_name_the_field(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name}: expected .*found"):
        SamplingParams(**{name: value})  # type: ignore[arg-type]


def test_check_vocab_rejects_ids_outside_the_vocabulary() -> None:
    SamplingParams(logit_bias={99: 1}, stop_token_ids=(99,)).check_vocab(100)
    with pytest.raises(ValueError, match=r"SamplingParams\.logit_bias"):
        SamplingParams(logit_bias={100: 1}).check_vocab(100)
    with pytest.raises(ValueError, match=r"SamplingParams\.stop_token_ids"):
        SamplingParams(stop_token_ids=(100,)).check_vocab(100)
