"""Plain-PyTorch kernels: the specification of every hot op and the oracle for faster backends.

Each function is the straightforward statement of what gpt-oss computes; speed comes from the CPU and
GPU backends that must match these. MXFP4 experts are decoded one selected expert at a time, so no
dense copy of all experts ever exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from engine.kernels.mxfp4 import dequantize_mxfp4
from engine.model.forward_batch import CacheGroupBatch
from engine.model.weights import Mxfp4Experts


def linear_many(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
) -> tuple[torch.Tensor, ...]:
    """F.linear of one input with several weights (q, k and v): backends may do them in one pass."""
    return tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))


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
    Returns [T, Hq * d] in q's dtype; scores and softmax in float32. Single-token (decode)
    sequences are computed together; longer chunks one sequence at a time.
    """
    n_tokens, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    k_cache.view(-1, n_kv, head_dim)[group.slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, n_kv, head_dim)[group.slot_mapping] = v.to(v_cache.dtype)
    out = torch.empty((n_tokens, n_heads, head_dim), dtype=q.dtype, device=q.device)
    starts = [0]
    for n_q in query_lens:
        starts.append(starts[-1] + n_q)
    decodes = [i for i, n_q in enumerate(query_lens) if n_q == 1]
    if decodes:
        rows = [starts[i] for i in decodes]
        lens = [seq_lens[i] for i in decodes]
        out[rows] = attend(
            q[rows], k_cache, v_cache, sinks, group.block_tables[decodes], lens, 1, window, sm_scale
        )
    for i, n_q in enumerate(query_lens):
        if n_q > 1:
            table = group.block_tables[i : i + 1]
            rows = slice(starts[i], starts[i] + n_q)
            out[rows] = attend(
                q[rows], k_cache, v_cache, sinks, table, [seq_lens[i]], n_q, window, sm_scale
            )
    return out.view(n_tokens, n_heads * head_dim)


def attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sinks: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    n_q: int,
    window: int | None,
    sm_scale: float,
) -> torch.Tensor:
    """B sequences with n_q queries each (their last n_q positions): q [B * n_q, Hq, d] -> same.

    Each sequence's visible keys are gathered through its block table into a padded [B, K] window;
    padding reads a real slot and is masked out.
    """
    n_seqs = len(seq_lens)
    _, block_size, n_kv, head_dim = k_cache.shape
    n_heads = q.shape[1]
    device = q.device
    lowest_keys = [0 if window is None else max(0, s - n_q - window + 1) for s in seq_lens]
    n_keys = max(s - lo for s, lo in zip(seq_lens, lowest_keys, strict=True))
    seq_len = torch.tensor(seq_lens, device=device)[:, None]  # [B, 1]
    lowest = torch.tensor(lowest_keys, device=device)[:, None]
    first_query = seq_len - n_q
    key_pos = lowest + torch.arange(n_keys, device=device)[None, :]  # [B, K]
    in_range = key_pos < seq_len
    key_pos = torch.where(in_range, key_pos, lowest)
    slots = block_tables.gather(1, key_pos // block_size) * block_size + key_pos % block_size
    keys = k_cache.view(-1, n_kv, head_dim)[slots].to(q.dtype)  # [B, K, Hkv, d]
    values = v_cache.view(-1, n_kv, head_dim)[slots].to(q.dtype)
    queries = q.view(n_seqs, n_q, n_kv, n_heads // n_kv, head_dim)
    scores = torch.einsum("bqhmd,bkhd->bhmqk", queries, keys).float() * sm_scale
    query_pos = first_query + torch.arange(n_q, device=device)[None, :]  # [B, Q]
    visible = in_range[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])  # [B, Q, K]
    if window is not None:
        visible &= query_pos[:, :, None] - key_pos[:, None, :] < window
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    sink_col = sinks.float().view(1, n_kv, n_heads // n_kv, 1, 1).expand(n_seqs, -1, -1, n_q, 1)
    probs = torch.softmax(torch.cat((scores, sink_col), dim=-1), dim=-1)[..., :-1]
    mixed = torch.einsum("bhmqk,bkhd->bqhmd", probs.to(values.dtype), values)
    return mixed.reshape(n_seqs * n_q, n_heads, head_dim)


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
