"""The KV block manager on its own (no model): pools, sliding-window give-back, prefix hashes.

`BlockPool` hands out blank blocks first, counts references, parks named blocks in an LRU list when
their last user lets go and evicts the least recently used one only when no blank block is left.
`KVCacheManager` gives back sliding-window blocks that left the window (a long decode holds at most
window / block_size + 2 of them), allocates all or nothing (a refused allocation changes no state),
frees a request's tail first so a prefix's first blocks outlive its last ones, finds the longest
cached prefix while leaving at least one token to compute, and names a block by its whole prefix:
the same block content under a different parent hashes differently.
"""

from __future__ import annotations

import copy

import pytest

from engine.config import FULL, SLIDING
from engine.kv_cache import NULL_BLOCK, BlockPool, KVCacheManager

BLOCK = 16
WINDOW = 128


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def manager(full: int = 64, sliding: int = 64, caching: bool = True) -> KVCacheManager:
    return KVCacheManager({FULL: full, SLIDING: sliding}, BLOCK, WINDOW, caching)


def pool_state(kv: KVCacheManager) -> dict:
    """Everything a refused allocation must leave alone, as plain values."""
    return {
        group: (
            list(pool.ref_count),
            list(pool.blank),
            list(pool.idle_cached),
            dict(pool.by_hash),
            list(pool.block_hash),
        )
        for group, pool in kv.pools.items()
    }


def run_prefill(kv: KVCacheManager, request_id: str, ids: list[int]) -> None:
    """Allocate a whole prompt at once and mark it computed, as one prefill step would."""
    hit = kv.find_prefix(ids)
    assert kv.allocate(request_id, hit.num_tokens, len(ids) - hit.num_tokens, hit)
    kv.cache_computed_blocks(request_id, ids, len(ids))
    kv.check_invariants()


# --- BlockPool ---------------------------------------------------------------------------------


def test_pool_needs_a_block_besides_the_null_block() -> None:
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockPool(1)


def test_take_hands_out_blank_blocks_in_order_and_never_the_null_block() -> None:
    pool = BlockPool(5)
    assert pool.num_usable == 4 and pool.num_free == 4
    taken = [pool.take() for _ in range(4)]
    assert taken == [1, 2, 3, 4]
    assert NULL_BLOCK not in taken
    assert pool.num_free == 0
    assert [pool.ref_count[b] for b in taken] == [1, 1, 1, 1]


def test_share_and_release_count_references() -> None:
    pool = BlockPool(4)
    block = pool.take()
    pool.share(block)
    assert pool.ref_count[block] == 2
    pool.release(block)
    assert pool.ref_count[block] == 1 and block not in pool.blank
    pool.release(block)
    assert pool.ref_count[block] == 0 and block in pool.blank  # unnamed: back to blank
    assert pool.num_free == 3
    with pytest.raises(AssertionError, match="released more often"):
        pool.release(block)
    pool.release(NULL_BLOCK)  # releasing the null block (a given-back table entry) is a no-op
    assert pool.ref_count[NULL_BLOCK] == 0


def test_a_named_block_is_parked_findable_and_revived_by_share() -> None:
    pool = BlockPool(4)
    block = pool.take()
    pool.name(block, 1234)
    pool.release(block)
    assert block in pool.idle_cached and block not in pool.blank
    assert pool.num_free == 3  # idle cached blocks count as free
    assert pool.lookup(1234) == block
    pool.share(block)  # a new request reuses the cached block
    assert pool.ref_count[block] == 1 and block not in pool.idle_cached
    assert pool.num_free == 2


def test_first_block_with_a_hash_keeps_the_name() -> None:
    pool = BlockPool(4)
    a, b = pool.take(), pool.take()
    pool.name(a, 7)
    pool.name(b, 7)  # the same content computed twice: the first one stays the cached one
    pool.name(a, 8)  # a named block is never renamed
    assert pool.lookup(7) == a and pool.block_hash[b] is None and pool.lookup(8) is None
    pool.release(b)
    assert b in pool.blank


def test_eviction_takes_blank_blocks_first_then_the_least_recently_used() -> None:
    pool = BlockPool(6)  # 5 usable
    named = [pool.take() for _ in range(3)]
    spare = pool.take()
    for i, block in enumerate(named):
        pool.name(block, 100 + i)
    # Let go of the named blocks in the order 2, 0, 1: that is the LRU order, oldest first.
    for i in (2, 0, 1):
        pool.release(named[i])
    pool.release(spare)  # unnamed: blank
    # Revive block 2 and park it again: it becomes the most recently used.
    pool.share(named[2])
    pool.release(named[2])
    assert list(pool.idle_cached) == [named[0], named[1], named[2]]
    # Two blank blocks remain (the never-taken one and `spare`): they go before any cached one.
    first = [pool.take(), pool.take()]
    assert sorted(first) == sorted([5, spare])
    assert all(pool.lookup(100 + i) == named[i] for i in range(3))
    # Then eviction, least recently used first, and the evicted block loses its name.
    assert pool.take() == named[0]
    assert pool.lookup(100) is None and pool.block_hash[named[0]] is None
    assert pool.take() == named[1]
    assert pool.lookup(101) is None
    assert pool.lookup(102) == named[2]
    assert pool.take() == named[2]
    assert pool.num_free == 0 and not pool.by_hash


# --- KVCacheManager: sliding window ------------------------------------------------------------


def test_long_decode_keeps_only_the_window_in_the_sliding_group() -> None:
    kv = manager(full=64, sliding=16)
    ids = tokens(700)
    prompt = 40
    assert kv.allocate("r", 0, prompt)
    kv.cache_computed_blocks("r", ids, prompt)
    limit = WINDOW // BLOCK + 2
    for computed in range(prompt, len(ids)):
        # One decode step: the token at `computed` is computed.
        assert kv.allocate("r", computed, 1), f"decode step at {computed} refused"
        kv.cache_computed_blocks("r", ids, computed + 1)
        kv.check_invariants()
        tables = kv.block_tables("r")
        n_blocks = computed // BLOCK + 1
        assert len(tables[FULL]) == n_blocks
        assert NULL_BLOCK not in tables[FULL]
        sliding = tables[SLIDING]
        assert len(sliding) == n_blocks
        live = [b for b in sliding if b != NULL_BLOCK]
        assert len(live) <= limit, f"{len(live)} sliding blocks held at position {computed}"
        # Every block the query at `computed` can see is still there.
        first_visible = max(0, computed - WINDOW + 1) // BLOCK
        assert NULL_BLOCK not in sliding[first_visible:]
    # 700 tokens need 44 sliding blocks without give-back; the pool holds only 15.
    assert kv.pools[SLIDING].num_usable < len(ids) // BLOCK
    kv.free("r")
    kv.check_invariants()
    for pool in kv.pools.values():
        assert pool.num_free == pool.num_usable


def test_chunked_prefill_gives_back_sliding_blocks_before_the_window() -> None:
    kv = manager()
    ids = tokens(400)
    done = 0
    for chunk in (100, 100, 100, 100):
        assert kv.allocate("r", done, chunk)
        done += chunk
        kv.cache_computed_blocks("r", ids, done)
        kv.check_invariants()
    sliding = kv.block_tables("r")[SLIDING]
    # The last chunk started at 300: its first query sees from 173 on (block 10).
    first_needed = (300 - WINDOW + 1) // BLOCK
    assert sliding[:first_needed] == [NULL_BLOCK] * first_needed
    assert NULL_BLOCK not in sliding[first_needed:]


# --- KVCacheManager: all or nothing ------------------------------------------------------------


def test_a_refused_allocation_changes_nothing_for_a_new_request() -> None:
    kv = manager(full=9, sliding=64)  # 8 usable full blocks = 128 tokens
    run_prefill(kv, "a", tokens(100))  # 7 full blocks in use
    before = pool_state(kv)
    # 40 tokens need 3 blocks per group: the sliding group has them, the full group does not.
    assert not kv.allocate("b", 0, 40)
    assert pool_state(kv) == before
    with pytest.raises(KeyError):
        kv.block_tables("b")
    kv.check_invariants()
    assert kv.allocate("b", 0, 16)  # one block still fits


def test_a_refused_allocation_keeps_blocks_that_left_the_window() -> None:
    """Even the sliding blocks a successful call would give back stay put when the call fails."""
    kv = manager(full=12, sliding=64)  # 11 usable full blocks = 176 tokens
    ids = tokens(176)
    run_prefill(kv, "r", ids)  # all 11 full blocks in use; 176 > window
    tables_before = copy.deepcopy(kv.block_tables("r"))
    before = pool_state(kv)
    assert kv.pools[FULL].num_free == 0
    assert not kv.allocate("r", 176, 1)  # needs a 12th full block
    assert pool_state(kv) == before
    assert kv.block_tables("r") == tables_before
    kv.check_invariants()


def test_a_refused_allocation_with_a_prefix_changes_nothing() -> None:
    kv = manager(full=10, sliding=64)  # 9 usable full blocks
    shared = tokens(64)
    run_prefill(kv, "a", [*shared, 1000])
    kv.free("a")  # 4 named blocks idle, 5 blank
    hit = kv.find_prefix([*shared, *tokens(100, start=2000)])
    assert hit.num_tokens == 64
    before = pool_state(kv)
    # 164 tokens = 11 blocks: 4 shared + 7 new > the 5 blank ones (the idle shared ones don't count).
    assert not kv.allocate("b", 64, 100, hit)
    assert pool_state(kv) == before
    kv.check_invariants()
    # 4 shared + 5 new fit exactly.
    assert kv.allocate("b", 64, 80, hit)
    kv.check_invariants()
    assert kv.pools[FULL].num_free == 0


# --- KVCacheManager: prefixes ------------------------------------------------------------------


def test_find_prefix_leaves_at_least_one_token_to_compute() -> None:
    kv = manager()
    ids = tokens(64)  # exactly 4 blocks
    run_prefill(kv, "a", [*ids, 999])
    assert kv.find_prefix(ids).num_tokens == 48  # all cached, but the last token must run
    assert kv.find_prefix([*ids, 5]).num_tokens == 64
    assert kv.find_prefix(ids[:1]).num_tokens == 0
    assert kv.find_prefix(ids[:17]).num_tokens == 16


def test_equal_blocks_under_different_parents_hash_differently() -> None:
    kv = manager()
    a, b, c = tokens(BLOCK, 0), tokens(BLOCK, 100), tokens(BLOCK, 200)
    first = kv.block_hashes([*a, *c], 2)
    second = kv.block_hashes([*b, *c], 2)
    assert first[0] != second[0]
    assert first[1] != second[1]  # same tokens (c), different parent
    assert kv.block_hashes([*a, *c], 2) == first  # deterministic
    # Continuing a chain from known hashes gives the same as computing it whole.
    assert kv.block_hashes([*a, *c], 2, first[:1]) == first
    run_prefill(kv, "x", [*a, *c, 7])
    assert kv.find_prefix([*b, *c, 7]).num_tokens == 0  # c alone is not a cached prefix
    assert kv.find_prefix([*a, *c, 7]).num_tokens == 2 * BLOCK


def test_a_shared_prefix_is_shared_not_copied() -> None:
    kv = manager()
    shared = tokens(200)
    run_prefill(kv, "a", [*shared, *tokens(20, 1000)])
    free_before = kv.pools[FULL].num_free
    hit = kv.find_prefix([*shared, *tokens(20, 2000)])
    assert hit.num_tokens == 192
    assert kv.allocate("b", hit.num_tokens, 28, hit)
    kv.check_invariants()
    a, b = kv.block_tables("a")[FULL], kv.block_tables("b")[FULL]
    assert a[:12] == b[:12]
    assert all(kv.pools[FULL].ref_count[block] == 2 for block in b[:12])
    assert kv.pools[FULL].num_free == free_before - 2  # only blocks 12 and 13 are new
    # The sliding group shares only the blocks the window still needs; older entries are null.
    first_needed = (192 - WINDOW + 1) // BLOCK
    sliding = kv.block_tables("b")[SLIDING]
    assert sliding[:first_needed] == [NULL_BLOCK] * first_needed
    assert sliding[first_needed:12] == kv.block_tables("a")[SLIDING][first_needed:12]


def test_free_parks_the_tail_first_so_eviction_keeps_the_head_of_a_prefix() -> None:
    kv = manager(full=6, sliding=64, caching=True)  # 5 usable full blocks
    ids = tokens(4 * BLOCK)
    run_prefill(kv, "a", [*ids, 1])  # 5 blocks: 4 full, named, and the 1-token tail block
    full_table = list(kv.block_tables("a")[FULL])
    kv.free("a")
    kv.check_invariants()
    pool = kv.pools[FULL]
    assert list(pool.idle_cached) == full_table[3::-1]  # last block parked first: evicted first
    assert pool.num_free == pool.num_usable
    # Using two blocks evicts one cached block (one blank block is left): the prefix's last one.
    assert kv.allocate("b", 0, 2 * BLOCK)
    assert kv.find_prefix([*ids, 1]).num_tokens == 3 * BLOCK


def test_disabled_prefix_caching_finds_nothing_and_names_nothing() -> None:
    kv = manager(caching=False)
    ids = tokens(100)
    run_prefill(kv, "a", ids)
    assert kv.find_prefix(ids).num_tokens == 0
    assert all(not pool.by_hash for pool in kv.pools.values())
    kv.free("a")
    assert all(len(pool.blank) == pool.num_usable for pool in kv.pools.values())


def test_usage_counts_blocks_held_by_requests_only() -> None:
    kv = manager(full=17, sliding=33)  # 16 and 32 usable
    assert kv.usage() == 0.0
    run_prefill(kv, "a", tokens(64))  # 4 blocks per group
    assert kv.usage() == pytest.approx(4 / 16)
    kv.free("a")
    assert kv.usage() == 0.0  # cached idle blocks count as free
    kv.free("a")  # freeing twice (an abort after a finish) is harmless
    kv.check_invariants()
