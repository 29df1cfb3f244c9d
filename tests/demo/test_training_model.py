"""The training forward is the served model: same weights, same hidden states as `engine`.

A small random `TrainingGptOss` (experts rounded to MXFP4 first, so nothing is lost in the
checkpoint) is written in the original layout with `write_original_checkpoint`, loaded by the
project's loader, and run by `engine.model.gpt_oss` over the paged KV cache; its hidden states
equal the training forward's on a prompt that crosses the sliding window. Two conversations packed
in one row (document mask, positions restarting) give what each gives alone, and the
straight-through MXFP4 rounding passes gradients unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from demo.training_model import TrainingGptOss, fake_quantize, write_original_checkpoint
from engine.config import FULL, SLIDING, preset
from engine.kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from engine.kernels.reference import rms_norm, route, swiglu
from engine.model.forward_batch import SequenceChunk, build_forward_batch
from engine.model.gpt_oss import GptOss
from engine.model.weights import detect_layout

BLOCK = 16
CONFIG = dataclasses.replace(preset("tiny"), sliding_window=8)


@pytest.fixture(scope="module")
def trained() -> TrainingGptOss:
    torch.manual_seed(0)
    model = TrainingGptOss(CONFIG, seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Larger than the init's 0.02 so every part (sinks, biases, norms) matters.
            p.add_(torch.randn_like(p) * (0.5 if "sinks" in name or "norm" in name else 0.1))
        for layer in model.layers:
            for w in (layer.mlp1_weight, layer.mlp2_weight):
                w.copy_(dequantize_mxfp4(*quantize_mxfp4(w), dtype=torch.float32))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(trained: TrainingGptOss, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("demo-differential")
    write_original_checkpoint(trained, directory, dtype=torch.float32)
    return directory


def engine_hidden(model: GptOss, tokens: list[int]) -> torch.Tensor:
    n_blocks = -(-len(tokens) // BLOCK)
    cache = model.new_kv_cache({FULL: n_blocks + 1, SLIDING: n_blocks + 1}, BLOCK)
    table = list(range(1, n_blocks + 1))[::-1]  # not the identity
    batch = build_forward_batch([SequenceChunk(tokens, 0, {FULL: table, SLIDING: table})], BLOCK)
    return model.forward(batch, cache)


def training_hidden(model: TrainingGptOss, tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor([tokens])
    with torch.no_grad():
        return model(ids, torch.arange(len(tokens))[None], torch.zeros_like(ids))[0]


def test_checkpoint_is_the_original_layout(checkpoint: Path) -> None:
    assert detect_layout(checkpoint) == "original"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json", "model.safetensors"]


def test_training_forward_equals_engine_forward(trained: TrainingGptOss, checkpoint: Path) -> None:
    served = GptOss.from_checkpoint(checkpoint, dtype=torch.float32)
    tokens = torch.randint(0, CONFIG.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    ours = training_hidden(trained, tokens.tolist())
    theirs = engine_hidden(served, tokens.tolist())
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    logits = served.compute_logits(theirs)
    torch.testing.assert_close(trained.logits(ours), logits, rtol=1e-4, atol=1e-4)


def test_packed_conversations_do_not_see_each_other(trained: TrainingGptOss) -> None:
    a = torch.randint(0, CONFIG.vocab_size, (13,), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, CONFIG.vocab_size, (21,), generator=torch.Generator().manual_seed(3))
    ids = torch.cat((a, b))[None]
    positions = torch.cat((torch.arange(13), torch.arange(21)))[None]
    docs = torch.tensor([[0] * 13 + [1] * 21])
    with torch.no_grad():
        packed = trained(ids, positions, docs)[0]
    torch.testing.assert_close(packed[:13], training_hidden(trained, a.tolist()))
    torch.testing.assert_close(packed[13:], training_hidden(trained, b.tolist()))


def test_fake_quantize_rounds_forward_and_passes_gradients() -> None:
    w = torch.randn(4, 64, requires_grad=True)
    q = fake_quantize(w)
    torch.testing.assert_close(q, dequantize_mxfp4(*quantize_mxfp4(w.detach()), torch.float32))
    (q * torch.arange(64.0)).sum().backward()
    torch.testing.assert_close(w.grad, torch.arange(64.0).expand(4, -1))


def test_moe_gradients_equal_a_token_by_token_oracle(trained: TrainingGptOss) -> None:
    """The sorted dispatch (one slice per expert) gives the outputs and gradients of the plain
    definition: each token's routing-weighted sum over its own top-k experts."""
    c, layer = CONFIG, trained.layers[0]
    x = torch.randn(37, c.hidden_size, generator=torch.Generator().manual_seed(4))
    cotangent = torch.randn_like(x)

    def grads(moe) -> list[torch.Tensor]:
        for p in layer.parameters():
            p.grad = None
        (moe(x) * cotangent).sum().backward()
        return [moe(x).detach()] + [
            p.grad.clone() for p in layer.parameters() if p.grad is not None
        ]

    def token_by_token(x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, layer.mlp_norm, c.rms_norm_eps)
        weights, experts = route(h, layer.router.weight, layer.router.bias, c.experts_per_token)
        out = []
        for n in range(h.shape[0]):
            total = torch.zeros(c.hidden_size)
            for slot in range(c.experts_per_token):
                e = int(experts[n, slot])
                up = h[n] @ layer.mlp1_weight[e].T + layer.mlp1_bias[e]
                act = swiglu(up, c.swiglu_alpha, c.swiglu_limit)
                total = total + weights[n, slot] * (
                    act @ layer.mlp2_weight[e].T + layer.mlp2_bias[e]
                )
            out.append(total)
        return torch.stack(out)

    with torch.enable_grad():
        ours = grads(lambda x: trained._moe(layer, x))
        oracle = grads(token_by_token)
    assert len(ours) == len(oracle) > 5
    for a, b in zip(ours, oracle, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
