"""`python -m demo.train` end to end at toy scale: two data-parallel workers, a loadable checkpoint.

The command the README gives runs as written (two worker processes averaging gradients over
gloo), on a few hundred examples and a few steps; what it writes is the original gpt-oss layout
the engine's loader reads, and a second run with the same seed writes the same weights byte for
byte (the workers stay in lockstep, and nothing depends on timing while steps are counted).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from demo.bpe import build_encoding
from demo.conversations import generate_example, render_example
from demo.train import make_batches, probe, probe_set, training_row
from engine.model.gpt_oss import GptOss
from engine.model.weights import detect_layout
from harmony import Renderer, load_harmony_encoding

ROOT = Path(__file__).resolve().parents[2]


def run_training(out: Path) -> dict:
    command = [
        sys.executable, "-m", "demo.train", "--out", str(out), "--examples", "300",
        "--steps", "4", "--warmup", "2", "--hidden", "64", "--layers", "2", "--batch-tokens", "512",
        "--workers", "2", "--time-budget-min", "30", "--log-every", "1", "--probe-every", "2",
    ]  # fmt: skip
    done = subprocess.run(
        command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The held-out probe ran at steps 2 and 4 (worker 0 only) and counted every kind.
    probes = re.findall(
        r"step (\d+) probe \(values exact, teacher-forced, of 32\): (.*)", done.stderr
    )
    assert [step for step, _ in probes] == ["2", "4"], done.stderr[-3000:]
    assert all(
        re.fullmatch(r"arith \d+, tool_call \d+, tool_answer \d+", found) for _, found in probes
    )
    return json.loads((out / "training.json").read_text())


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    first, second = tmp_path_factory.mktemp("train-a"), tmp_path_factory.mktemp("train-b")
    summary = run_training(first)
    run_training(second)
    return first, second, summary


def test_two_workers_write_a_loadable_checkpoint(two_runs: tuple[Path, Path, dict]) -> None:
    first, _, summary = two_runs
    assert summary["workers"] == 2 and summary["steps"] == 4
    assert detect_layout(first) == "original"
    model = GptOss.from_checkpoint(first)
    encoding = load_harmony_encoding(model_dir=first)
    assert model.config.hidden_size == 64 and model.config.num_layers == 2
    assert model.config.vocab_size == encoding.n_vocab


def test_the_same_seed_trains_the_same_weights(two_runs: tuple[Path, Path, dict]) -> None:
    first, second, _ = two_runs
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


class _Knows:
    """Stands in for a model in `probe`: its "hidden state" at each position is the one-hot of a
    fixed answer for the next token, and its logits are that state."""

    def __init__(self, answers: torch.Tensor, vocab: int) -> None:
        self.answers, self.vocab = answers, vocab

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, docs: torch.Tensor):
        return torch.nn.functional.one_hot(self.answers[:, : ids.shape[1]], self.vocab).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def test_the_probe_counts_rows_with_every_probed_value_right() -> None:
    encoding = build_encoding([bytes([b]) for b in range(256)])
    rows = probe_set(encoding)
    assert sorted(rows) == ["arith", "tool_answer", "tool_call"]
    arith = rows["arith"]
    assert len(arith) == 32 and all(probed for _, probed in arith)
    # The probed positions of a sum's answer are its digits (and nothing before the answer).
    for tokens, probed in arith:
        assert all(encoding.decode([tokens[j]]).isdigit() for j in probed)
    longest = max(len(tokens) for tokens, _ in arith)
    truth = torch.zeros((len(arith), longest), dtype=torch.long)
    for r, (tokens, _) in enumerate(arith):
        truth[r, : len(tokens) - 1] = torch.tensor(tokens[1:])  # position j predicts token j + 1
    assert probe(_Knows(truth, encoding.n_vocab), arith) == 32
    wrong = truth.clone()
    for r in (0, 5):
        tokens, probed = arith[r]
        wrong[r, probed[-1] - 1] = (tokens[probed[-1]] + 1) % encoding.n_vocab
    tokens, probed = arith[7]
    wrong[7, probed[0] - 2] = 0  # a position before the probed ones does not count
    assert probe(_Knows(wrong, encoding.n_vocab), arith) == 30


def test_an_earlier_calls_arguments_are_targets_and_the_rest_of_the_prompt_is_not() -> None:
    encoding = build_encoding([bytes([b]) for b in range(256)])
    renderer = Renderer(encoding)
    rng = random.Random("rows")
    answer = generate_example(rng, "tool_answer")
    prompt, completion = render_example(answer, renderer)
    tokens, targets = training_row(prompt, completion, encoding.ids)
    assert tokens == prompt + completion
    in_prompt = [j for j in targets if j < len(prompt)]
    arguments = answer.messages[-2]["tool_calls"][0]["function"]["arguments"]
    # The call's arguments and its `<|call|>`, one run of positions right after its `<|message|>`.
    assert encoding.decode([tokens[j] for j in in_prompt]) == arguments + "<|call|>"
    assert in_prompt == list(range(in_prompt[0], in_prompt[-1] + 1))
    assert tokens[in_prompt[0] - 1] == encoding.ids.message
    assert targets[len(in_prompt) :] == list(range(len(prompt), len(tokens)))
    # An earlier turn's final answer (kept without its analysis) is not a target.
    sums = generate_example(rng, "arith")
    while not any(m["role"] == "assistant" for m in sums.messages):
        sums = generate_example(rng, "arith")
    prompt, completion = render_example(sums, renderer)
    assert training_row(prompt, completion, encoding.ids)[1] == list(
        range(len(prompt), len(prompt) + len(completion))
    )
    # In a batch, position j - 1 predicts each target token j and nothing else has a target.
    ((ids, batch_targets),) = make_batches([(tokens, targets)], 4096, random.Random(0))
    expected = torch.full((len(tokens),), -100)
    expected[[j - 1 for j in targets]] = torch.tensor([tokens[j] for j in targets])
    assert torch.equal(ids[0], torch.tensor(tokens)) and torch.equal(batch_targets[0], expected)
