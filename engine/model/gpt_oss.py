"""The gpt-oss forward pass, top-down as the model card describes it.

    tokens -> embedding
           -> N x [ x += Attention(RMSNorm(x)) ; x += MoE(RMSNorm(x)) ]
           -> RMSNorm -> unembedding -> logits

Attention: 64 query heads over 8 KV heads (head dim 64), biases on q/k/v/o, YaRN RoPE, a learned
sink logit per head, a 128-token sliding window on even layers (layer 0 slides), full causal attention
on odd ones. MoE: a linear router picks the top-4 experts and softmaxes their logits; each expert is
an MXFP4 SwiGLU MLP. The embedding and unembedding are not tied.

The forward runs on a flattened batch (prefill chunks and decodes mixed) over a paged KV cache; every
hot op goes through the kernel interface, so backends swap without touching this file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import SLIDING, ModelConfig
from engine.kernels import Kernels, select_kernels
from engine.kernels.reference import yarn_inv_freq
from engine.model.forward_batch import ForwardBatch, PagedKVCache
from engine.model.weights import AttentionWeights, GptOssWeights, MoEWeights, load_weights


class GptOss:
    def __init__(
        self,
        config: ModelConfig,
        weights: GptOssWeights,
        kernels: Kernels,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self.config = config
        self.weights = weights
        self.kernels = kernels
        self.dtype = dtype
        self.device = weights.embedding.device
        self.sm_scale = 1.0 / math.sqrt(config.head_dim)
        inv_freq, self.rope_concentration = yarn_inv_freq(
            config.head_dim,
            config.rope_theta,
            config.rope_scaling_factor,
            config.initial_context_length,
            config.rope_ntk_alpha,
            config.rope_ntk_beta,
        )
        self.inv_freq = inv_freq.to(self.device)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        backend: str = "auto",
        progress: Callable[[int, int], None] | None = None,
    ) -> GptOss:
        config, weights = load_weights(path, dtype=dtype, device=device, progress=progress)
        return cls(config, weights, select_kernels(backend, device), dtype)

    def new_kv_cache(self, num_blocks: dict[str, int], block_size: int = 16) -> PagedKVCache:
        c = self.config
        return PagedKVCache(
            c.layer_types, num_blocks, block_size, c.num_key_value_heads, c.head_dim, self.dtype,
            self.device,
        )  # fmt: skip

    # --- the model -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        """Hidden states [T, H] after the final norm, for every token of the batch."""
        k = self.kernels
        x = self.weights.embedding[batch.input_ids].to(self.dtype)  # [T, H]
        cos, sin = k.rope_cos_sin(batch.positions, self.inv_freq, self.rope_concentration)
        for i, layer in enumerate(self.weights.layers):
            x = x + self._attention(i, layer.attn, x, cos, sin, batch, cache)
            x = x + self._moe(layer.moe, x)
        return k.rms_norm(x, self.weights.norm, self.config.rms_norm_eps)

    def _attention(
        self,
        layer: int,
        w: AttentionWeights,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        cache: PagedKVCache,
    ) -> torch.Tensor:
        c, k = self.config, self.kernels
        t = k.rms_norm(x, w.norm, c.rms_norm_eps)
        q, key, value = k.linear_many(
            t, (w.q_weight, w.k_weight, w.v_weight), (w.q_bias, w.k_bias, w.v_bias)
        )
        q = q.view(-1, c.num_attention_heads, c.head_dim)
        key = key.view(-1, c.num_key_value_heads, c.head_dim)
        value = value.view(-1, c.num_key_value_heads, c.head_dim)
        q, key = k.apply_rope(q, cos, sin), k.apply_rope(key, cos, sin)
        layer_type = c.layer_types[layer]
        window = c.sliding_window if layer_type == SLIDING else None
        cache_k, cache_v = cache.k[layer], cache.v[layer]
        groups, qlens, slens = batch.groups[layer_type], batch.query_lens, batch.seq_lens
        # [T, Hq * d]
        attended = k.paged_attention(
            q, key, value, cache_k, cache_v, w.sinks, groups, qlens, slens, window, self.sm_scale
        )
        return k.linear(attended, w.o_weight, w.o_bias)

    def _moe(self, w: MoEWeights, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        t = self.kernels.rms_norm(x, w.norm, c.rms_norm_eps)
        return self.kernels.moe(
            t, w.router_weight, w.router_bias, w.mlp1, w.mlp2, c.experts_per_token,
            c.swiglu_alpha, c.swiglu_limit,
        )  # fmt: skip

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] in float32 for the given final hidden states [N, H]."""
        return self.kernels.linear(hidden, self.weights.unembedding).float()
