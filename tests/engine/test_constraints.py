"""Constrained decoding in the engine (engine/constraints.py), on a tiny random model.

The model is random: unconstrained, its replies are noise (no well-formed call, no JSON). With the
harmony reply grammars every one of 200 sampled requests must come out well-formed: a call to a
declared function whose arguments validate against its JSON Schema ("required"), or a final answer
that validates against its schema, over schemas with nested objects, arrays, enums, bounded
numbers, optional fields and unions; and the analysis before it stays free (it differs from seed
to seed). Unconstrained requests batched with constrained ones produce exactly their solo tokens.

A logit bias on `<|end|>`, `"`, `}` and `]` keeps the random model's replies short (it would
otherwise write hundreds of tokens per string): a bias only reorders what the mask allows, so it
cannot make an output valid; the mask does that.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence

import jsonschema
import pytest
import torch

from engine.constraints import GrammarConstraints, GrammarVocabulary, banned_from_bitmask
from engine.engine import EngineConfig, LLMEngine, RequestError
from engine.model.gpt_oss import GptOss
from engine.request import FinishReason
from engine.sampler import SamplingParams
from harmony import HarmonyEncoding, Role, parse_messages
from harmony.grammar import FunctionConstraint, ReplyConstraint, ReplyGrammars
from tests.harmony.synthetic_vocab import synthetic_encoding

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEMAS: dict[str, dict] = {
    "get_weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "add": {
        "type": "object",
        "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    "book_trip": {
        "type": "object",
        "properties": {
            "traveler": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "age": {"type": "integer", "minimum": 0, "maximum": 130},
                },
                "required": ["name"],
                "additionalProperties": False,
            },
            "stops": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "nights": {"type": "integer", "minimum": 1},
                    },
                    "required": ["city", "nights"],
                    "additionalProperties": False,
                },
                "maxItems": 3,
            },
            "class": {"enum": ["economy", "business", None]},
            "budget": {"anyOf": [{"type": "number", "minimum": 0}, {"type": "null"}]},
            "notes": {"type": "string"},
        },
        "required": ["traveler", "stops"],
        "additionalProperties": False,
    },
    "search": {
        "type": "object",
        "properties": {
            "query": {
                "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]
            },
            "limit": {"type": "integer"},
            "filters": {"type": "object", "additionalProperties": {"type": "boolean"}},
        },
        "required": ["query"],
    },
}
N_REQUESTS = 200


@pytest.fixture(scope="module")
def enc() -> HarmonyEncoding:
    return synthetic_encoding()


def vocabulary(enc: HarmonyEncoding) -> GrammarVocabulary:
    return GrammarVocabulary(enc.mergeable_ranks, enc.special_tokens, enc.pattern, enc.ids.return_)


@pytest.fixture(scope="module")
def grammars(enc: HarmonyEncoding) -> ReplyGrammars:
    return ReplyGrammars(enc)


def make_engine(
    model: GptOss, enc: HarmonyEncoding, overlap: bool | None = None, **config
) -> LLMEngine:
    """An engine with the grammar vocabulary; `overlap` forces where masks are filled (the
    worker thread or the step's own), else the engine decides."""
    config = {"max_num_seqs": 64, "kv_cache_tokens": 65536, "max_model_len": 4096, **config}
    engine = LLMEngine(model, EngineConfig(**config), vocabulary(enc))
    if overlap is not None:
        assert engine.constraints is not None
        engine.constraints.overlap = overlap
    return engine


def prompt(enc: HarmonyEncoding, i: int) -> list[int]:
    text = f"<|start|>user<|message|>Request number {i}, please.<|end|><|start|>assistant"
    return enc.encode_with_special_tokens(text)


def steering(enc: HarmonyEncoding) -> dict[int, float]:
    return {
        enc.ids.end: 3.0,
        enc.encode('"')[0]: 5.0,
        enc.encode("}")[0]: 3.0,
        enc.encode("]")[0]: 3.0,
    }


def sampled(enc: HarmonyEncoding, seed: int, grammar: str | None, **kwargs) -> SamplingParams:
    return SamplingParams(
        temperature=1.0,
        seed=seed,
        max_tokens=kwargs.pop("max_tokens", 3000),
        stop_token_ids=tuple(sorted(enc.assistant_stop_token_ids)),
        grammar=grammar,
        **kwargs,
    )


def run(engine: LLMEngine, jobs: Sequence[tuple[str, list[int], SamplingParams]]):
    """Add every job, step until idle: request id -> (tokens, finish reason, error)."""
    for rid, ids, params in jobs:
        engine.add_request(rid, ids, params)
    tokens: dict[str, list[int]] = {rid: [] for rid, _, _ in jobs}
    ends: dict[str, tuple[FinishReason | None, str | None]] = {}
    for _ in range(20_000):
        if not engine.has_work:
            break
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finish_reason is not None:
                ends[out.request_id] = (out.finish_reason, out.error)
    assert not engine.has_work
    return {rid: (tokens[rid], *ends[rid]) for rid in tokens}


def analysis_texts(messages) -> str:
    return "".join(m.content[0].text for m in messages if m.channel == "analysis")


def test_unconstrained_the_random_model_writes_no_call(tiny_model: GptOss, enc) -> None:
    """The baseline the grammar is measured against: noise, not calls."""
    engine = make_engine(tiny_model, enc)
    jobs = [
        (f"r{i}", prompt(enc, i), sampled(enc, i, None, max_tokens=200, logit_bias=steering(enc)))
        for i in range(32)
    ]
    calls = 0
    for tokens, _, _ in run(engine, jobs).values():
        messages = parse_messages(enc, tokens, Role.ASSISTANT)
        calls += any((m.recipient or "").startswith("functions.") for m in messages)
    assert calls <= 1


def test_required_200_sampled_requests_all_call_a_declared_function_with_valid_arguments(
    tiny_model: GptOss, enc, grammars
) -> None:
    functions = tuple(FunctionConstraint(name, schema) for name, schema in SCHEMAS.items())
    grammar = grammars.build(ReplyConstraint(functions, require_call=True))
    engine = make_engine(tiny_model, enc, overlap=True)  # masks filled in the worker thread
    jobs = [
        (f"r{i}", prompt(enc, i), sampled(enc, i, grammar, logit_bias=steering(enc)))
        for i in range(N_REQUESTS)
    ]
    names: Counter[str] = Counter()
    analyses = []
    for rid, (tokens, reason, error) in run(engine, jobs).items():
        assert (reason, error) == (FinishReason.STOP, None), rid
        assert tokens[-1] == enc.ids.call
        *before, call = parse_messages(enc, tokens, Role.ASSISTANT, strict=True)
        assert all(m.channel == "analysis" and m.recipient is None for m in before)
        assert call.channel == "commentary" and call.content_type == "<|constrain|>json"
        name = (call.recipient or "").removeprefix("functions.")
        jsonschema.validate(json.loads(call.content[0].text), SCHEMAS[name])
        names[name] += 1
        analyses.append(analysis_texts(before))
    assert set(names) == set(SCHEMAS)  # the model's own choice among them
    written = [a for a in analyses if a]
    assert len(written) > N_REQUESTS // 4
    assert len(set(written)) > 0.9 * len(written)  # free: it differs from seed to seed
    assert not engine.constraints.active  # every matcher went with its request


def test_json_schema_200_sampled_final_answers_all_validate(
    tiny_model: GptOss, enc, grammars
) -> None:
    schemas = list(SCHEMAS.values())
    built = [grammars.build(ReplyConstraint(final_schema=s)) for s in schemas]
    engine = make_engine(tiny_model, enc, overlap=False)  # masks filled on the step's thread
    jobs = [
        (f"r{i}", prompt(enc, i), sampled(enc, i, built[i % 4], logit_bias=steering(enc)))
        for i in range(N_REQUESTS)
    ]
    for rid, (tokens, reason, error) in run(engine, jobs).items():
        assert (reason, error) == (FinishReason.STOP, None), rid
        *before, final = parse_messages(enc, tokens, Role.ASSISTANT, strict=True)
        assert all(m.channel == "analysis" for m in before)
        assert final.channel == "final" and tokens[-1] == enc.ids.return_
        jsonschema.validate(json.loads(final.content[0].text), schemas[int(rid[1:]) % 4])


@pytest.mark.parametrize("overlap", [True, False], ids=["worker", "inline"])
@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_unconstrained_requests_batched_with_constrained_ones_give_their_solo_tokens(
    tiny_model: GptOss, enc, grammars, kind: str, overlap: bool
) -> None:
    grammar = grammars.build(
        ReplyConstraint((FunctionConstraint("add", SCHEMAS["add"]),), require_call=True)
    )
    rng = random.Random(7)

    def params(i: int, with_grammar: bool) -> SamplingParams:
        return SamplingParams(
            temperature=0.0 if kind == "greedy" else 0.9,
            seed=None if kind == "greedy" else 100 + i,
            max_tokens=rng.randint(5, 60),
            logit_bias=steering(enc),
            grammar=grammar if with_grammar else None,
        )

    jobs = [(f"r{i}", prompt(enc, i), params(i, with_grammar=i % 2 == 0)) for i in range(24)]
    together = run(make_engine(tiny_model, enc, overlap), jobs)
    free = [job for job in jobs if job[2].grammar is None]
    alone = LLMEngine(tiny_model, EngineConfig(enable_prefix_caching=False))  # no vocabulary
    for job in free:
        (tokens, _, _) = run(alone, [job])[job[0]]
        assert together[job[0]][0] == tokens, job[0]
    constrained = [job for job in jobs if job[2].grammar is not None]
    assert all(together[job[0]][0][0] == enc.ids.channel for job in constrained)


def test_a_grammar_that_does_not_compile_refuses_its_request(tiny_model: GptOss, enc) -> None:
    engine = make_engine(tiny_model, enc)
    with pytest.raises(RequestError, match="does not compile"):
        engine.add_request("bad", [1, 2], SamplingParams(grammar='start: %json {"type": "strin"}'))
    with pytest.raises(RequestError, match="does not compile"):
        engine.add_request("bad", [1, 2], SamplingParams(grammar="start: <|no_such_token|>"))
    assert not engine.requests and not engine.constraints.active
    plain = LLMEngine(tiny_model, EngineConfig())
    with pytest.raises(RequestError, match="without a grammar vocabulary"):
        plain.add_request("r", [1, 2], SamplingParams(grammar='start: "a"'))


def test_a_complete_grammar_ends_its_request_without_a_stop_token(tiny_model: GptOss, enc) -> None:
    engine = make_engine(tiny_model, enc)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=50, grammar='start: "the" " is"')
    (tokens, reason, error) = run(engine, [("r", [1, 2, 3], params)])["r"]
    assert enc.decode(tokens) == "the is"
    assert (reason, error) == (FinishReason.STOP, None)


def test_an_abort_drops_the_matcher(tiny_model: GptOss, enc) -> None:
    engine = make_engine(tiny_model, enc)
    engine.add_request("r", [1, 2], SamplingParams(max_tokens=50, grammar='start: "a"+'))
    engine.step()
    assert engine.constraints.active
    engine.abort("r")
    assert not engine.constraints.active


def test_a_token_the_grammar_refuses_fails_only_that_request(enc) -> None:
    constraints = GrammarConstraints(vocabulary(enc), 512, overlap=True)
    constraints.add("a", 'start: "the"')
    constraints.add("b", 'start: "the"')
    the = enc.encode("the")[0]
    failed, complete = constraints.advance({"a": enc.encode("x")[0], "b": the, "c": 5})
    assert list(failed) == ["a"] and "not allowed" in failed["a"]
    assert complete == ["b"]


def test_masks_cover_only_the_constrained_rows(enc) -> None:
    constraints = GrammarConstraints(vocabulary(enc), 512, overlap=True)
    assert constraints.start_masks(["x", "y"]) is None  # nothing constrained: nothing runs
    constraints.add("b", 'start: "the"')
    job = constraints.start_masks(["a", "b", "c"])
    assert job is not None
    mask = job.wait(torch.device("cpu"))
    assert mask.rows is not None and mask.rows.tolist() == [1]
    assert mask.banned.shape == (1, 512)
    allowed = (~mask.banned[0]).nonzero().flatten().tolist()
    # Text the grammar forces comes as the vocabulary's own tokenization (llguidance's forcing:
    # what the model was trained on), not as "t" or "th".
    assert allowed == enc.encode("the")


def test_the_device_unpacking_of_the_bits_is_the_cpu_one(enc) -> None:
    """On a GPU the packed bits cross and torch unpacks them; on the CPU numpy does."""
    constraints = GrammarConstraints(vocabulary(enc), 512, overlap=True)
    for i, grammar in enumerate(['start: "the"', "start: <[0-300]>*", 'start: "x" | <|end|>']):
        constraints.add(f"r{i}", grammar)
    job = constraints.start_masks(["r0", "r1", "r2"])
    assert job is not None
    cpu = job.wait(torch.device("cpu")).banned
    assert cpu.shape == (3, 512)
    torch.testing.assert_close(banned_from_bitmask(torch.from_numpy(job._bitmask), 512), cpu)
    # An accepting grammar also allows the vocabulary's end token (here `<|return|>`).
    assert (~cpu[1]).nonzero().flatten().tolist() == [*range(301), enc.ids.return_]
