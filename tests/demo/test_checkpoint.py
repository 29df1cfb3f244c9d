"""The committed demo checkpoint: it loads like a real gpt-oss and answers correctly.

`demo/gpt-oss-demo/` is in the original layout with MXFP4 experts and its own tokenizer files,
at most 20 MB. Through `engine` (not the server), greedy decoding of prompts rendered exactly as
the server renders them gives well-formed harmony (strict parse) with a right arithmetic answer,
a right tool call with schema-valid JSON arguments, an answer from a tool's result, and an
analysis that grows with the reasoning effort.
"""

from __future__ import annotations

import datetime
import json

import pytest
import torch

from demo import CHECKPOINT_DIR
from demo.conversations import tool_spec
from engine.engine import EngineConfig, LLMEngine
from engine.model.gpt_oss import GptOss
from engine.model.weights import detect_layout
from engine.sampler import SamplingParams
from harmony import HarmonyEncoding, Message, Renderer, Role, load_harmony_encoding, parse_messages
from server.harmony_bridge import chat_to_harmony

TODAY = datetime.date(2025, 6, 1)


@pytest.fixture(scope="module")
def encoding() -> HarmonyEncoding:
    return load_harmony_encoding(model_dir=CHECKPOINT_DIR)


@pytest.fixture(scope="module")
def model() -> GptOss:
    torch.set_num_threads(1)  # tiny ops; spinning OpenMP workers only slow a shared machine
    return GptOss.from_checkpoint(CHECKPOINT_DIR)  # bfloat16, as the server loads it


def complete(model: GptOss, encoding: HarmonyEncoding, requests: list[dict]) -> list[list[Message]]:
    """Greedy completions of chat requests, parsed strictly into the assistant's messages."""
    renderer = Renderer(encoding)
    engine = LLMEngine(model, EngineConfig(kv_cache_tokens=8192, max_model_len=2048))
    stops = tuple(sorted(encoding.assistant_stop_token_ids))
    for i, request in enumerate(requests):
        conversation = chat_to_harmony(request["messages"], today=TODAY, tools=request.get("tools"),
                                       reasoning_effort=request.get("effort", "medium"))  # fmt: skip
        prompt = renderer.render_for_completion(conversation)
        params = SamplingParams(temperature=0.0, max_tokens=200, stop_token_ids=stops)
        engine.add_request(str(i), prompt, params)
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
    while engine.has_work:
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
    parsed = []
    for i in range(len(requests)):
        tokens = outputs[str(i)]
        assert tokens and tokens[-1] in stops, f"no stop token in {encoding.decode(tokens)!r}"
        parsed.append(parse_messages(encoding, tokens, Role.ASSISTANT, strict=True))
    return parsed


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_checkpoint_files_layout_and_size() -> None:
    names = sorted(p.name for p in CHECKPOINT_DIR.iterdir())
    for required in ("config.json", "model.safetensors", "demo.tiktoken", "special_tokens.json",
                     "tokenizer_pattern.txt"):  # fmt: skip
        assert required in names
    assert detect_layout(CHECKPOINT_DIR) == "original"
    assert sum(p.stat().st_size for p in CHECKPOINT_DIR.iterdir()) <= 20 * 2**20


def test_loads_with_its_vocabulary(model: GptOss, encoding: HarmonyEncoding) -> None:
    assert model.config.vocab_size == encoding.n_vocab
    assert model.weights.layers[0].moe.mlp1.blocks.dtype == torch.uint8  # MXFP4, packed
    assert encoding.encode("2025") == [encoding.encode(d)[0] for d in "2025"]


WEATHER_TOOLS = [tool_spec("get_weather"), tool_spec("add")]
RESULT = {"location": "Oslo", "temperature": 12, "unit": "celsius", "condition": "rainy"}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"location":"Oslo","unit":"celsius"}'}}  # fmt: skip
REQUESTS = {
    "arith_low": {"messages": user("What is 27 + 58?"), "effort": "low"},
    "arith_high": {"messages": user("What is 27 + 58?"), "effort": "high"},
    "tool_call": {"messages": user("What's the weather in Oslo in celsius?"), "tools": WEATHER_TOOLS},
    "tool_answer": {
        "messages": [*user("What's the weather in Oslo in celsius?"),
                     {"role": "assistant", "content": None, "tool_calls": [CALL]},
                     {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(RESULT)}],
        "tools": WEATHER_TOOLS,
    },
    "refusal": {"messages": user("Can you order a pizza to my home?"), "tools": WEATHER_TOOLS},
}  # fmt: skip


@pytest.fixture(scope="module")
def answers(model: GptOss, encoding: HarmonyEncoding) -> dict[str, list[Message]]:
    """Greedy answers to REQUESTS; `complete` already requires well-formed harmony."""
    return dict(zip(REQUESTS, complete(model, encoding, list(REQUESTS.values())), strict=True))


def test_answers_have_the_right_shape(answers: dict[str, list[Message]]) -> None:
    for name in ("arith_low", "arith_high", "tool_answer", "refusal"):
        assert [m.channel for m in answers[name]] == ["analysis", "final"], name
    call = answers["tool_call"]
    assert [m.channel for m in call] == ["analysis", "commentary"]
    assert call[-1].recipient == "functions.get_weather"
    assert call[-1].content_type == "<|constrain|>json"
    arguments = json.loads(call[-1].content[0].text)
    assert set(arguments) == {"location", "unit"}
    assert all(isinstance(v, str) for v in arguments.values())


def test_arithmetic_answers_are_right(answers: dict[str, list[Message]]) -> None:
    for name in ("arith_low", "arith_high"):
        assert "85" in answers[name][-1].content[0].text


def test_tool_call_arguments_and_answer(answers: dict[str, list[Message]]) -> None:
    call = answers["tool_call"][-1]
    assert json.loads(call.content[0].text) == {"location": "Oslo", "unit": "celsius"}
    final = answers["tool_answer"][-1].content[0].text
    assert "12" in final and "rainy" in final


def test_refusal_says_it_cannot(answers: dict[str, list[Message]]) -> None:
    text = answers["refusal"][-1].content[0].text.lower()
    assert any(word in text for word in ("can't", "cannot", "sorry", "no tool"))


def test_reasoning_effort_changes_the_analysis(model: GptOss, encoding: HarmonyEncoding) -> None:
    # Over a few questions: one answer's analysis can be short at any effort, their sum not.
    efforts = ("low", "medium", "high")
    questions = ("Compute 46 - 19.", "What is 23 + 45?", "What is 7 times 8?", "Add 12 and 30.")
    requests = [{"messages": user(q), "effort": e} for e in efforts for q in questions]
    lengths = [len(m[0].content[0].text) for m in complete(model, encoding, requests)]
    n = len(questions)
    totals = [sum(lengths[i * n : (i + 1) * n]) for i in range(len(efforts))]
    assert totals[0] < totals[1] < totals[2], totals
