"""A differentiable gpt-oss forward for training on the CPU, and the checkpoint writer.

The same architecture `engine.model.gpt_oss` serves (and the same ops: `rms_norm`, YaRN `rope`,
`route`, `swiglu` come from `engine.kernels.reference`), written for training instead of serving:
a batch of packed rows [B, T] and dense causal attention (learned sinks, a sliding window on even
layers) with a document mask, so several short conversations share one row without seeing each
other. Experts are dense float tensors here; `fake_quantize` rounds them through MXFP4 with a
straight-through gradient for quantization-aware training, and `write_original_checkpoint` stores
them as MXFP4 in the original gpt-oss layout that `engine.model.weights` loads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from engine.config import ModelConfig
from engine.kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from engine.kernels.reference import (
    apply_rope,
    rms_norm,
    rope_cos_sin,
    route,
    swiglu,
    yarn_inv_freq,
)


def fake_quantize(weight: torch.Tensor) -> torch.Tensor:
    """`weight` rounded to MXFP4 in the forward pass, the identity in the backward pass."""
    with torch.no_grad():
        rounded = dequantize_mxfp4(*quantize_mxfp4(weight), dtype=weight.dtype)
    return weight + (rounded - weight).detach()


class Layer(nn.Module):
    """One block's weights, shaped as `engine.model.weights` holds them."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        h, e, i, d = c.hidden_size, c.num_experts, c.intermediate_size, c.head_dim
        q_dim, kv_dim = c.num_attention_heads * d, c.num_key_value_heads * d
        self.attn_norm = nn.Parameter(torch.ones(h))
        self.q = nn.Linear(h, q_dim)
        self.k = nn.Linear(h, kv_dim)
        self.v = nn.Linear(h, kv_dim)
        self.sinks = nn.Parameter(torch.zeros(c.num_attention_heads))
        self.o = nn.Linear(q_dim, h)
        self.mlp_norm = nn.Parameter(torch.ones(h))
        self.router = nn.Linear(h, e)
        self.mlp1_weight = nn.Parameter(torch.empty(e, 2 * i, h))  # gate/linear interleaved rows
        self.mlp1_bias = nn.Parameter(torch.zeros(e, 2 * i))
        self.mlp2_weight = nn.Parameter(torch.empty(e, h, i))
        self.mlp2_bias = nn.Parameter(torch.zeros(e, h))


class TrainingGptOss(nn.Module):
    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        c = self.config = config
        self.embedding = nn.Parameter(torch.empty(c.vocab_size, c.hidden_size))
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_layers))
        self.norm = nn.Parameter(torch.ones(c.hidden_size))
        self.unembedding = nn.Parameter(torch.empty(c.vocab_size, c.hidden_size))
        inv_freq, self.concentration = yarn_inv_freq(
            c.head_dim, c.rope_theta, c.rope_scaling_factor, c.initial_context_length,
            c.rope_ntk_alpha, c.rope_ntk_beta,
        )  # fmt: skip
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.quantize_experts = False
        self._init(seed)

    def _init(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        # GPT-2 style: N(0, 0.02), residual output projections scaled down by depth.
        out_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for name, p in sorted(self.named_parameters()):
            if name.endswith(("norm", "sinks")):
                continue
            if p.dim() == 1 or name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o.weight", "mlp2_weight")):
                p.data.normal_(0, out_std, generator=g)
            else:
                p.data.normal_(0, 0.02, generator=g)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor
    ) -> torch.Tensor:
        """Final hidden states [B, T, H] (after the norm) of packed rows.

        positions restart at 0 for each conversation; doc_ids tell conversations apart (a token
        attends only to earlier tokens of its own conversation).
        """
        c = self.config
        b, t = input_ids.shape
        x = self.embedding[input_ids]  # [B, T, H]
        cos, sin = rope_cos_sin(positions.reshape(-1), self.inv_freq, self.concentration)
        causal = positions[:, :, None] >= positions[:, None, :]  # [B, Tq, Tk]
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
        full_mask = causal & same_doc
        near = positions[:, :, None] - positions[:, None, :] < c.sliding_window
        # Added to the scores (0 or -inf), built once for all layers: one add per layer where a
        # masked_fill would copy the scores.
        masks = {
            sliding: torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[:, None, None]
            for sliding, allowed in ((False, full_mask), (True, full_mask & near))
        }
        for i, layer in enumerate(self.layers):
            x = x + self._attention(layer, x, cos, sin, masks[c.is_sliding(i)])
            x = x + self._moe(layer, x.view(b * t, -1)).view(b, t, -1)
        return rms_norm(x, self.norm, c.rms_norm_eps)

    def _attention(
        self, w: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        c = self.config
        b, t, _ = x.shape
        n_kv, group, d = c.num_key_value_heads, c.q_per_kv, c.head_dim
        h = rms_norm(x, w.attn_norm, c.rms_norm_eps)
        q = apply_rope(w.q(h).view(b * t, -1, d), cos, sin).view(b, t, n_kv, group, d)
        k = apply_rope(w.k(h).view(b * t, -1, d), cos, sin).view(b, t, n_kv, d)
        v = w.v(h).view(b, t, n_kv, d)
        # Scaling q rather than the scores: fewer elements, and the same result (1/8 is exact).
        q = q * (1 / math.sqrt(d))
        scores = torch.einsum("bqhmd,bkhd->bhmqk", q, k) + bias  # [B, Hkv, G, Tq, Tk]
        # The sink: one extra logit per head in the softmax, then dropped (attend "nowhere").
        sink = w.sinks.view(1, n_kv, group, 1, 1).expand(b, -1, -1, t, 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
        out = torch.einsum("bhmqk,bkhd->bqhmd", probs, v).reshape(b, t, -1)
        return w.o(out)

    def _moe(self, w: Layer, x: torch.Tensor) -> torch.Tensor:
        """Each (token, expert) pair sorted by expert, so each expert multiplies one contiguous
        slice, and the elementwise work (SwiGLU, routing weights) runs once over all pairs."""
        c = self.config
        h = rms_norm(x, w.mlp_norm, c.rms_norm_eps)
        weights, experts = route(h, w.router.weight, w.router.bias, c.experts_per_token)  # [N, k]
        mlp1, mlp2 = w.mlp1_weight, w.mlp2_weight
        if self.quantize_experts:
            mlp1, mlp2 = fake_quantize(mlp1), fake_quantize(mlp2)
        # unbind, not mlp1[e]: indexing a parameter once per expert makes a gradient the size of
        # all experts per expert in the backward pass; unbind's backward stacks once.
        mlp1, mlp2 = mlp1.unbind(0), mlp2.unbind(0)
        bias1, bias2 = w.mlp1_bias.unbind(0), w.mlp2_bias.unbind(0)
        flat = experts.reshape(-1)  # [N * k], token n's slots at n * k ...
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=c.num_experts).tolist()
        used = [e for e, n in enumerate(counts) if n]
        token = order // c.experts_per_token
        rows = h[token].split([counts[e] for e in used])
        up = torch.cat([F.linear(r, mlp1[e], bias1[e]) for r, e in zip(rows, used, strict=True)])
        act = swiglu(up, c.swiglu_alpha, c.swiglu_limit).split([counts[e] for e in used])
        down = torch.cat([F.linear(a, mlp2[e], bias2[e]) for a, e in zip(act, used, strict=True)])
        down = down * weights.reshape(-1)[order, None]
        return torch.zeros_like(h).index_add(0, token, down)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.unembedding)


# --- the checkpoint --------------------------------------------------------------------------


def original_state_dict(
    model: TrainingGptOss, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Tensors named and shaped as the original gpt-oss checkpoints; experts as MXFP4."""

    def dense(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype).contiguous()

    out = {
        "embedding.weight": dense(model.embedding),
        "norm.scale": dense(model.norm),
        "unembedding.weight": dense(model.unembedding),
    }
    for i, w in enumerate(model.layers):
        p = f"block.{i}."
        out[p + "attn.norm.scale"] = dense(w.attn_norm)
        # The original layout fuses q, k and v row-wise in that order.
        out[p + "attn.qkv.weight"] = dense(torch.cat((w.q.weight, w.k.weight, w.v.weight)))
        out[p + "attn.qkv.bias"] = dense(torch.cat((w.q.bias, w.k.bias, w.v.bias)))
        out[p + "attn.sinks"] = dense(w.sinks)
        out[p + "attn.out.weight"] = dense(w.o.weight)
        out[p + "attn.out.bias"] = dense(w.o.bias)
        out[p + "mlp.norm.scale"] = dense(w.mlp_norm)
        out[p + "mlp.gate.weight"] = dense(w.router.weight)
        out[p + "mlp.gate.bias"] = dense(w.router.bias)
        for name, weight, bias in (("mlp1", w.mlp1_weight, w.mlp1_bias),
                                   ("mlp2", w.mlp2_weight, w.mlp2_bias)):  # fmt: skip
            blocks, scales = quantize_mxfp4(weight.detach())
            out[p + f"mlp.{name}_weight.blocks"] = blocks
            out[p + f"mlp.{name}_weight.scales"] = scales
            out[p + f"mlp.{name}_bias"] = dense(bias)
    return out


def write_original_checkpoint(
    model: TrainingGptOss, directory: Path, dtype: torch.dtype = torch.bfloat16
) -> None:
    """`config.json` + `model.safetensors` in the original layout (as in gpt-oss's `original/`)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_original_dict()
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(original_state_dict(model, dtype), directory / "model.safetensors")
