"""The demo eval: its schema check, and a short real run through the server on the checkpoint.

- `validates` accepts exactly the arguments the demo tools' schemas allow (required keys, typed
  properties, enums, no unknown keys).
- `python -m demo.eval`'s pieces (held-out requests, the real server as a subprocess, `evaluate`)
  on a few requests of every kind: every measure is counted once per request it applies to, the
  per-problem and per-tool tallies add up to their measures, and the committed checkpoint's output
  is well-formed harmony every time.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter

import pytest

from demo import CHECKPOINT_DIR
from demo.conversations import TOOLS
from demo.eval import _free_port, evaluate, held_out, start_server, validates

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="no demo checkpoint"
)


def test_validates_follows_the_tool_schemas() -> None:
    weather, add = TOOLS["get_weather"]["parameters"], TOOLS["add"]["parameters"]
    assert validates({"location": "Paris", "unit": "celsius"}, weather)
    assert not validates({"location": "Paris"}, weather)  # a required key missing
    assert not validates({"location": "Paris", "unit": "kelvin"}, weather)  # not in the enum
    assert not validates({"location": 7, "unit": "celsius"}, weather)  # not a string
    assert not validates({"location": "Paris", "unit": "celsius", "x": 1}, weather)  # unknown key
    assert validates({"a": 1, "b": 2}, add)
    assert not validates({"a": 1, "b": "2"}, add)
    assert not validates({"a": 1, "b": True}, add)  # a bool is not an integer here
    assert not validates(["a", "b"], add)


def _tally_total(tally: dict[str, str]) -> tuple[int, int]:
    pairs = [tuple(map(int, v.split("/"))) for v in tally.values()]
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def test_a_short_eval_run_counts_every_measure() -> None:
    examples, _ = held_out(CHECKPOINT_DIR, seed=7)
    kinds = ("arith", "tool_call", "refusal")
    picked = [e for kind in kinds for e in [x for x in examples if x.kind == kind][:4]]
    port = _free_port()
    with tempfile.TemporaryDirectory() as state_dir:
        server = start_server(CHECKPOINT_DIR, port, state_dir)
        try:
            figures = asyncio.run(evaluate(f"http://127.0.0.1:{port}", CHECKPOINT_DIR, picked, 4))
        finally:
            server.terminate()
            server.wait(timeout=60)
    per_kind = Counter(e.kind for e in picked)
    assert figures["examples"] == 12
    assert figures["well-formed harmony"] == {"ok": 12, "n": 12, "rate": 1.0}
    for measure, kind in (
        ("arithmetic correct", "arith"),
        ("right tool, valid JSON arguments", "tool_call"),
        ("tool arguments exactly right", "tool_call"),
        ("tool result used in the answer", "tool_call"),
        ("refusal", "refusal"),
    ):
        assert figures[measure]["n"] == per_kind[kind], measure
    by_problem, by_tool = figures["arithmetic_by_problem"], figures["arguments_by_tool"]
    assert _tally_total(by_problem) == (figures["arithmetic correct"]["ok"], 4)
    assert _tally_total(by_tool) == (figures["tool arguments exactly right"]["ok"], 4)
    assert set(by_tool) <= set(TOOLS)
    assert set(figures["analysis_chars_by_effort"]) <= {"low", "medium", "high"}
