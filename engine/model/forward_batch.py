"""What one forward step computes: a flattened batch of token chunks and where their KV lives.

Every step mixes sequences freely: a prefill chunk of any length and single-token decodes sit side
by side in one flat `[T]` token array. Per sequence the batch records how many of its tokens this
step computes and its context length afterwards; per cache group (full-attention layers and
sliding-window layers keep separate block pools) a block table maps logical block `p // block_size`
of the sequence to a physical block, and a slot mapping says where each new token's K and V go.

Sliding-window layers only ever read the last `window` positions, so a block manager may give back
their blocks that left the window: table entries for them are never read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.config import FULL, SLIDING


@dataclass(frozen=True, slots=True)
class SequenceChunk:
    """One sequence's share of a step: the tokens to compute and where its KV blocks are."""

    token_ids: Sequence[int]
    # Tokens of this sequence already in the cache (the position of token_ids[0]).
    num_computed: int
    # Per cache group: physical block of each logical block (entries outside a sliding window may
    # be stale; they are never read).
    block_tables: dict[str, Sequence[int]]


@dataclass(frozen=True, slots=True)
class CacheGroupBatch:
    block_tables: torch.Tensor  # int64 [B, max_blocks]
    slot_mapping: torch.Tensor  # int64 [T]: block * block_size + offset of each new token


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    query_lens: tuple[int, ...]  # tokens computed per sequence this step
    seq_lens: tuple[int, ...]  # context length per sequence after this step
    groups: dict[str, CacheGroupBatch]
    # Rows of the flat batch whose logits are wanted: the last token of each sequence.
    logits_indices: torch.Tensor  # int64 [B]
    block_size: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


def build_forward_batch(
    chunks: Sequence[SequenceChunk], block_size: int, device: torch.device | str = "cpu"
) -> ForwardBatch:
    """Flatten chunks into tensors (built on the host, moved once)."""
    if not chunks:
        raise ValueError("a forward batch needs at least one sequence chunk")
    input_ids: list[int] = []
    positions: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    slots: dict[str, list[int]] = {FULL: [], SLIDING: []}
    for chunk in chunks:
        n = len(chunk.token_ids)
        if n == 0:
            raise ValueError("a sequence chunk must compute at least one token")
        start, end = chunk.num_computed, chunk.num_computed + n
        input_ids.extend(chunk.token_ids)
        positions.extend(range(start, end))
        query_lens.append(n)
        seq_lens.append(end)
        for group, out in slots.items():
            table = chunk.block_tables.get(group)
            if table is None:
                continue
            needed = (end + block_size - 1) // block_size
            if len(table) < needed:
                raise ValueError(
                    f"{group} block table has {len(table)} blocks, {needed} needed for {end} tokens"
                )
            out.extend(
                table[p // block_size] * block_size + p % block_size for p in range(start, end)
            )
    groups = {}
    for group, group_slots in slots.items():
        if not group_slots:
            continue
        width = max(len(c.block_tables[group]) for c in chunks)
        table = torch.zeros((len(chunks), width), dtype=torch.int64)
        for i, chunk in enumerate(chunks):
            row = chunk.block_tables[group]
            table[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.int64)
        groups[group] = CacheGroupBatch(
            block_tables=table.to(device),
            slot_mapping=torch.tensor(group_slots, dtype=torch.int64, device=device),
        )
    ends = torch.tensor(query_lens, dtype=torch.int64).cumsum(0) - 1
    return ForwardBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        query_lens=tuple(query_lens),
        seq_lens=tuple(seq_lens),
        groups=groups,
        logits_indices=ends.to(device),
        block_size=block_size,
    )


class PagedKVCache:
    """The KV cache tensors: per layer `[num_blocks, block_size, n_kv_heads, head_dim]` for K and V.

    Layers of one type share a block pool: a physical block id means the same slot range in every
    full-attention layer (or every sliding-window layer), so one block table serves the group.
    """

    def __init__(
        self,
        layer_types: Sequence[str],
        num_blocks: dict[str, int],
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.block_size = block_size
        self.num_blocks = dict(num_blocks)
        self.layer_types = tuple(layer_types)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for layer_type in self.layer_types:
            shape = (num_blocks[layer_type], block_size, num_kv_heads, head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
