"""Paged attention and KV writes: torch reference and Triton kernels (compiled on a GPU, interpreter on
CPU: the `device` fixture) against a float64 loop over sequences, heads and query tokens, with
shuffled (non-contiguous) block tables."""

from __future__ import annotations

import dataclasses

import dynserve_kernels
import pytest
import torch
from kernel_utils import fill_prefix, make_batch, naive_attention, seq_slots

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

# (name, [(context length after the step, new tokens)], block size)
LAYOUTS = [
    ("decode", [(5, 1), (17, 1), (1, 1), (8, 1)], 4),
    ("prefill", [(9, 9), (5, 5), (1, 1)], 4),
    ("chunked_prefill", [(20, 4), (13, 7), (33, 16)], 8),
    ("mixed", [(9, 9), (20, 4), (3, 1), (8, 2)], 4),
    ("block_larger_than_seqs", [(3, 3), (6, 1)], 16),
]
HEADS = [(4, 4), (6, 2), (4, 1)]  # (Hq, Hkv): MHA, GQA, MQA


def _setup(seqs, bs, hq, hkv, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, num_blocks = make_batch(seqs, bs, seed=seed)
    kv_cache = torch.zeros(2, num_blocks, bs, hkv, d, dtype=dtype)  # [2, N, bs, Hkv, D]
    fill_prefix(kv_cache, batch, gen)
    T = batch.num_tokens
    key = torch.randn(T, hkv, d, generator=gen).to(dtype)
    value = torch.randn(T, hkv, d, generator=gen).to(dtype)
    q = torch.randn(T, hq, d, generator=gen).to(dtype)
    return batch, kv_cache, key, value, q


def _batch_on(batch, device: str):
    """The batch with its tensor fields on `device` (host-side lists stay as they are)."""
    moved = {
        f.name: v.to(device) for f in dataclasses.fields(batch) if isinstance(v := getattr(batch, f.name), torch.Tensor)
    }
    return dataclasses.replace(batch, **moved)


def _triton(q, key, value, kv_cache, batch, scale, device):
    """write_kv then paged_attention with the Triton backend on `device`; (out, kv_cache) back on CPU."""
    cache = kv_cache.to(device)
    dev_batch = _batch_on(batch, device)
    dynserve_kernels.write_kv(key.to(device), value.to(device), cache, dev_batch.slot_mapping, backend="triton")
    out = dynserve_kernels.paged_attention(q.to(device), cache, dev_batch, scale, backend="triton")
    return out.cpu(), cache.cpu()


def _check(out, ref, dtype):
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * max(ref.abs().max().item(), 1.0), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv", HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("name,seqs,bs", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_reference_matches_naive(name, seqs, bs, hq, hkv, dtype):
    batch, kv_cache, key, value, q = _setup(seqs, bs, hq, hkv, 8, dtype)
    dynserve_kernels.write_kv(key, value, kv_cache, batch.slot_mapping)
    scale = 8**-0.5
    out = dynserve_kernels.paged_attention(q, kv_cache, batch, scale)
    _check(out, naive_attention(q, kv_cache, batch, scale), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,seqs,bs", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_triton_matches_naive(name, seqs, bs, dtype, device):
    hq, hkv, d = 6, 2, 16
    batch, kv_cache, key, value, q = _setup(seqs, bs, hq, hkv, d, dtype, seed=1)
    out, kv_cache = _triton(q, key, value, kv_cache, batch, 0.3, device)
    _check(out, naive_attention(q, kv_cache, batch, 0.3), dtype)


def test_triton_head_dim_not_power_of_two_and_mqa(device):
    batch, kv_cache, key, value, q = _setup([(7, 3), (12, 1)], 4, 4, 1, 12, torch.float32, seed=2)
    out, kv_cache = _triton(q, key, value, kv_cache, batch, 0.25, device)
    _check(out, naive_attention(q, kv_cache, batch, 0.25), torch.float32)


def test_decode_attends_to_whole_context_only():
    # a decode query sees exactly its own sequence's cached positions: changing a K/V row past
    # seq_len or in another sequence's blocks leaves the output unchanged
    batch, kv_cache, key, value, q = _setup([(6, 1), (9, 1)], 4, 2, 2, 8, torch.float32)
    dynserve_kernels.write_kv(key, value, kv_cache, batch.slot_mapping)
    before = dynserve_kernels.paged_attention(q, kv_cache, batch, 0.5)
    slot_past_end = seq_slots(batch, 0, 8)[6:]  # positions 6, 7 of seq 0's second block
    kv_cache.view(2, -1, 2, 8)[:, slot_past_end] = 100.0
    after = dynserve_kernels.paged_attention(q, kv_cache, batch, 0.5)
    torch.testing.assert_close(after, before)
    # while changing a position inside the context does change it
    kv_cache.view(2, -1, 2, 8)[1, seq_slots(batch, 0, 1)] = 100.0
    assert not torch.allclose(dynserve_kernels.paged_attention(q, kv_cache, batch, 0.5)[0], before[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_empty_context_gives_zeros(dtype, device):
    # a padding row with seq_len 0 (e.g. CUDA-graph padding) has nothing to attend to: zeros, not NaN
    batch, kv_cache, key, value, q = _setup([(5, 1), (3, 1)], 4, 4, 2, 8, dtype)
    _, kv_cache = _triton(q, key, value, kv_cache, batch, 0.3, device)
    ref = naive_attention(q, kv_cache, batch, 0.3)
    batch.seq_lens[1] = 0
    dev_batch = _batch_on(batch, device)
    out = dynserve_kernels.paged_attention(q.to(device), kv_cache.to(device), dev_batch, 0.3, backend="triton").cpu()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    _check(out[:1], ref[:1], dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_write_kv_writes_only_its_slots(backend, device):
    batch, kv_cache, key, value, _ = _setup([(6, 3), (4, 4)], 4, 2, 2, 8, torch.bfloat16)
    before = kv_cache.clone()
    slots = batch.slot_mapping.clone()
    slots[1] = -1  # a padding token: not written
    dev = device if backend == "triton" else "cpu"
    cache = kv_cache.to(dev)
    dynserve_kernels.write_kv(key.to(dev), value.to(dev), cache, slots.to(dev), backend=backend)
    kv_cache = cache.cpu()
    flat, flat_before = kv_cache.view(2, -1, 2, 8), before.view(2, -1, 2, 8)
    written = slots[slots >= 0]
    assert torch.equal(flat[0, written], key[slots >= 0])
    assert torch.equal(flat[1, written], value[slots >= 0])
    untouched = torch.ones(flat.shape[1], dtype=torch.bool)
    untouched[written] = False
    assert torch.equal(flat[:, untouched], flat_before[:, untouched])


def test_write_kv_strided_key_from_fused_projection(device):
    # key/value as slices of a fused qkv output (rows strided, heads dense)
    batch, kv_cache, _, _, _ = _setup([(5, 5)], 4, 2, 2, 8, torch.float32)
    qkv = torch.randn(5, 48)
    key = qkv[:, 16:32].view(5, 2, 8)
    value = qkv[:, 32:48].view(5, 2, 8)
    ref = kv_cache.clone()
    dynserve_kernels.write_kv(key, value, ref, batch.slot_mapping)
    qkv_d = qkv.to(device)
    cache = kv_cache.to(device)
    dynserve_kernels.write_kv(
        qkv_d[:, 16:32].view(5, 2, 8), qkv_d[:, 32:48].view(5, 2, 8), cache, batch.slot_mapping.to(device), "triton"
    )
    assert torch.equal(cache.cpu(), ref)


def test_reference_decode_path_equals_sequence_loop():
    # the vectorised decode path and the per-sequence path agree on the same decode batch
    batch, kv_cache, key, value, q = _setup([(5, 1), (17, 1), (2, 1)], 4, 4, 2, 8, torch.float32)
    dynserve_kernels.write_kv(key, value, kv_cache, batch.slot_mapping)
    vec = dynserve_kernels.paged_attention(q, kv_cache, batch, 0.3)
    batch.max_query_len = 2  # forces the loop path (the layout is unchanged)
    loop = dynserve_kernels.paged_attention(q, kv_cache, batch, 0.3)
    torch.testing.assert_close(vec, loop)


def test_reference_inside_and_outside_inference_mode():
    # the reference reuses gather buffers across calls; one made under inference_mode must not be
    # written outside it (an error), nor the other way round
    batch, kv_cache, key, value, q = _setup([(9, 1), (20, 1)], 4, 4, 2, 8, torch.float32)
    dynserve_kernels.write_kv(key, value, kv_cache, batch.slot_mapping)
    with torch.inference_mode():
        a = dynserve_kernels.paged_attention(q, kv_cache, batch, 0.3)
    b = dynserve_kernels.paged_attention(q, kv_cache, batch, 0.3)
    with torch.inference_mode():
        c = dynserve_kernels.paged_attention(q, kv_cache, batch, 0.3)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,seqs,bs", LAYOUTS[:4], ids=[c[0] for c in LAYOUTS[:4]])
@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_shared_kv_halves(name, seqs, bs, dtype, backend, device):
    """A cache whose K and V halves are one tensor (stride 0: MLA's latent cache, K = V = the latent
    row): every backend writes it once and attends with V = K, as the naive loop over a copy does."""
    dev = device if backend == "triton" else "cpu"
    hq, d = 6, 24
    batch, kv_cache, key, _, q = _setup(seqs, bs, hq, 1, d, dtype)
    latent = kv_cache[1:2].clone().to(dev)  # [1, N, bs, 1, D]: the storage
    shared = latent.expand(2, *latent.shape[1:])  # [2, N, bs, 1, D], stride(0) == 0
    dev_batch = _batch_on(batch, dev)
    dynserve_kernels.write_kv(key.to(dev), key.to(dev), shared, dev_batch.slot_mapping, backend=backend)
    out = dynserve_kernels.paged_attention(q.to(dev), shared, dev_batch, d**-0.5, backend=backend).cpu()
    assert torch.equal(latent[0].cpu().view(-1, d)[batch.slot_mapping], key.view(-1, d))
    ref = naive_attention(q, shared.cpu().contiguous(), batch, d**-0.5)
    _check(out, ref, dtype)


# ------------------------------------------------------------------ gpt-oss: attention sinks, sliding window

# (name, sinks?, window): windows smaller than some contexts (and than a prefill chunk), equal to one,
# larger than every context (= full attention), and 1 (each query sees only itself)
SINK_WINDOW = [
    ("sinks", True, None),
    ("window5", False, 5),
    ("sinks_window3", True, 3),
    ("sinks_window1", True, 1),
    ("sinks_window_larger", True, 64),
]
# odd sizes: contexts that are not block multiples, a chunk longer than the window, odd heads/head dim
ODD_SEQS = [(21, 9), (7, 1), (13, 13), (30, 1), (3, 2)]


def _sinks(hq: int, seed: int) -> torch.Tensor:
    return torch.randn(hq, generator=torch.Generator().manual_seed(seed)) * 2.0  # [Hq] float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,seqs,bs", [*LAYOUTS, ("odd", ODD_SEQS, 4)], ids=[c[0] for c in LAYOUTS] + ["odd"])
@pytest.mark.parametrize("label,with_sinks,window", SINK_WINDOW, ids=[c[0] for c in SINK_WINDOW])
def test_reference_sinks_and_window_match_naive(label, with_sinks, window, name, seqs, bs, dtype):
    hq, hkv, d = 6, 2, 12
    batch, kv_cache, key, value, q = _setup(seqs, bs, hq, hkv, d, dtype, seed=3)
    dynserve_kernels.write_kv(key, value, kv_cache, batch.slot_mapping)
    sinks = _sinks(hq, 4) if with_sinks else None
    out = dynserve_kernels.paged_attention(q, kv_cache, batch, 0.3, sinks=sinks, window=window)
    _check(out, naive_attention(q, kv_cache, batch, 0.3, sinks, window), dtype)


TRITON_SINK_WINDOW = [c for c in SINK_WINDOW if c[0] != "sinks_window1"]  # the interpreter is slow
TRITON_LAYOUTS = [LAYOUTS[0], LAYOUTS[2], ("odd", ODD_SEQS, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,seqs,bs", TRITON_LAYOUTS, ids=[c[0] for c in TRITON_LAYOUTS])
@pytest.mark.parametrize("label,with_sinks,window", TRITON_SINK_WINDOW, ids=[c[0] for c in TRITON_SINK_WINDOW])
def test_triton_sinks_and_window_match_naive(label, with_sinks, window, name, seqs, bs, dtype, device):
    hq, hkv, d = 6, 2, 12  # head dim not a power of two
    batch, kv_cache, key, value, q = _setup(seqs, bs, hq, hkv, d, dtype, seed=5)
    sinks = _sinks(hq, 6) if with_sinks else None
    cache = kv_cache.to(device)
    dev_batch = _batch_on(batch, device)
    dynserve_kernels.write_kv(key.to(device), value.to(device), cache, dev_batch.slot_mapping, backend="triton")
    dev_sinks = None if sinks is None else sinks.to(device)
    out = dynserve_kernels.paged_attention(q.to(device), cache, dev_batch, 0.3, "triton", dev_sinks, window).cpu()
    _check(out, naive_attention(q, cache.cpu(), batch, 0.3, sinks, window), dtype)


def test_defaults_are_todays_attention_exactly():
    # sinks=None, window=None/0 take the unchanged paths: bit-identical outputs
    batch, kv_cache, key, value, q = _setup([(9, 9), (20, 4), (3, 1)], 4, 4, 2, 8, torch.float32)
    dynserve_kernels.write_kv(key, value, kv_cache, batch.slot_mapping)
    base = dynserve_kernels.paged_attention(q, kv_cache, batch, 0.3)
    assert torch.equal(dynserve_kernels.paged_attention(q, kv_cache, batch, 0.3, sinks=None, window=0), base)
    # a window at least as long as every context and a sink of -inf change nothing but the path
    wide = dynserve_kernels.paged_attention(q, kv_cache, batch, 0.3, sinks=torch.full((4,), -torch.inf), window=64)
    torch.testing.assert_close(wide, base, atol=1e-6, rtol=1e-5)


def test_window_hides_positions_before_it():
    # with window W, changing K/V of a position older than W leaves a decode query's output unchanged
    batch, kv_cache, key, value, q = _setup([(10, 1)], 4, 2, 2, 8, torch.float32)
    dynserve_kernels.write_kv(key, value, kv_cache, batch.slot_mapping)
    before = dynserve_kernels.paged_attention(q, kv_cache, batch, 0.5, window=4)
    kv_cache.view(2, -1, 2, 8)[:, seq_slots(batch, 0, 6)] = 100.0  # positions 0..5: outside 6..9
    after = dynserve_kernels.paged_attention(q, kv_cache, batch, 0.5, window=4)
    torch.testing.assert_close(after, before)
    kv_cache.view(2, -1, 2, 8)[1, seq_slots(batch, 0, 7)[6:]] = 100.0  # position 6: inside
    assert not torch.allclose(dynserve_kernels.paged_attention(q, kv_cache, batch, 0.5, window=4), before)


# split-K decode (flash-decoding): contexts that are not tile multiples, one shorter than a tile, one
# empty (a padding row), splits that leave a sequence's later ranges empty
SPLIT_SEQS = [(70, 1), (33, 1), (5, 1), (1, 1), (48, 1)]


def _triton_decode_split(q, kv_cache, batch, device, splits, sinks=None, window=None):
    from dynserve_kernels.attention_triton import paged_attention_triton

    dev_sinks = None if sinks is None else sinks.to(device)
    return paged_attention_triton(
        q.to(device), kv_cache.to(device), _batch_on(batch, device), 0.3, dev_sinks, window, num_splits=splits
    ).cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [2, 3, 64])
@pytest.mark.parametrize(
    "label,with_sinks,window", [("plain", False, None), ("sinks_window9", True, 9)], ids=["plain", "sinks_window9"]
)
def test_triton_split_decode_matches_naive(label, with_sinks, window, splits, dtype, device):
    hq, hkv, d = 6, 2, 12
    batch, kv_cache, key, value, q = _setup(SPLIT_SEQS, 4, hq, hkv, d, dtype, seed=7)
    dynserve_kernels.write_kv(key, value, kv_cache, batch.slot_mapping)
    sinks = _sinks(hq, 8) if with_sinks else None
    out = _triton_decode_split(q, kv_cache, batch, device, splits, sinks, window)
    _check(out, naive_attention(q, kv_cache, batch, 0.3, sinks, window), dtype)
    # the split is an implementation detail: one program per (sequence, kv head) gives the same result
    whole = _triton_decode_split(q, kv_cache, batch, device, 1, sinks, window)
    torch.testing.assert_close(out.float(), whole.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("with_sinks", [False, True])
def test_triton_split_decode_empty_context_gives_zeros(with_sinks, device):
    batch, kv_cache, key, value, q = _setup([(40, 1), (30, 1)], 4, 4, 2, 8, torch.float32, seed=9)
    dynserve_kernels.write_kv(key, value, kv_cache, batch.slot_mapping)
    sinks = _sinks(4, 10) if with_sinks else None
    ref = naive_attention(q, kv_cache, batch, 0.3, sinks)
    batch.seq_lens[1] = 0
    out = _triton_decode_split(q, kv_cache, batch, device, 4, sinks)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    _check(out[:1], ref[:1], torch.float32)


def test_decode_splits_policy():
    from dynserve_kernels.attention_triton import MIN_SPLIT_LEN, decode_splits

    # batch 1, 8 kv heads, 32K context on 132 SMs: 33 splits (2 programs per SM), each >= MIN_SPLIT_LEN
    assert decode_splits(1, 8, 32768, 132) == 33
    assert decode_splits(1, 8, 4 * MIN_SPLIT_LEN, 132) == 4  # short contexts: capped by the split length
    assert decode_splits(1, 8, MIN_SPLIT_LEN - 1, 132) == 1
    assert decode_splits(64, 8, 32768, 132) == 1  # the batch alone fills the device
    assert decode_splits(1, 8, 32768, None) == 1  # no CUDA device (the interpreter)
    batch, kv_cache, key, value, q = _setup([(5, 1)], 4, 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="num_splits"):
        _triton_decode_split(q, kv_cache, batch, "cpu", 0)
