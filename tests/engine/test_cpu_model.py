"""End to end on tiny random models: the fused CPU kernels produce the reference kernels' tokens.

Both backends run the same weights through the whole engine (scheduler, chunked prefill, mixed
batches of prefills and decodes, the paged cache, greedy sampling); in fp32 every instruction-set
path must produce exactly the reference's greedy tokens, and its logits to fp32 rounding. In bf16
(the path gpt-oss-20b takes) the logits agree to bf16 rounding, and so do the tokens here. Skipped where the extension
cannot be built.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.engine import EngineConfig, LLMEngine
from engine.kernels import REFERENCE, Kernels, cpu, cpu_kernels
from engine.model.forward_batch import SequenceChunk, build_forward_batch
from engine.model.gpt_oss import GptOss
from engine.model.weights import load_weights
from engine.sampler import SamplingParams

if not cpu.load():
    pytest.skip(
        "the fused CPU kernels could not be built here (no C++ compiler or ninja?)",
        allow_module_level=True,
    )

ISAS = cpu.supported_isas()
BLOCK = 16


def model_with(checkpoint: Path, kernels: Kernels, dtype: torch.dtype) -> GptOss:
    config, weights = load_weights(checkpoint, dtype=dtype)
    return GptOss(config, weights, kernels, dtype)


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    # One token; a prompt crossing block edges; one crossing the 128-token sliding window.
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 37, 150)]


def greedy_tokens(model: GptOss, max_tokens: int = 24) -> dict[str, list[int]]:
    """Every prompt at once through one engine: chunked prefill (32-token budget) beside decodes."""
    engine = LLMEngine(model, EngineConfig(max_num_batched_tokens=32, kv_cache_tokens=1024))
    for i, prompt in enumerate(prompts(model.config.vocab_size)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    tokens: dict[str, list[int]] = {}
    while engine.has_work:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def prompt_logits(model: GptOss, tokens: list[int]) -> torch.Tensor:
    n_blocks = -(-len(tokens) // BLOCK)
    cache = model.new_kv_cache({"full_attention": n_blocks + 1, "sliding_attention": n_blocks + 1})
    table = list(range(1, n_blocks + 1))
    tables = {"full_attention": table, "sliding_attention": table}
    batch = build_forward_batch([SequenceChunk(tokens, 0, tables)], BLOCK)
    return model.compute_logits(model.forward(batch, cache))


@pytest.mark.parametrize("isa", ISAS)
def test_fp32_greedy_tokens_equal_the_reference(tiny_checkpoint: Path, isa: str) -> None:
    reference = model_with(tiny_checkpoint, REFERENCE, torch.float32)
    fused = model_with(tiny_checkpoint, cpu_kernels(isa), torch.float32)
    expected = greedy_tokens(reference)
    assert greedy_tokens(fused) == expected
    assert all(len(t) == 24 for t in expected.values())
    tokens = prompts(reference.config.vocab_size)[2]
    torch.testing.assert_close(
        prompt_logits(fused, tokens), prompt_logits(reference, tokens), rtol=1e-5, atol=1e-5
    )


def test_bf16_logits_agree_to_bf16_rounding(tiny_checkpoint: Path) -> None:
    """bf16 through the best path: logits as close to the fp32 model's as the bf16 reference's."""
    exact = prompt_logits(model_with(tiny_checkpoint, REFERENCE, torch.float32), prompts(512)[2])
    reference = model_with(tiny_checkpoint, REFERENCE, torch.bfloat16)
    fused = model_with(tiny_checkpoint, cpu_kernels(), torch.bfloat16)
    tokens = prompts(reference.config.vocab_size)[2]
    ours = (prompt_logits(fused, tokens) - exact).abs()
    theirs = (prompt_logits(reference, tokens) - exact).abs()
    assert ours.max() < 0.1 * exact.abs().max()
    assert ours.norm() <= 1.25 * theirs.norm()
    assert greedy_tokens(fused) == greedy_tokens(reference)
