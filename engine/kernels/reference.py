"""Plain-PyTorch kernels: the specification of every hot op and the oracle for faster backends.

Each function is the straightforward statement of what gpt-oss computes; speed comes from the CPU and
GPU backends that must match these. MXFP4 experts are decoded one selected expert at a time, so no
dense copy of all experts ever exists.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.kernels.mxfp4 import dequantize_mxfp4
from engine.model.forward_batch import CacheGroupBatch
from engine.model.weights import Mxfp4Experts


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, computed in float32, returned in x's dtype."""
    t = x.float()
    t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
    return (t * weight).to(x.dtype)


def yarn_inv_freq(
    head_dim: int,
    theta: float,
    factor: float,
    initial_context_length: int,
    ntk_alpha: float,
    ntk_beta: float,
) -> tuple[torch.Tensor, float]:
    """YaRN ("NTK by parts") inverse frequencies and the attention concentration factor."""
    freq = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if factor <= 1.0:
        return 1.0 / freq, 1.0
    concentration = 0.1 * math.log(factor) + 1.0
    d_half = head_dim / 2
    # Dimensions rotating fewer than ntk_alpha times over the original context are interpolated,
    # more than ntk_beta times extrapolated; a linear ramp blends those in between.
    low = d_half * math.log(initial_context_length / (ntk_beta * 2 * math.pi)) / math.log(theta)
    high = d_half * math.log(initial_context_length / (ntk_alpha * 2 * math.pi)) / math.log(theta)
    interpolation = 1.0 / (factor * freq)
    extrapolation = 1.0 / freq
    ramp = (torch.arange(d_half, dtype=torch.float32) - low) / (high - low)
    keep = 1 - ramp.clamp(0, 1)
    return interpolation * (1 - keep) + extrapolation * keep, concentration


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, concentration: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim // 2] in float32, scaled by YaRN's concentration."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return freqs.cos() * concentration, freqs.sin() * concentration


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, head_dim] by position: first and second halves form the pairs."""
    cos = cos[:, None, :].to(x.dtype)
    sin = sin[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sinks: torch.Tensor,
    group: CacheGroupBatch,
    query_lens: tuple[int, ...],
    seq_lens: tuple[int, ...],
    window: int | None,
    sm_scale: float,
) -> torch.Tensor:
    """Causal GQA attention with learned sinks over a paged KV cache.

    q [T, Hq, d], k and v [T, Hkv, d] are this step's tokens; their K/V are written to the cache
    first, then each sequence's queries read their context through its block table. A sliding
    layer (`window`) lets a query at position p see keys p - window + 1 .. p only. The sink is one
    extra logit per head that joins the softmax and is then dropped, so heads can attend "nowhere".
    Returns [T, Hq * d] in q's dtype; scores and softmax in float32.
    """
    n_tokens, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    block_size = k_cache.shape[1]
    k_cache.view(-1, n_kv, head_dim)[group.slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, n_kv, head_dim)[group.slot_mapping] = v.to(v_cache.dtype)
    flat_k = k_cache.view(-1, n_kv, head_dim)
    flat_v = v_cache.view(-1, n_kv, head_dim)
    out = torch.empty((n_tokens, n_heads, head_dim), dtype=q.dtype, device=q.device)
    sink_logits = sinks.float().view(n_kv, n_heads // n_kv, 1, 1)
    start = 0
    for i, (n_q, seq_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        first_query = seq_len - n_q
        lowest_key = 0 if window is None else max(0, first_query - window + 1)
        key_pos = torch.arange(lowest_key, seq_len, device=q.device)
        slots = group.block_tables[i, key_pos // block_size] * block_size + key_pos % block_size
        keys = flat_k[slots].to(q.dtype)  # [K, Hkv, d]
        values = flat_v[slots].to(q.dtype)
        queries = q[start : start + n_q].view(n_q, n_kv, n_heads // n_kv, head_dim)
        scores = torch.einsum("qhmd,khd->hmqk", queries, keys).float() * sm_scale
        query_pos = torch.arange(first_query, seq_len, device=q.device)
        visible = key_pos[None, :] <= query_pos[:, None]
        if window is not None:
            visible &= query_pos[:, None] - key_pos[None, :] < window
        scores = scores.masked_fill(~visible, float("-inf"))
        sinks_col = sink_logits.expand(-1, -1, n_q, 1)
        probs = torch.softmax(torch.cat((scores, sinks_col), dim=-1), dim=-1)[..., :-1]
        mixed = torch.einsum("hmqk,khd->qhmd", probs.to(values.dtype), values)
        out[start : start + n_q] = mixed.reshape(n_q, n_heads, head_dim)
        start += n_q
    return out.view(n_tokens, n_heads * head_dim)


def route(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router: top-k experts per token, softmax over the selected logits only."""
    logits = F.linear(x, weight, bias)  # [T, E]
    top_logits, experts = torch.topk(logits, top_k, dim=-1, sorted=True)
    return torch.softmax(top_logits.float(), dim=-1), experts


def swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's SwiGLU: gate and linear halves interleaved, both clamped, +1 on the linear half."""
    gate, linear = h[..., 0::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    linear = linear.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


def moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor,
    mlp1: Mxfp4Experts,
    mlp2: Mxfp4Experts,
    top_k: int,
    swiglu_alpha: float,
    swiglu_limit: float,
) -> torch.Tensor:
    """Mixture of experts over [T, H]: each token's output is the routing-weighted sum of its experts.

    Only the experts some token selected are decoded from MXFP4, one at a time.
    """
    weights, experts = route(x, router_weight, router_bias, top_k)  # [T, k]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in experts.unique().tolist():
        tokens, slot = torch.where(experts == expert)
        w1 = dequantize_mxfp4(mlp1.blocks[expert], mlp1.scales[expert], x.dtype)  # [2I, H]
        h = F.linear(x[tokens], w1, mlp1.bias[expert])
        h = swiglu(h, swiglu_alpha, swiglu_limit)
        w2 = dequantize_mxfp4(mlp2.blocks[expert], mlp2.scales[expert], x.dtype)  # [H, I]
        y = F.linear(h, w2, mlp2.bias[expert])
        out.index_add_(0, tokens, y.float() * weights[tokens, slot, None])
    return out.to(x.dtype)
