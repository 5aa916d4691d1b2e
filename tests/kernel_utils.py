"""Helpers for the kernel tests: paged-KV batches laid out in a shuffled block pool, naive references,
and ragged MoE assignments with a chosen number of experts per token."""

from __future__ import annotations

import math

import torch

from dynserve.model.base import ForwardBatch
from dynserve.routing.base import Assignment


def make_batch(
    seqs: list[tuple[int, int]], block_size: int, num_blocks: int | None = None, seed: int = 0
) -> tuple[ForwardBatch, int]:
    """A ForwardBatch for sequences given as (context_len_after_step, query_len).

    Blocks come from a shuffled pool, so block tables are non-contiguous. Returns (batch, num_blocks).
    """
    gen = torch.Generator().manual_seed(seed)
    need = [math.ceil(length / block_size) for length, _ in seqs]
    num_blocks = num_blocks or sum(need) + 3
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(need + [1])
    tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int64)
    slots, positions, qsl = [], [], [0]
    for b, (length, n) in enumerate(seqs):
        assert 0 < n <= length
        blocks = [pool.pop() for _ in range(need[b])]
        tables[b, : need[b]] = torch.tensor(blocks)
        for p in range(length - n, length):
            positions.append(p)
            slots.append(blocks[p // block_size] * block_size + p % block_size)
        qsl.append(qsl[-1] + n)
    lens = [length for length, _ in seqs]
    T = qsl[-1]
    batch = ForwardBatch(
        input_ids=torch.zeros(T, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(qsl, dtype=torch.int64),
        seq_lens=torch.tensor(lens, dtype=torch.int64),
        block_tables=tables,
        max_query_len=max(n for _, n in seqs),
        max_seq_len=max(lens),
        block_size=block_size,
        logits_indices=torch.tensor(qsl[1:], dtype=torch.int64) - 1,
        query_start_loc_host=qsl,
        seq_lens_host=lens,
    )
    return batch, num_blocks


def seq_slots(batch: ForwardBatch, b: int, length: int) -> torch.Tensor:
    """[length] cache slots of positions 0..length-1 of sequence b."""
    pos = torch.arange(length)
    bs = batch.block_size
    return batch.block_tables[b, pos // bs] * bs + pos % bs


def fill_prefix(kv_cache: torch.Tensor, batch: ForwardBatch, gen: torch.Generator) -> None:
    """Random K/V in the cached-prefix slots (positions before each sequence's new tokens)."""
    _, _, _, hkv, d = kv_cache.shape
    for b, length in enumerate(batch.seq_lens_host):
        n = batch.query_start_loc_host[b + 1] - batch.query_start_loc_host[b]
        slots = seq_slots(batch, b, length - n)
        for half in range(2):
            vals = torch.randn(len(slots), hkv, d, generator=gen).to(kv_cache.dtype)
            kv_cache[half].view(-1, hkv, d)[slots] = vals


def naive_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Float64 loop over sequences, heads and query tokens: the ground truth for attention tests.

    `sinks` [Hq]: an extra logit per head in the softmax (its probability is dropped, as gpt-oss);
    `window` W: the query at position p sees positions p - W + 1 .. p."""
    T, hq, d = q.shape
    hkv = kv_cache.shape[3]
    g = hq // hkv
    out = torch.zeros(T, hq, d, dtype=torch.float64)
    for b, length in enumerate(batch.seq_lens_host):
        s, e = batch.query_start_loc_host[b], batch.query_start_loc_host[b + 1]
        n = e - s
        slots = seq_slots(batch, b, length)
        k = kv_cache[0].reshape(-1, hkv, d)[slots].double()  # [L, Hkv, D]
        v = kv_cache[1].reshape(-1, hkv, d)[slots].double()
        for i in range(n):
            visible = length - n + i + 1
            first = max(0, visible - window) if window else 0
            for h in range(hq):
                scores = (k[first:visible, h // g] @ q[s + i, h].double()) * scale  # [visible - first]
                if sinks is not None:
                    probs = torch.softmax(torch.cat([scores, sinks[h : h + 1].double()]), 0)[:-1]
                else:
                    probs = torch.softmax(scores, 0)
                out[s + i, h] = probs @ v[first:visible, h // g]
    return out


def make_assignment(
    ks: list[int], num_experts: int, gen: torch.Generator, experts: list[int] | None = None
) -> Assignment:
    """Token t gets ks[t] distinct experts (drawn from `experts`, default all) with random weights."""
    pool = torch.tensor(experts if experts is not None else list(range(num_experts)))
    mask = torch.zeros(len(ks), num_experts, dtype=torch.bool)
    for t, k in enumerate(ks):
        pick = pool[torch.randperm(len(pool), generator=gen)[:k]]
        mask[t, pick] = True
    weights = torch.rand(len(ks), num_experts, generator=gen) + 0.1
    return Assignment.from_mask(mask, weights)
