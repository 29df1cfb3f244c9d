"""The gpt-oss forward against Hugging Face transformers, and the paged cache against itself.

On a tiny random checkpoint (real file layouts, experts really MXFP4): logits equal
`GptOssForCausalLM`'s for prompts that cross the sliding window and block boundaries; decoding token
by token through the paged cache, prefilling in chunks, batching sequences of different lengths,
scattering blocks, and freeing sliding-window blocks that left the window all give the logits of one
full forward; both checkpoint layouts of the same weights give identical logits.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.config import FULL, SLIDING, preset
from engine.model.forward_batch import SequenceChunk, build_forward_batch
from engine.model.gpt_oss import GptOss
from engine.model.random_checkpoint import write_random_checkpoint

BLOCK = 16
PROMPT_LENGTHS = [1, 127, 128, 129, 300, 1000]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-gpt-oss")
    return write_random_checkpoint(directory, preset("tiny"), layout="both", seed=7)


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> GptOss:
    return GptOss.from_checkpoint(checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_model(checkpoint: Path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GptOssForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return hf.eval()


def prompt(n: int, seed: int = 0, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Allocator:
    """Hands out physical blocks in a shuffled order, so tables are never the identity."""

    def __init__(self, num_blocks: int, seed: int = 0) -> None:
        self.free = list(range(1, num_blocks))  # block 0 stays unused: a poisoned-read canary
        random.Random(seed).shuffle(self.free)

    def blocks(self, n: int) -> list[int]:
        taken, self.free = self.free[:n], self.free[n:]
        return taken


def new_cache(model: GptOss, num_blocks: int = 256):
    return model.new_kv_cache({FULL: num_blocks, SLIDING: num_blocks}, BLOCK)


def full_logits(model: GptOss, tokens: list[int]) -> torch.Tensor:
    """Logits at every position from one forward over the whole prompt."""
    n_blocks = -(-len(tokens) // BLOCK)
    cache = new_cache(model, n_blocks + 1)
    table = list(range(1, n_blocks + 1))
    batch = build_forward_batch([SequenceChunk(tokens, 0, {FULL: table, SLIDING: table})], BLOCK)
    return model.compute_logits(model.forward(batch, cache))


@pytest.mark.parametrize("n", PROMPT_LENGTHS)
def test_logits_equal_transformers(model: GptOss, hf_model, n: int) -> None:
    tokens = prompt(n, seed=n)
    ours = full_logits(model, tokens)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([tokens])).logits[0].float()
    assert ours.shape == theirs.shape == (n, model.config.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_bf16_logits_within_bf16_tolerance(checkpoint: Path, hf_model) -> None:
    model = GptOss.from_checkpoint(checkpoint, dtype=torch.bfloat16)
    tokens = prompt(200, seed=3)
    ours = full_logits(model, tokens)
    with torch.no_grad():
        exact = hf_model(torch.tensor([tokens])).logits[0].float()
    # bf16 keeps 8 bits of mantissa: the error over two layers stays a small fraction of the spread.
    error = (ours - exact).abs().mean() / exact.std()
    assert error < 0.05, f"mean bf16 error {error:.3f} of the logits' std"
    assert (ours.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9


def test_both_layouts_give_identical_logits(checkpoint: Path, model: GptOss) -> None:
    original = GptOss.from_checkpoint(checkpoint / "original", dtype=torch.float32)
    tokens = prompt(150, seed=5)
    assert torch.equal(full_logits(original, tokens), full_logits(model, tokens))


def run_incrementally(model: GptOss, tokens: list[int], chunk_sizes: list[int]) -> torch.Tensor:
    """Feed the prompt in chunks through one paged cache; logits of every position."""
    alloc = Allocator(200, seed=len(tokens))
    cache = new_cache(model, 200)
    tables: dict[str, list[int]] = {FULL: [], SLIDING: []}
    done, out = 0, []
    for size in chunk_sizes:
        chunk = tokens[done : done + size]
        need = -(-(done + len(chunk)) // BLOCK)
        for table in tables.values():
            table.extend(alloc.blocks(need - len(table)))
        seq = SequenceChunk(chunk, done, {g: list(t) for g, t in tables.items()})
        batch = build_forward_batch([seq], BLOCK)
        out.append(model.compute_logits(model.forward(batch, cache)))
        done += len(chunk)
    return torch.cat(out)


def test_token_by_token_decode_equals_full_forward(model: GptOss) -> None:
    tokens = prompt(300, seed=11)
    expected = full_logits(model, tokens)
    # A 100-token prefill, then 200 single-token decode steps across window and block boundaries.
    got = run_incrementally(model, tokens, [100] + [1] * 200)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_chunked_prefill_equals_full_forward(model: GptOss) -> None:
    tokens = prompt(400, seed=12)
    got = run_incrementally(model, tokens, [37, 128, 1, 90, 144])
    torch.testing.assert_close(got, full_logits(model, tokens), atol=2e-5, rtol=2e-5)


def test_batch_of_different_lengths_equals_each_alone(model: GptOss) -> None:
    """One step mixing two prefills and two decodes gives each sequence its solo logits."""
    lengths = [5, 130, 260, 1]
    alloc = Allocator(256, seed=3)
    cache = new_cache(model, 256)
    sequences = [prompt(n, seed=100 + n) for n in lengths]
    # Warm two of them up to a decode step: all but their last token are already cached.
    warm = {1: 129, 2: 259}
    chunks, expected = [], []
    for i, tokens in enumerate(sequences):
        n_blocks = -(-len(tokens) // BLOCK)
        tables = {FULL: alloc.blocks(n_blocks), SLIDING: alloc.blocks(n_blocks)}
        if i in warm:
            prefill = build_forward_batch([SequenceChunk(tokens[: warm[i]], 0, tables)], BLOCK)
            model.forward(prefill, cache)
            chunks.append(SequenceChunk(tokens[warm[i] :], warm[i], tables))
        else:
            chunks.append(SequenceChunk(tokens, 0, tables))
        expected.append(full_logits(model, tokens)[-1])
    batch = build_forward_batch(chunks, BLOCK)
    got = model.compute_logits(model.forward(batch, cache)[batch.logits_indices])
    torch.testing.assert_close(got, torch.stack(expected), atol=2e-5, rtol=2e-5)


def test_sliding_layers_never_read_blocks_that_left_the_window(model: GptOss) -> None:
    """Sliding layers keep at most window + one block: earlier table entries may point anywhere."""
    tokens = prompt(400, seed=21)
    expected = full_logits(model, tokens)
    cache = new_cache(model, 64)
    n_blocks = -(-len(tokens) // BLOCK)
    full_table = list(range(1, n_blocks + 1))
    window_blocks = model.config.sliding_window // BLOCK + 1
    ring = list(range(40, 40 + window_blocks + 1))  # the few blocks the sliding layers may hold
    cache.k[0][0].fill_(float("nan"))  # block 0: what a freed entry would read
    cache.v[0][0].fill_(float("nan"))
    got = []
    for pos, token in enumerate(tokens):
        # Reuse ring blocks as the window moves: a logical block's entry is recycled once
        # it is more than window + one block behind; entries before that point at block 0.
        sliding_table = [0] * (pos // BLOCK + 1)
        for logical in range(max(0, pos // BLOCK - window_blocks + 1), pos // BLOCK + 1):
            sliding_table[logical] = ring[logical % len(ring)]
        chunk = SequenceChunk([token], pos, {FULL: full_table, SLIDING: sliding_table})
        got.append(model.compute_logits(model.forward(build_forward_batch([chunk], BLOCK), cache)))
    torch.testing.assert_close(torch.cat(got), expected, atol=2e-5, rtol=2e-5)
