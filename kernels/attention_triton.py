"""Triton paged attention: the GPU path of `write_kv` / `paged_attention` (references in attention_ref).

- `_write_kv_kernel`: one program per new token copies its K and V rows ([Hkv * D] each) into the
  cache slot `slot_mapping[t]` (negative slots, i.e. padding tokens, are skipped).
- `_decode_kernel`: one query token per sequence. One program per (sequence, kv head) handles the
  G = Hq // Hkv query heads that share the kv head as the rows of one tile, so each K/V tile is
  read once for all of them (GQA). K/V are read BLOCK_N positions at a time through the block
  table (position p -> block_tables[b, p // bs], offset p % bs), with an online softmax in float32.
  When (sequence, kv head) programs are too few for the device, each context is split into ranges
  of tiles, one program each (grid axis 2, SPLIT), that store their partial softmax state;
  `_decode_merge_kernel` merges them by log-sum-exp (flash-decoding).
- `_prefill_kernel`: one program per (query tile, sequence, query head). Query row i of a sequence
  with context length L and n new tokens sits at position L - n + i and attends to positions
  0..L - n + i: the cached prefix (chunked prefill / prefix cache) and the causal part of the new
  tokens, all read from the cache (the model writes the new K/V first).
`paged_attention_triton` dispatches on `batch.max_query_len`.

Both attention kernels take the gpt-oss options of `attention_ref.paged_attention_ref`: a sliding
`window` (runtime int, 0 = none: positions below p - window + 1 are masked and the K/V loop starts at
the tile holding the first visible one) and attention sinks (HAS_SINKS: after the loop the head's
sink logit joins the online softmax's max and denominator and adds no value).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from dynserve_kernels.metadata import kv_halves_dense
from triton.runtime.jit import JITFunction

if TYPE_CHECKING:
    from dynserve_kernels.metadata import AttentionMetadata

_LOG2E = 1.4426950408889634


# The compiled kernel of each kernel's latest launch (None under the interpreter): read by the GPU check.
LAST_COMPILED: dict[str, object] = {}


def _interpreting() -> bool:
    """True when the kernels were built for the interpreter (TRITON_INTERPRET=1 at import time)."""
    return not isinstance(_write_kv_kernel, JITFunction)


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, cache_ptr, slot_ptr, stride_kt, stride_vt, half_stride, ROW, BLOCK: tl.constexpr
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < tl.where(slot >= 0, ROW, 0)
    k = tl.load(key_ptr + t.to(tl.int64) * stride_kt + offs, mask=mask)
    v = tl.load(value_ptr + t.to(tl.int64) * stride_vt + offs, mask=mask)
    dst = cache_ptr + slot * ROW + offs
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half_stride, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, Hkv, D] into kv_cache [2, N, bs, Hkv, D] at slot_mapping [T] (in place)."""
    T = key.shape[0]
    _, _, _, hkv, d = kv_cache.shape
    if key.shape[1:] != (hkv, d) or value.shape != key.shape:
        raise ValueError(f"key/value {tuple(key.shape)} do not match cache heads ({hkv}, {d})")
    if not kv_halves_dense(kv_cache):
        raise ValueError("kv_cache's K and V halves must each be contiguous")
    if T == 0:
        return
    # rows may be strided (a slice of a fused qkv projection) but each row must be dense
    if key.stride(2) != 1 or key.stride(1) != d:
        key = key.contiguous()
    if value.stride(2) != 1 or value.stride(1) != d:
        value = value.contiguous()
    slots = slot_mapping.to(device=kv_cache.device).contiguous()  # [T]
    row = hkv * d
    LAST_COMPILED["write_kv"] = _write_kv_kernel[(T,)](
        key, value, kv_cache, slots, key.stride(0), value.stride(0), kv_cache.stride(0), row,
        BLOCK=triton.next_power_of_2(row), num_warps=4 if row >= 1024 else 2,
    )  # fmt: skip


@triton.jit
def _load_kv_tile(cache_ptr, bt_row_ptr, pos, p_mask, kv_off_h, offs_d, d_mask, block_size, stride_blk, stride_pos):
    """[BLOCK_N, BLOCK_D] rows of one kv head at positions `pos`, read through a block table row."""
    blk = tl.load(bt_row_ptr + pos // block_size, mask=p_mask, other=0).to(tl.int64)
    row = blk * stride_blk + (pos % block_size).to(tl.int64) * stride_pos + kv_off_h  # [BN]
    return tl.load(cache_ptr + row[:, None] + offs_d[None, :], mask=p_mask[:, None] & d_mask[None, :], other=0.0)


# stride_bt (= max blocks per sequence in the batch) grows with the context: no specialization
@triton.jit(do_not_specialize=["stride_bt", "tiles_per_split"])
def _decode_kernel(
    q_ptr,
    cache_ptr,
    out_ptr,
    bt_ptr,
    seq_lens_ptr,
    sinks_ptr,
    part_ptr,
    ml_ptr,
    qk_scale,
    window,
    tiles_per_split,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    half_stride,
    stride_blk,
    stride_pos,
    block_size,
    G,
    D,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    L = tl.load(seq_lens_ptr + b).to(tl.int32)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < G
    d_mask = offs_d < D
    heads = kvh * G + offs_g  # [BG] query heads of this kv head
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BG, BD]
    if UPCAST:
        q = q.to(tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    kv_off_h = kvh.to(tl.int64) * D
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    lo = tl.where(window > 0, tl.maximum(L - window, 0), 0)  # first visible position
    first = lo // BLOCK_N * BLOCK_N
    end = L
    if SPLIT:  # this program's share of the tiles: tiles_per_split of them from the split's first
        first += tl.program_id(2) * tiles_per_split * BLOCK_N
        end = tl.minimum(L, first + tiles_per_split * BLOCK_N)
    for start in range(first, end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        p_mask = (pos < L) & (pos >= lo)
        k = _load_kv_tile(cache_ptr, bt_row, pos, p_mask, kv_off_h, offs_d, d_mask, block_size, stride_blk, stride_pos)
        v = _load_kv_tile(
            cache_ptr + half_stride,
            bt_row,
            pos,
            p_mask,
            kv_off_h,
            offs_d,
            d_mask,
            block_size,
            stride_blk,
            stride_pos,
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BG, BN], log2 domain
        s = tl.where(p_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if SPLIT:  # partial state for _decode_merge_kernel: (m, l) and the unnormalised acc, float32
        row = (b.to(tl.int64) * tl.num_programs(1) * G + heads) * tl.num_programs(2) + tl.program_id(2)  # [BG]
        tl.store(ml_ptr + row * 2, m_i, mask=g_mask)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=g_mask)
        tl.store(part_ptr + row[:, None] * D + offs_d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])
    else:
        if HAS_SINKS:  # the sink logit (log2 domain) joins the denominator, with no value
            sink = tl.load(sinks_ptr + heads, mask=g_mask, other=0.0).to(tl.float32) * 1.4426950408889634  # [BG]
            m_s = tl.maximum(m_i, sink)
            alpha = tl.exp2(m_i - m_s)
            l_i = l_i * alpha + tl.exp2(sink - m_s)
            acc = acc * alpha[:, None]
        # l_i == 0 only for an empty context (padding rows, seq_len 0): write zeros, not 0/0 = NaN
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # [rows, BD]
        tl.store(
            out_ptr + b.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None] & d_mask[None, :],
        )


@triton.jit
def _decode_merge_kernel(
    part_ptr,
    ml_ptr,
    out_ptr,
    sinks_ptr,
    stride_ot,
    stride_oh,
    S,
    D,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    """One program per (sequence, query head): the S partial softmax states of its splits merged by
    their log-sum-exp (each rescaled to the largest max), the sink joining as in _decode_kernel."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < S
    d_mask = offs_d < D
    rows = (b.to(tl.int64) * tl.num_programs(1) + h) * S + offs_s  # [BS]
    m = tl.load(ml_ptr + rows * 2, mask=s_mask, other=float("-inf"))  # [BS] log2 domain
    lsum = tl.load(ml_ptr + rows * 2 + 1, mask=s_mask, other=0.0)  # [BS]
    m_all = tl.max(m, 0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        m_all = tl.maximum(m_all, sink)
    m_use = tl.where(m_all == float("-inf"), 0.0, m_all)  # every split empty: weights 0, not NaN
    w = tl.exp2(m - m_use)  # [BS]
    l_all = tl.sum(lsum * w, 0)
    if HAS_SINKS:
        l_all += tl.exp2(sink - m_use)
    acc = tl.load(part_ptr + rows[:, None] * D + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(l_all > 0, l_all, 1.0)  # [BD]; empty context: zeros
    dst = out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + offs_d
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    q_ptr,
    cache_ptr,
    out_ptr,
    bt_ptr,
    seq_lens_ptr,
    qsl_ptr,
    sinks_ptr,
    qk_scale,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    half_stride,
    stride_blk,
    stride_pos,
    block_size,
    G,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    mt = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b).to(tl.int32)
    n = tl.load(qsl_ptr + b + 1).to(tl.int32) - q_start
    L = tl.load(seq_lens_ptr + b).to(tl.int32)
    prefix = L - n
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n
    d_mask = offs_d < D
    qpos = prefix + offs_m  # [BM] positions of the query rows
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BM, BD]
    if UPCAST:
        q = q.to(tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    kv_off_h = (h // G).to(tl.int64) * D
    # keys beyond the tile's last query position are never visible; empty tiles loop 0 times
    end = tl.minimum(L, prefix + (mt + 1) * BLOCK_M)
    end = tl.where(mt * BLOCK_M < n, end, 0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    q_lo = tl.where(window > 0, qpos - window + 1, 0)  # [BM] first position each row sees
    lo = tl.maximum(tl.where(window > 0, prefix + mt * BLOCK_M - window + 1, 0), 0)  # the tile's first
    for start in range(lo // BLOCK_N * BLOCK_N, end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        p_mask = pos < L
        k = _load_kv_tile(cache_ptr, bt_row, pos, p_mask, kv_off_h, offs_d, d_mask, block_size, stride_blk, stride_pos)
        v = _load_kv_tile(
            cache_ptr + half_stride,
            bt_row,
            pos,
            p_mask,
            kv_off_h,
            offs_d,
            d_mask,
            block_size,
            stride_blk,
            stride_pos,
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN], log2 domain
        visible = p_mask[None, :] & (pos[None, :] <= qpos[:, None]) & (pos[None, :] >= q_lo[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # -inf only for a row that has seen nothing yet (windowed rows in a tile before their
        # window): subtract 0 there, so p = 0 and alpha = 0 instead of NaN; otherwise m_new itself
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if HAS_SINKS:  # the sink logit (log2 domain) joins the denominator, with no value
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        m_s = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_s)
        l_i = l_i * alpha + tl.exp2(sink - m_s)
        acc = acc * alpha[:, None]
    # l_i == 0 only for an empty context (padding rows, seq_len 0): write zeros, not 0/0 = NaN
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # [rows, BD]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def decode_config(d: int, dtype: torch.dtype, interpret: bool | None = None) -> dict[str, int]:
    """BLOCK_N and launch options of the decode kernel for head dim `d` (checked by dynserve_kernels.aot).

    `interpret`: the small interpreter tiles; default: whether the kernels were built for it."""
    if _interpreting() if interpret is None else interpret:
        return dict(BLOCK_N=16, num_warps=4)
    if dtype == torch.float32:  # FMA dots with the tiles in registers: smaller tiles, spread wider
        return dict(BLOCK_N=32, num_warps=8 if d > 64 else 4)
    return dict(BLOCK_N=64 if d <= 128 else 32, num_warps=4)


def prefill_config(d: int, dtype: torch.dtype, interpret: bool | None = None) -> dict[str, int]:
    """BLOCK_M, BLOCK_N and launch options of the prefill kernel (checked by dynserve_kernels.aot)."""
    if _interpreting() if interpret is None else interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4)
    if dtype == torch.float32:  # FMA dots, operands in registers
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4 if d <= 64 else 8)
    if d <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4)
    return dict(BLOCK_M=64 if d <= 128 else 32, BLOCK_N=32, num_warps=4)


# a split covers at least this many positions: shorter ranges cost more in the merge than they save
MIN_SPLIT_LEN = 512


def decode_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int | None) -> int:
    """Splits per context for a decode step (flash-decoding): enough (sequence, kv head, split)
    programs for two per streaming multiprocessor, each split at least MIN_SPLIT_LEN positions; 1
    when the batch alone fills the device or `num_sms` is None (no CUDA device, the interpreter)."""
    programs = num_seqs * num_kv_heads
    if num_sms is None or programs <= 0 or programs >= num_sms:
        return 1
    return max(1, min(triton.cdiv(2 * num_sms, programs), max_seq_len // MIN_SPLIT_LEN))


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int | None:
    if _interpreting() or device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_attention_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    batch: AttentionMetadata,
    scale: float,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton version of `paged_attention_ref` (sinks [Hq] and sliding window included): q [T, Hq, D]
    -> [T, Hq, D] in q.dtype.

    Decode steps with few (sequence, kv head) programs for the device split each context into
    `num_splits` ranges of tiles (flash-decoding: `decode_splits` picks the count, None) computed in
    parallel and merged by log-sum-exp; 1 = one program per (sequence, kv head)."""
    T, hq, d = q.shape
    _, _, bs, hkv, dc = kv_cache.shape
    if dc != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(kv_cache.shape)}")
    if not kv_halves_dense(kv_cache):
        raise ValueError("kv_cache's K and V halves must each be contiguous")
    if q.dtype != kv_cache.dtype:
        raise TypeError(f"q dtype {q.dtype} != cache dtype {kv_cache.dtype}")
    if sinks is not None and sinks.shape != (hq,):
        raise ValueError(f"sinks {tuple(sinks.shape)} must have one logit per query head ({hq})")
    out = torch.empty(T, hq, d, dtype=q.dtype, device=q.device)  # [T, Hq, D]
    if T == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    g = hq // hkv
    B = batch.num_seqs
    device = q.device
    seq_lens = batch.seq_lens.to(device)  # [B]
    tables = batch.block_tables.to(device)  # [B, max_blocks]
    block_d = max(16, triton.next_power_of_2(d))
    upcast = _interpreting() and q.dtype == torch.bfloat16  # the interpreter's bf16 dot is wrong
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # no TF32 rounding for float32 inputs
    sinks_arg = out if sinks is None else sinks.to(device=device, dtype=torch.float32).contiguous()  # [Hq]
    common = dict(
        sinks_ptr=sinks_arg, window=max(int(window or 0), 0), HAS_SINKS=sinks is not None,
        qk_scale=scale * _LOG2E,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_bt=tables.stride(0), half_stride=kv_cache.stride(0), stride_blk=kv_cache.stride(1),
        stride_pos=kv_cache.stride(2), block_size=bs, G=g, D=d,
    )  # fmt: skip
    if batch.max_query_len == 1 and T == B:
        block_g = max(16, triton.next_power_of_2(g))
        cfg = decode_config(d, q.dtype)
        n_tiles = triton.cdiv(max(batch.max_seq_len, 1), cfg["BLOCK_N"])  # per sequence, at most
        sms = _num_sms(torch.device(device))
        splits = decode_splits(B, hkv, batch.max_seq_len, sms) if num_splits is None else int(num_splits)
        if splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {splits}")
        splits = min(splits, n_tiles)
        tiles_per_split = triton.cdiv(n_tiles, splits)
        splits = triton.cdiv(n_tiles, tiles_per_split)  # no split left without a tile
        if splits == 1:
            LAST_COMPILED["decode"] = _decode_kernel[(B, hkv)](
                q, kv_cache, out, tables, seq_lens, part_ptr=out, ml_ptr=out, tiles_per_split=n_tiles, **common,
                BLOCK_G=block_g, BLOCK_D=block_d, UPCAST=upcast, PRECISION=precision, SPLIT=False, **cfg,
            )  # fmt: skip
            return out
        part = torch.empty(B, hq, splits, d, dtype=torch.float32, device=device)  # [B, Hq, S, D] unnormalised
        ml = torch.empty(B, hq, splits, 2, dtype=torch.float32, device=device)  # [B, Hq, S, (max, sum)]
        LAST_COMPILED["decode_split"] = _decode_kernel[(B, hkv, splits)](
            q, kv_cache, out, tables, seq_lens, part_ptr=part, ml_ptr=ml, tiles_per_split=tiles_per_split, **common,
            BLOCK_G=block_g, BLOCK_D=block_d, UPCAST=upcast, PRECISION=precision, SPLIT=True, **cfg,
        )  # fmt: skip
        LAST_COMPILED["decode_merge"] = _decode_merge_kernel[(B, hq)](
            part, ml, out, sinks_arg, out.stride(0), out.stride(1), splits, d,
            BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d, HAS_SINKS=sinks is not None,
        )  # fmt: skip
        return out
    qsl = batch.query_start_loc.to(device)  # [B+1]
    cfg = prefill_config(d, q.dtype)
    grid = (triton.cdiv(batch.max_query_len, cfg["BLOCK_M"]), B, hq)
    LAST_COMPILED["prefill"] = _prefill_kernel[grid](
        q, kv_cache, out, tables, seq_lens, qsl, **common,
        BLOCK_D=block_d, UPCAST=upcast, PRECISION=precision, **cfg,
    )  # fmt: skip
    return out
