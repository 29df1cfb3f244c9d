"""`python -m demo.train` end to end at toy scale: two data-parallel workers, a loadable checkpoint.

The command the README gives runs as written (two worker processes averaging gradients over
gloo), on a few hundred examples and a few steps; what it writes is the original gpt-oss layout
the engine's loader reads, and a second run with the same seed writes the same weights byte for
byte (the workers stay in lockstep, and nothing depends on timing while steps are counted).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.model.gpt_oss import GptOss
from engine.model.weights import detect_layout
from harmony import load_harmony_encoding

ROOT = Path(__file__).resolve().parents[2]


def run_training(out: Path) -> dict:
    command = [
        sys.executable, "-m", "demo.train", "--out", str(out), "--examples", "300",
        "--steps", "4", "--warmup", "2", "--hidden", "64", "--layers", "2", "--batch-tokens", "512",
        "--workers", "2", "--time-budget-min", "30", "--log-every", "1",
    ]  # fmt: skip
    done = subprocess.run(
        command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
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
