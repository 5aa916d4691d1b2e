"""Paged KV-cache block manager with a prefix cache. Plain Python, no torch.

The KV pool is `num_blocks` blocks of `block_size` token slots. A Sequence's `block_table` lists
the blocks holding its tokens in order: token i lives in block_table[i // block_size], slot
i % block_size.

Prefix caching: once a block is full and its tokens are computed (`commit`), it gets a chain hash
of (parent block's hash, the block's token ids); the first block's parent is a root derived from
the sequence's routing config, because with adaptive routing the K/V of a token depends on which
experts earlier layers used. A later sequence whose tokens start with the same full blocks reuses
them (`match_prefix`) instead of recomputing. Blocks whose references all went away keep their
hash and wait in an LRU of evictable blocks; they are reused on a hit, or evicted oldest first
when a fresh block is needed and the plain free list is empty.

Only full, committed blocks are ever shared, and a sequence only writes slots at or after its
`num_computed_tokens`, so a block referenced by two sequences is never written.
"""

from __future__ import annotations

import functools
import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable

from dynserve.engine.sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    """Raised by `BlockManager.allocate` when the pool cannot cover the request."""


def _chain_hash(parent: bytes, token_ids: Iterable[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@functools.lru_cache(maxsize=1024)
def _routing_root(routing: object) -> bytes:
    """Root of a prefix-hash chain: K/V depend on the routing config, so it is part of every key.
    Bounded: per-request routing values come from clients."""
    return hashlib.blake2b(b"dynserve-kv:" + repr(routing).encode(), digest_size=16).digest()


class BlockManager:
    """Owns the KV block pool: reference counts, the free list, the prefix-cache hash map and
    the LRU of evictable cached blocks, and the per-sequence block tables it handed out.

    Verbs come in pairs: `can_allocate`/`allocate`, `match_prefix`/`commit`, and `free`.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref: list[int] = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks  # set only while registered
        self._hash_to_block: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; oldest first
        # Per sequence: the block table this manager handed out (the same list object as
        # seq.block_table while in sync) and the chain hashes of its committed full blocks.
        self._tables: dict[int, list[int]] = {}
        self._seq_hashes: dict[int, list[bytes]] = {}
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    # ------------------------------------------------------------------ stats
    @property
    def num_total_blocks(self) -> int:
        return self.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation may take: plain free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash (in use or evictable)."""
        return len(self._hash_to_block)

    @property
    def usage(self) -> float:
        """Fraction of the pool referenced by live sequences, 0..1."""
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ allocation
    def _num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether `allocate(seq, num_new_tokens)` would succeed now."""
        return self._num_new_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Extend seq.block_table to cover num_computed_tokens + num_new_tokens tokens."""
        table = self._table_of(seq)
        n = self._num_new_blocks(seq, num_new_tokens)
        if n > self.num_free_blocks:
            raise NoFreeBlocksError(f"sequence {seq.seq_id} needs {n} more KV blocks, only {self.num_free_blocks} free")
        for _ in range(n):
            table.append(self._take_fresh_block())

    def _table_of(self, seq: Sequence) -> list[int]:
        table = self._tables.get(seq.seq_id)
        if table is None:
            if seq.block_table:
                raise RuntimeError(f"sequence {seq.seq_id} has a block table this manager did not give it")
            table = seq.block_table = []
            self._tables[seq.seq_id] = table
            self._seq_hashes[seq.seq_id] = []
        elif seq.block_table is not table:
            raise RuntimeError(f"sequence {seq.seq_id}: block_table was replaced without free() (blocks would leak)")
        return table

    def _take_fresh_block(self) -> int:
        if self._free:
            bid = self._free.popleft()
        else:
            bid, _ = self._evictable.popitem(last=False)  # least recently freed
            h = self._block_hash[bid]
            self._block_hash[bid] = None
            if h is not None and self._hash_to_block.get(h) == bid:
                del self._hash_to_block[h]
        self._ref[bid] = 1
        return bid

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's block references and clear its block table. Idempotent."""
        table = self._tables.pop(seq.seq_id, None)
        self._seq_hashes.pop(seq.seq_id, None)
        if table is not None:
            # Reverse order: the tail of a prefix is the least likely to be reused, so it enters
            # the LRU first and is evicted first.
            for bid in reversed(table):
                self._ref[bid] -= 1
                if self._ref[bid] == 0:
                    if self._block_hash[bid] is not None:
                        self._evictable[bid] = None
                    else:
                        self._free.append(bid)
            table.clear()
        seq.block_table = []

    # ------------------------------------------------------------------ prefix cache
    def _root_hash(self, seq: Sequence) -> bytes:
        return _routing_root(seq.routing)

    def match_prefix(self, seq: Sequence, *, record_stats: bool = True) -> int:
        """Reuse the longest run of cached full blocks that starts seq.token_ids.

        Leaves at least one token uncomputed (its logits are needed). Sets seq.block_table,
        seq.num_computed_tokens and seq.num_cached_tokens to the hit; returns the hit tokens.
        With `record_stats` the lookup counts in `prefix_cache_queries`/`prefix_cache_hits`
        (the scheduler passes False and calls `record_prefix_query` once the sequence is
        admitted, so a sequence retried over several steps counts once).
        """
        if seq.block_table or seq.num_computed_tokens or seq.seq_id in self._tables:
            raise RuntimeError(f"match_prefix on sequence {seq.seq_id}, which already has KV state")
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_blocks = (len(seq.token_ids) - 1) // bs
        tokens = seq.token_ids
        parent = self._root_hash(seq)
        hit_blocks: list[int] = []
        hashes: list[bytes] = []
        for i in range(max_blocks):
            h = _chain_hash(parent, tokens[i * bs : (i + 1) * bs])
            bid = self._hash_to_block.get(h)
            if bid is None:
                break
            hit_blocks.append(bid)
            hashes.append(h)
            parent = h
        for bid in hit_blocks:
            if self._ref[bid] == 0:
                del self._evictable[bid]
            self._ref[bid] += 1
        table = list(hit_blocks)
        seq.block_table = table
        self._tables[seq.seq_id] = table
        self._seq_hashes[seq.seq_id] = hashes
        hit_tokens = len(hit_blocks) * bs
        seq.num_computed_tokens = hit_tokens
        seq.num_cached_tokens = hit_tokens
        if record_stats:
            self.record_prefix_query(len(seq.token_ids), hit_tokens)
        return hit_tokens

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Count one prefix-cache lookup (in tokens) in the hit-rate counters."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_query_tokens
            self.prefix_cache_hits += num_hit_tokens

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full up to seq.num_computed_tokens."""
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(seq.seq_id)
        if table is None:
            return
        hashes = self._seq_hashes[seq.seq_id]
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(table))
        tokens = seq.token_ids
        parent = hashes[-1] if hashes else self._root_hash(seq)
        for i in range(len(hashes), num_full):
            h = _chain_hash(parent, tokens[i * bs : (i + 1) * bs])
            hashes.append(h)
            bid = table[i]
            if h not in self._hash_to_block:
                self._hash_to_block[h] = bid
                self._block_hash[bid] = h
            # else: an identical block is already cached (two sequences computed the same
            # prefix at once); this copy stays unregistered and goes to the free list later.
            parent = h

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash. Evictable blocks become plain free blocks; blocks in use keep
        their contents but are no longer found by lookups (live sequences keep their own chain,
        so blocks they fill later are registered under correct hashes)."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._hash_to_block.clear()
        self._block_hash = [None] * self.num_blocks

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Raise AssertionError if the pool's bookkeeping is inconsistent."""
        free = list(self._free)
        evictable = list(self._evictable)
        assert len(set(free)) == len(free), "duplicate block in the free list"
        assert not set(free) & set(evictable), "block both free and evictable"
        counts = [0] * self.num_blocks
        for table in self._tables.values():
            for bid in table:
                counts[bid] += 1
        assert counts == self._ref, "reference counts differ from the block tables handed out"
        in_use = [b for b in range(self.num_blocks) if self._ref[b] > 0]
        assert len(free) + len(evictable) + len(in_use) == self.num_blocks, "blocks lost or double-counted"
        for bid in free:
            assert self._ref[bid] == 0 and self._block_hash[bid] is None, f"free block {bid} is not clean"
        for bid in evictable:
            assert self._ref[bid] == 0 and self._block_hash[bid] is not None, f"evictable block {bid} bad"
        for h, bid in self._hash_to_block.items():
            assert self._block_hash[bid] == h, f"hash map entry for block {bid} is stale"
        registered = sum(1 for h in self._block_hash if h is not None)
        assert registered == len(self._hash_to_block), "block hashes and the hash map disagree"
        for seq_id, table in self._tables.items():
            assert len(self._seq_hashes[seq_id]) <= len(table), f"sequence {seq_id} hashed past its table"
