"""The KV block manager: block pools with reference counts, per-request block tables, prefix caching.

Two pools, one per cache group: full-attention layers keep every block of a sequence; sliding-window
layers give a block back as soon as it falls entirely out of the window of the next query, so they
hold at most window + one block per sequence. Block 0 of each pool is a null block that table
entries for given-back blocks point at; it is never read.

Prefix caching: a full block is named by the hash of (its parent's hash, its token ids), so equal
prefixes have equal hash chains. When a block's last user lets go of it, a named block is not wiped
but parked in an LRU list: still findable by its hash, evicted only when a fresh block is needed and
no blank one is left. A new request reuses the longest prefix whose blocks are all cached (for the
sliding pool, only the blocks the window still needs), shared read-only: shared blocks are full and
never written again.

The scheduler sees three calls: `find_prefix`, `allocate -> bool` (all or nothing) and `free`.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from engine.config import FULL, SLIDING

NULL_BLOCK = 0


class BlockPool:
    """Blocks of one cache group: blank ones, ones in use (ref count > 0), and cached idle ones."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"a block pool needs at least 2 blocks (one is the null block), got {num_blocks}"
            )
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.blank: deque[int] = deque(range(1, num_blocks))
        self.idle_cached: OrderedDict[int, None] = OrderedDict()  # LRU order, oldest first
        self.by_hash: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks a request could get now: blank ones plus cached ones nobody uses."""
        return len(self.blank) + len(self.idle_cached)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    def take(self) -> int:
        if self.blank:
            block = self.blank.popleft()
        else:
            block, _ = self.idle_cached.popitem(last=False)  # evict the least recently used
            del self.by_hash[self.block_hash[block]]  # type: ignore[index]
            self.block_hash[block] = None
        self.ref_count[block] = 1
        return block

    def share(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.idle_cached[block]
        self.ref_count[block] += 1

    def release(self, block: int) -> None:
        if block == NULL_BLOCK:
            return
        assert self.ref_count[block] > 0, f"block {block} released more often than taken"
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            if self.block_hash[block] is None:
                self.blank.append(block)
            else:
                self.idle_cached[block] = None

    def name(self, block: int, block_hash: int) -> None:
        """Make a full block findable by its hash (first block with that content wins)."""
        if self.block_hash[block] is None and block_hash not in self.by_hash:
            self.block_hash[block] = block_hash
            self.by_hash[block_hash] = block

    def lookup(self, block_hash: int) -> int | None:
        return self.by_hash.get(block_hash)


@dataclass(frozen=True, slots=True)
class PrefixHit:
    num_tokens: int
    blocks: dict[str, list[int]]  # per group, the table prefix to share (null where not needed)


@dataclass(slots=True)
class _Entry:
    tables: dict[str, list[int]]
    hashes: list[int]  # hash chain of the request's full blocks computed so far


class KVCacheManager:
    def __init__(
        self,
        num_blocks: dict[str, int],
        block_size: int,
        sliding_window: int,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.enable_prefix_caching = enable_prefix_caching
        self.pools = {group: BlockPool(n) for group, n in num_blocks.items()}
        self._entries: dict[str, _Entry] = {}

    # --- queries --------------------------------------------------------------------------------
    def block_tables(self, request_id: str) -> dict[str, list[int]]:
        return self._entries[request_id].tables

    def usage(self) -> float:
        """Fraction of blocks in use by running requests (cached idle blocks count as free)."""
        return max(1 - pool.num_free / pool.num_usable for pool in self.pools.values())

    def _first_needed_block(self, first_query: int) -> int:
        """The oldest logical block a query at `first_query` (and later) can still see."""
        return max(0, first_query - self.sliding_window + 1) // self.block_size

    def block_hashes(
        self, token_ids: Sequence[int], n_blocks: int, start: Sequence[int] = ()
    ) -> list[int]:
        hashes = list(start)
        bs = self.block_size
        for i in range(len(hashes), n_blocks):
            parent = hashes[-1] if hashes else 0
            hashes.append(hash((parent, tuple(token_ids[i * bs : (i + 1) * bs]))))
        return hashes

    def find_prefix(self, token_ids: Sequence[int]) -> PrefixHit:
        """The longest cached prefix of whole blocks, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return PrefixHit(0, {group: [] for group in self.pools})
        max_blocks = (len(token_ids) - 1) // self.block_size
        hashes = self.block_hashes(token_ids, max_blocks)
        full = self.pools.get(FULL)
        n = 0
        while n < max_blocks and (full is None or full.lookup(hashes[n]) is not None):
            n += 1
        sliding = self.pools.get(SLIDING)
        while n > 0 and sliding is not None:
            first = self._first_needed_block(n * self.block_size)
            if all(sliding.lookup(h) is not None for h in hashes[first:n]):
                break
            n -= 1
        blocks: dict[str, list[int]] = {}
        for group, pool in self.pools.items():
            first = self._first_needed_block(n * self.block_size) if group == SLIDING else 0
            blocks[group] = [NULL_BLOCK] * first + [pool.lookup(h) for h in hashes[first:n]]  # type: ignore[misc]
        return PrefixHit(n * self.block_size, blocks)

    # --- changes --------------------------------------------------------------------------------
    def allocate(
        self, request_id: str, num_computed: int, num_new: int, prefix: PrefixHit | None = None
    ) -> bool:
        """Blocks for tokens num_computed .. num_computed + num_new - 1, all or nothing.

        A new request passes the prefix it will share (`num_computed` then counts those tokens).
        """
        entry = self._entries.get(request_id)
        if entry is None:
            entry = _Entry({group: [] for group in self.pools}, [])
        total = num_computed + num_new
        n_blocks = -(-total // self.block_size)
        first_needed = self._first_needed_block(num_computed)
        plan: dict[str, tuple[list[int], int]] = {}
        for group, pool in self.pools.items():
            table = entry.tables[group]
            shared = prefix.blocks[group] if prefix is not None else []
            base = len(table) + len(shared)
            new = n_blocks - base
            if group == SLIDING:
                new -= max(0, min(first_needed, n_blocks) - base)
                # Blocks leaving the window are given back now, before asking for new ones.
                reclaimable = sum(
                    1 for b in table[:first_needed] if b != NULL_BLOCK and pool.ref_count[b] == 1
                )
            else:
                reclaimable = 0
            idle_shared = sum(1 for b in shared if b != NULL_BLOCK and pool.ref_count[b] == 0)
            if pool.num_free + reclaimable - idle_shared < max(new, 0):
                return False
            plan[group] = (shared, max(new, 0))
        for group, pool in self.pools.items():
            table = entry.tables[group]
            shared, new = plan[group]
            for block in shared:
                if block != NULL_BLOCK:
                    pool.share(block)
            table.extend(shared)
            if group == SLIDING:
                for i in range(min(first_needed, len(table))):
                    pool.release(table[i])
                    table[i] = NULL_BLOCK
                table.extend([NULL_BLOCK] * max(0, min(first_needed, n_blocks) - len(table)))
            table.extend(pool.take() for _ in range(new))
        self._entries[request_id] = entry
        return True

    def cache_computed_blocks(
        self, request_id: str, token_ids: Sequence[int], num_computed: int
    ) -> None:
        """Name the request's newly completed blocks so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        entry = self._entries[request_id]
        n_full = num_computed // self.block_size
        if n_full <= len(entry.hashes):
            return
        first_new = len(entry.hashes)
        entry.hashes = self.block_hashes(token_ids, n_full, entry.hashes)
        for group, pool in self.pools.items():
            table = entry.tables[group]
            for i in range(first_new, n_full):
                if table[i] != NULL_BLOCK:
                    pool.name(table[i], entry.hashes[i])

    def free(self, request_id: str) -> None:
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return
        for group, pool in self.pools.items():
            # Release the tail first, so the LRU evicts a prefix's last blocks before its first.
            for block in reversed(entry.tables[group]):
                pool.release(block)

    def check_invariants(self) -> None:
        """Every block is exactly one of: null, blank, idle-cached, or referenced by tables."""
        for group, pool in self.pools.items():
            refs = [0] * pool.num_blocks
            for entry in self._entries.values():
                for block in entry.tables[group]:
                    if block != NULL_BLOCK:
                        refs[block] += 1
            assert refs == [0, *pool.ref_count[1:]], (
                f"{group}: ref counts disagree with block tables"
            )
            blank, idle = set(pool.blank), set(pool.idle_cached)
            assert len(blank) == len(pool.blank) and not blank & idle, (
                f"{group}: free lists overlap"
            )
            for block in range(1, pool.num_blocks):
                in_use = pool.ref_count[block] > 0
                assert in_use + (block in blank) + (block in idle) == 1, (
                    f"{group}: block {block} lost"
                )
                if block in idle:
                    assert pool.block_hash[block] is not None, (
                        f"{group}: idle block {block} has no hash"
                    )
            for h, block in pool.by_hash.items():
                assert pool.block_hash[block] == h, f"{group}: hash index out of date"
