"""BlockManager: pool accounting, prefix cache (chain hashes, LRU, sharing), invariants."""

from __future__ import annotations

import pytest

from dynserve.config import RoutingConfig
from dynserve.engine.block_manager import BlockManager, NoFreeBlocksError
from dynserve.engine.sequence import Sequence
from dynserve.sampling_params import SamplingParams


def make_seq(tokens: list[int], routing: RoutingConfig | None = None, request_id: str = "r") -> Sequence:
    return Sequence(
        request_id=request_id,
        prompt_token_ids=list(tokens),
        sampling_params=SamplingParams(),
        routing=routing or RoutingConfig(),
    )


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """Allocate, 'run' and commit every uncomputed token of seq (what one prefill step does)."""
    n = seq.num_uncomputed_tokens
    bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.commit(seq)
    bm.check_invariants()


def admit(bm: BlockManager, seq: Sequence) -> int:
    hits = bm.match_prefix(seq)
    bm.check_invariants()
    compute_all(bm, seq)
    return hits


def test_allocate_free_accounting() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(10)))
    assert bm.can_allocate(a, 10)
    bm.allocate(a, 10)
    assert len(a.block_table) == 3  # 10 tokens, 4 per block
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 5 and bm.num_total_blocks == 8
    assert bm.usage == pytest.approx(3 / 8)
    bm.check_invariants()
    # Growing within the last block needs nothing; crossing a boundary needs one more.
    a.num_computed_tokens = 10
    bm.allocate(a, 2)
    assert len(a.block_table) == 3
    bm.allocate(a, 3)
    assert len(a.block_table) == 4
    b = make_seq(list(range(100, 117)))
    assert not bm.can_allocate(b, 17)  # needs 5, 4 free
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(b, 17)
    assert b.block_table == [] and bm.num_free_blocks == 4  # a failed allocate takes nothing
    assert bm.can_allocate(b, 16)
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 8 and bm.usage == 0.0
    bm.free(a)  # idempotent
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_replacing_block_table_without_free_is_caught() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3])
    bm.allocate(a, 3)
    a.reset_for_recompute()  # drops block_table without telling the manager
    with pytest.raises(RuntimeError, match="without free"):
        bm.allocate(a, 3)
    bm.free(a)  # the manager still knows the blocks and gets them back
    assert bm.num_free_blocks == 4
    bm.check_invariants()


def test_prefix_hit_only_full_blocks_and_leaves_last_token() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(list(range(8)))
    assert admit(bm, a) == 0
    # Same 8 tokens: both blocks are cached, but the last token must be computed -> 1 block.
    b = make_seq(list(range(8)))
    assert admit(bm, b) == 4
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 4
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    # One more token: both full blocks hit.
    c = make_seq(list(range(9)))
    assert bm.match_prefix(c) == 8
    assert c.block_table == a.block_table[:2] and c.num_computed_tokens == 8
    # A prompt whose second block is only partly cached (a had 6 tokens) hits the first only.
    d = make_seq([50, 51, 52, 53, 54, 55])
    admit(bm, d)
    assert len(bm._seq_hashes[d.seq_id]) == 1  # the partial block is not registered
    e = make_seq([50, 51, 52, 53, 54, 55, 56, 57, 58])
    assert bm.match_prefix(e) == 4
    bm.check_invariants()
    # Counters are in tokens, one query per match_prefix: a, b, c, d, e.
    assert bm.prefix_cache_queries == 8 + 8 + 9 + 6 + 9
    assert bm.prefix_cache_hits == 0 + 4 + 8 + 0 + 4


def test_chain_hash_same_block_after_other_prefix_does_not_hit() -> None:
    bm = BlockManager(num_blocks=16, block_size=2)
    x, y, z, w = [1, 2], [3, 4], [5, 6], [7, 8]
    admit(bm, make_seq(x + y + [0]))
    admit(bm, make_seq(z + w + [0]))
    # z hits (second seq's first block); y is cached, but only after x, not after z.
    q = make_seq(z + y + [0])
    assert bm.match_prefix(q) == 2
    bm.check_invariants()


def test_prefix_cache_is_keyed_by_routing() -> None:
    bm = BlockManager(num_blocks=16, block_size=2)
    admit(bm, make_seq([1, 2, 3, 4, 5], RoutingConfig(policy="top_p", p=0.5)))
    assert bm.match_prefix(make_seq([1, 2, 3, 4, 5], RoutingConfig(policy="top_p", p=0.7))) == 0
    assert bm.match_prefix(make_seq([1, 2, 3, 4, 5], RoutingConfig(policy="top_p", p=0.5))) == 4


def test_decoded_tokens_become_cacheable() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq([1, 2, 3])
    admit(bm, a)  # block 0 full and committed, block 1 holds token 3
    for tok in (4, 5):
        a.append_token(tok)
        compute_all(bm, a)  # decode step
    assert len(bm._seq_hashes[a.seq_id]) == 2  # [1,2], [3,4] full; [5] partial
    b = make_seq([1, 2, 3, 4, 9])
    assert bm.match_prefix(b) == 4


def test_lru_evicts_oldest_and_tail_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3, 4, 5])
    admit(bm, a)  # blocks: [1,2] [3,4] hashed, [5] partial
    head, mid, tail = a.block_table
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    # The fresh request takes the two never-hashed blocks first, then evicts the tail of a's
    # prefix (freed first), keeping its head.
    c = make_seq([9, 9, 9, 9, 9, 9])
    bm.allocate(c, 6)
    assert tail in c.block_table and mid in c.block_table and head not in c.block_table
    assert bm.num_cached_blocks == 1
    bm.check_invariants()
    a2 = make_seq([1, 2, 3, 4, 5])
    assert bm.match_prefix(a2) == 2 and a2.block_table == [head]
    bm.check_invariants()


def test_lru_evicts_least_recently_freed_and_revival_refreshes() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_seq([1, 2, 0]), make_seq([3, 4, 0])
    admit(bm, a)
    admit(bm, b)  # each: one full hashed block + one partial
    bm.free(a)
    bm.free(b)
    # Touch a's prefix again: it becomes the most recently freed.
    a2 = make_seq([1, 2, 5])
    assert bm.match_prefix(a2) == 2
    bm.free(a2)
    c = make_seq([9, 9, 9, 9, 9])
    bm.allocate(c, 5)  # 2 plain free blocks + 1 eviction
    bm.check_invariants()
    assert bm.match_prefix(make_seq([3, 4, 0])) == 0  # b's block was the oldest: evicted
    assert bm.match_prefix(make_seq([1, 2, 0])) == 2


def test_revival_of_freed_cached_block() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_seq([1, 2, 3, 4, 5])
    admit(bm, a)
    cached = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 6
    b = make_seq([1, 2, 3, 4, 5, 6])
    assert bm.match_prefix(b) == 4
    assert b.block_table == cached
    assert [bm.ref_count(x) for x in cached] == [1, 1]
    assert bm.num_free_blocks == 4  # revived blocks are no longer evictable
    bm.check_invariants()
    # They cannot be evicted while in use: the 4 remaining blocks are all a new seq can take.
    c = make_seq(list(range(100, 110)))
    assert not bm.can_allocate(c, 10) and bm.can_allocate(c, 8)


def test_shared_blocks_ref_counts() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    prompt = [7, 7, 8, 8, 9]
    a = make_seq(prompt)
    admit(bm, a)
    b = make_seq(prompt)  # a second sample of the same request
    assert admit(bm, b) == 4
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared and b.block_table[2] != a.block_table[2]
    assert [bm.ref_count(x) for x in shared] == [2, 2]
    assert bm.num_used_blocks == 4
    bm.free(a)
    assert [bm.ref_count(x) for x in shared] == [1, 1] and bm.num_used_blocks == 3
    bm.check_invariants()
    bm.free(b)
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 2
    bm.check_invariants()


def test_concurrent_duplicate_prefix_is_not_double_registered() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = make_seq([1, 2, 3]), make_seq([1, 2, 3])
    bm.match_prefix(a)
    bm.match_prefix(b)  # both miss: neither has committed yet
    compute_all(bm, a)
    compute_all(bm, b)
    assert bm.num_cached_blocks == 1
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 1
    bm.check_invariants()
    c = make_seq([1, 2, 3])
    assert bm.match_prefix(c) == 2


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_seq([1, 2, 3, 4, 5])
    admit(bm, a)
    bm.free(a)
    b = make_seq([1, 2, 3, 4, 5])
    assert bm.match_prefix(b) == 0 and b.num_computed_tokens == 0
    assert bm.num_cached_blocks == 0 and bm.prefix_cache_queries == 0
    bm.check_invariants()


def test_reset_prefix_cache() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq([1, 2, 3, 4, 5])
    admit(bm, a)
    keep = make_seq([1, 2, 3, 4, 5])
    admit(bm, keep)  # holds the shared blocks while the cache is reset
    bm.free(a)
    bm.reset_prefix_cache()
    bm.check_invariants()
    assert bm.match_prefix(make_seq([1, 2, 3, 4, 5])) == 0
    bm.free(keep)
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 0
    bm.check_invariants()


def test_match_prefix_refuses_a_sequence_with_kv_state() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq([1, 2, 3])
    bm.allocate(a, 3)
    with pytest.raises(RuntimeError):
        bm.match_prefix(a)
