"""Plain-torch paged attention: the CPU path of the engine and the reference for the Triton kernels.

KV cache layout: kv_cache [2, num_blocks, block_size, Hkv, D]; slot s = block * block_size + offset.
Sequence b's position p lives in block block_tables[b, p // block_size] at offset p % block_size.

`paged_attention_ref` has two paths:
- decode-only batches (one query per sequence): fully vectorised. K/V of all B sequences are
  gathered through the block tables into [B, Lmax, Hkv, D] and one masked SDPA call runs with the
  G = Hq // Hkv query heads of a kv head laid out as G "query rows", so GQA needs no K/V copy.
- prefill / mixed batches: one SDPA call per sequence (host-side lengths, no device sync): causal
  (flash kernel) when nothing is cached before the new tokens, else an explicit causal mask offset
  by the cached prefix (chunked prefill, prefix-cache hits).
- with attention sinks or a sliding window (gpt-oss), every batch takes `_attend_explicit`: one
  masked float32 softmax per sequence, the sink as an extra logit in the denominator.

Attention sinks (`sinks` [Hq], one logit per query head, as gpt-oss learns them): the softmax of a
query row runs over its visible scores plus the head's sink logit, and the sink contributes no
value, so the weights sum to less than 1. Sliding window `window` = W > 0: the query at position p
sees positions p - W + 1 .. p (W positions including itself: transformers' `kv_idx > q_idx - W`);
None or 0 is the full causal context.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from dynserve_kernels.metadata import AttentionMetadata


def write_kv_ref(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, Hkv, D] into cache slots `slot_mapping` [T] in place; slots < 0 are skipped."""
    if key.shape[0] == 0:
        return
    _, _, _, hkv, d = kv_cache.shape
    if key.shape[1:] != (hkv, d) or value.shape != key.shape:
        raise ValueError(f"key/value {tuple(key.shape)} do not match cache heads ({hkv}, {d})")
    slots = slot_mapping.to(device=kv_cache.device, dtype=torch.int64)  # [T]
    if bool((slots < 0).any()):  # padding tokens (slot -1) are not written
        keep = slots >= 0
        slots, key, value = slots[keep], key[keep], value[keep]
    kv_cache[0].view(-1, hkv, d).index_copy_(0, slots, key.to(kv_cache.dtype))
    kv_cache[1].view(-1, hkv, d).index_copy_(0, slots, value.to(kv_cache.dtype))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # CPU SDPA is fastest and exact enough in float32 / bfloat16; half goes through float32 there.
    if t.device.type == "cpu" and t.dtype == torch.float16:
        return torch.float32
    return t.dtype


def _host_lists(batch: AttentionMetadata) -> tuple[list[int], list[int]]:
    qsl = batch.query_start_loc_host or batch.query_start_loc.tolist()
    lens = batch.seq_lens_host or batch.seq_lens.tolist()
    return qsl, lens


def _sequences(batch: AttentionMetadata) -> Iterator[tuple[int, int, int, int]]:
    """(sequence b, its first query row s, its new tokens n, its context length) for every sequence
    with new tokens, from host-side lists (no device sync)."""
    qsl, lens = _host_lists(batch)
    for b, length in enumerate(lens):
        if qsl[b + 1] > qsl[b]:
            yield b, qsl[b], qsl[b + 1] - qsl[b], length


class _Scratch(threading.local):
    """Grow-only gather buffers reused by every layer and step.

    A decode step gathers ~10 MB of K and of V per layer; fresh allocations of that size are fresh
    pages from the OS each time (page faults cost more than the copy), so the gathers write into
    buffers that persist. One pair per (device, dtype, inference mode) and per thread: two engines
    in one process each run attention on their own thread.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.device, torch.dtype, bool], torch.Tensor] = {}

    def get(self, name: str, n: int, like: torch.Tensor) -> torch.Tensor:
        # inference-mode tensors may not be written outside inference mode: one buffer per mode
        key = (name, like.device, like.dtype, torch.is_inference_mode_enabled())
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 2 * buf.numel() if buf is not None else n), dtype=like.dtype, device=like.device)
            self._bufs[key] = buf
        return buf[:n]


_SCRATCH = _Scratch()


def _gather_rows(cache_half: torch.Tensor, blocks: torch.Tensor, name: str) -> torch.Tensor:
    """Whole blocks [n] of one cache half [num_blocks, bs, Hkv, D] as rows [n, bs*Hkv*D], written
    into the scratch buffer `name` (valid until the next gather into it).

    index_select on a 2-D view copies one block per memcpy, far faster than indexing the 4-D cache.
    """
    flat = cache_half.view(cache_half.shape[0], -1)  # [num_blocks, bs*Hkv*D]
    n, row = blocks.shape[0], flat.shape[1]
    out = _SCRATCH.get(name, n * row, flat).view(n, row)  # [n, bs*Hkv*D]
    return torch.index_select(flat, 0, blocks, out=out)


def _gather_seq(cache_half: torch.Tensor, block_table: torch.Tensor, length: int, name: str) -> torch.Tensor:
    """[length, Hkv, D] of one sequence read through its block table row."""
    bs = cache_half.shape[1]
    nblk = -(-length // bs)
    rows = _gather_rows(cache_half, block_table[:nblk], name)  # [nblk, bs*Hkv*D]
    return rows.view(nblk * bs, *cache_half.shape[2:])[:length]


def paged_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    batch: AttentionMetadata,
    scale: float,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over each sequence's paged K/V; returns [T, Hq, D] in q.dtype.

    `sinks` [Hq] (a sink logit per head) and `window` (sliding window, None/0 = full): module docstring."""
    T, hq, d = q.shape
    _, _, bs, hkv, _ = kv_cache.shape
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    if sinks is not None and sinks.shape != (hq,):
        raise ValueError(f"sinks {tuple(sinks.shape)} must have one logit per query head ({hq})")
    g = hq // hkv
    if T == 0:
        return q.new_empty(T, hq, d)
    cdt = _compute_dtype(q)
    if sinks is not None or window:
        return _attend_explicit(q, kv_cache, batch, scale, sinks, window or 0).to(q.dtype)
    if batch.max_query_len == 1 and T == batch.num_seqs:
        return _decode(q, kv_cache, batch, scale, cdt).to(q.dtype)
    out = torch.empty(T, hq, d, dtype=cdt, device=q.device)  # [T, Hq, D]
    for b, s, n, length in _sequences(batch):
        e = s + n
        k = _gather_seq(kv_cache[0], batch.block_tables[b], length, "k").to(cdt)  # [L, Hkv, D]
        v = _gather_seq(kv_cache[1], batch.block_tables[b], length, "v").to(cdt)  # [L, Hkv, D]
        if n == length and n > 1:
            # no cached prefix: plain causal attention, which SDPA runs with its flash kernel (an explicit
            # mask sends it to the slower math path); K/V are repeated per query head for that
            if g > 1:
                k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # [L, Hq, D]
            qh, kh, vh = q[s:e].to(cdt).transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [Hq, n|L, D]
            ob = F.scaled_dot_product_attention(qh[None], kh[None], vh[None], is_causal=True, scale=scale)
            out[s:e] = ob[0].transpose(0, 1)  # [n, Hq, D]
            continue
        qb = q[s:e].to(cdt).reshape(n, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * n, d)  # [Hkv, G*n, D]
        kb, vb = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, L, D]
        if n == 1:
            mask = None  # the single new token sees the whole context
        else:
            qpos = torch.arange(length - n, length, device=q.device)  # [n]
            mask = torch.arange(length, device=q.device)[None, :] <= qpos[:, None]  # [n, L]
            mask = mask.repeat(g, 1)  # [G*n, L] (rows ordered g-major like qb)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)  # [Hkv, G*n, D]
        out[s:e] = ob.view(hkv, g, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)
    return out.to(q.dtype)


def _attend_explicit(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    batch: AttentionMetadata,
    scale: float,
    sinks: torch.Tensor | None,
    window: int,
) -> torch.Tensor:
    """Attention with sinks and/or a sliding window (window 0 = none): per sequence, scores and softmax
    in float32 over the visible positions (+ the sink logit); returns float32 [T, Hq, D]."""
    T, hq, d = q.shape
    hkv = kv_cache.shape[3]
    g = hq // hkv
    out = torch.empty(T, hq, d, dtype=torch.float32, device=q.device)  # [T, Hq, D]
    for b, s, n, length in _sequences(batch):
        e = s + n
        lo = max(0, length - n - window + 1) if window else 0  # first position any query row sees
        k = _gather_seq(kv_cache[0], batch.block_tables[b], length, "k")[lo:].float()  # [L', Hkv, D]
        v = _gather_seq(kv_cache[1], batch.block_tables[b], length, "v")[lo:].float()  # [L', Hkv, D]
        qb = q[s:e].float().reshape(n, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, n, D]
        scores = qb @ k.permute(1, 2, 0)[:, None] * scale  # [Hkv, G, n, L']
        kpos = torch.arange(lo, length, device=q.device)  # [L']
        qpos = torch.arange(length - n, length, device=q.device)  # [n]
        visible = kpos[None, :] <= qpos[:, None]  # [n, L']
        if window:
            visible &= kpos[None, :] > qpos[:, None] - window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink = sinks.float().view(hkv, g, 1, 1).expand(hkv, g, n, 1)  # [Hkv, G, n, 1]
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]  # [Hkv, G, n, L']
        else:
            probs = torch.softmax(scores, dim=-1)  # [Hkv, G, n, L']
        ob = probs @ v.transpose(0, 1)[:, None]  # [Hkv, G, n, D]
        out[s:e] = ob.permute(2, 0, 1, 3).reshape(n, hq, d)
    return out


def _decode(
    q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionMetadata, scale: float, cdt: torch.dtype
) -> torch.Tensor:
    """One query per sequence (T == B), vectorised over the batch."""
    B, hq, d = q.shape
    _, _, bs, hkv, _ = kv_cache.shape
    g = hq // hkv
    lmax = max(int(batch.max_seq_len), 1)
    nblk = min(-(-lmax // bs), batch.block_tables.shape[1])
    lmax = min(lmax, nblk * bs)
    blocks = batch.block_tables[:, :nblk]  # [B, nblk]
    flat = blocks.reshape(-1)  # [B * nblk]
    k = _gather_rows(kv_cache[0], flat, "k")  # [B * nblk, bs * Hkv * D]
    v = _gather_rows(kv_cache[1], flat, "v")  # [B * nblk, bs * Hkv * D]
    k = k.view(B, nblk * bs, hkv, d)[:, :lmax].to(cdt).transpose(1, 2)  # [B, Hkv, L, D]
    v = v.view(B, nblk * bs, hkv, d)[:, :lmax].to(cdt).transpose(1, 2)  # [B, Hkv, L, D]
    seq_lens = batch.seq_lens.to(q.device)
    mask = torch.arange(lmax, device=q.device)[None, :] < seq_lens[:, None]  # [B, Lmax]
    qb = q.to(cdt).reshape(B, hkv, g, d)  # [B, Hkv, G, D]: the G heads of a kv head as query rows
    out = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out.reshape(B, hq, d)


def attention_block_ref(
    x: torch.Tensor,
    in_norm: tuple[torch.Tensor, float],
    w_qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    batch: AttentionMetadata,
    scale: float,
    w_o: torch.Tensor,
    post_norm: tuple[torch.Tensor, float],
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (Llama/Mixtral) attention block from the references, the spec of `cpu_native.attention_block`:
    x [T, H] -> (y, h) with h = x + attention(rmsnorm(x)) @ w_o^T and y = rmsnorm(h) ([T, H] each);
    K/V of the new tokens written to kv_cache at slot_mapping [T]."""
    from dynserve_kernels.norm_ref import add_rms_norm_ref, rms_norm_ref
    from dynserve_kernels.rope_ref import apply_rope_ref

    T = x.shape[0]
    hkv, d = kv_cache.shape[3], kv_cache.shape[4]
    hq = num_heads
    qkv = F.linear(rms_norm_ref(x, in_norm[0], in_norm[1]), w_qkv)  # [T, (Hq + 2 Hkv) D]
    qk = apply_rope_ref(qkv[:, : (hq + hkv) * d].view(T, hq + hkv, d), cos, sin)  # [T, Hq + Hkv, D]
    q, k = qk[:, :hq], qk[:, hq:]  # [T, Hq, D], [T, Hkv, D]
    v = qkv[:, (hq + hkv) * d :].reshape(T, hkv, d)  # [T, Hkv, D]
    write_kv_ref(k, v, kv_cache, slot_mapping)
    o = paged_attention_ref(q, kv_cache, batch, scale)  # [T, Hq, D]
    a = F.linear(o.reshape(T, hq * d), w_o)  # [T, H]
    return add_rms_norm_ref(x, a, post_norm[0], post_norm[1])  # (y, h)
