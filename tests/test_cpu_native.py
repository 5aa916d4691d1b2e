"""Native CPU kernels (kernels/csrc/cpu_kernels.c) against the torch reference and a float64 loop,
plus the "cpu" backend's dispatch and its fallback to the torch references."""

from __future__ import annotations

import dynserve_kernels
import pytest
import torch
from dynserve_kernels import cpu_native
from dynserve_kernels.attention_ref import paged_attention_ref
from dynserve_kernels.moe_ref import dense_moe_reference, fused_moe_ref
from kernel_utils import fill_prefix, make_assignment, make_batch, naive_attention

pytestmark = pytest.mark.skipif(
    not cpu_native.available(), reason=f"no native build: {cpu_native.unavailable_reason()}"
)

# (context lengths after the step, block size, Hq, Hkv, D)
DECODE_CASES = [
    ([5, 17, 1, 8], 4, 4, 4, 8),  # MHA, a length-1 sequence, lengths not multiples of the block
    ([33, 2, 16], 16, 6, 2, 16),  # GQA, exactly one full block
    ([9, 40, 3], 8, 4, 1, 24),  # MQA, odd head dim
    ([1], 1, 2, 2, 5),  # block size 1, head dim 5
    ([300, 7, 129, 64, 1, 250], 16, 8, 4, 64),  # the bench model's shape, long contexts
    ([130] * 33, 16, 12, 3, 40),  # many sequences (threads), G = 4
]


def _decode_setup(lens, bs, hq, hkv, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, num_blocks = make_batch([(n, 1) for n in lens], bs, seed=seed)
    kv_cache = torch.zeros(2, num_blocks, bs, hkv, d)  # [2, N, bs, Hkv, D]
    fill_prefix(kv_cache, batch, gen)
    T = batch.num_tokens
    key, value = torch.randn(T, hkv, d, generator=gen), torch.randn(T, hkv, d, generator=gen)
    dynserve_kernels.write_kv(key, value, kv_cache, batch.slot_mapping)
    q = torch.randn(T, hq, d, generator=gen) * 2  # [B, Hq, D]; larger scores exercise the softmax
    return batch, kv_cache, q


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("lens,bs,hq,hkv,d", DECODE_CASES, ids=[f"case{i}" for i in range(len(DECODE_CASES))])
def test_native_decode_matches_reference(lens, bs, hq, hkv, d, threads):
    batch, kv_cache, q = _decode_setup(lens, bs, hq, hkv, d)
    scale = d**-0.5
    out = cpu_native.paged_decode_attention(q, kv_cache, batch.block_tables, batch.seq_lens, scale, threads)
    ref = paged_attention_ref(q, kv_cache, batch, scale)
    truth = naive_attention(q, kv_cache, batch, scale)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert (out.double() - truth).abs().max().item() <= 1e-5 * max(truth.abs().max().item(), 1.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lens,hq,hkv,sinks,window",
    [([40], 8, 4, False, None), ([130], 16, 2, True, None), ([70, 9], 8, 2, False, 16), ([25], 12, 3, True, 7),
     ([33], 6, 3, False, None), ([3], 8, 4, True, None)],
)  # fmt: skip
def test_native_decode_splits_heads_when_sequences_are_fewer_than_threads(lens, hq, hkv, sinks, window, dtype):
    """Fewer sequences than threads (batch-1 decode): each sequence's query heads are split over the
    threads in groups of four (not split: 6 query heads over 3 KV heads); the result equals the
    one-thread run's bit for bit, and the reference's."""
    batch, kv_cache, q = _decode_setup(lens, 8, hq, hkv, 16)
    q, kv_cache = q.to(dtype), kv_cache.to(dtype)
    sk = torch.randn(hq, generator=torch.Generator().manual_seed(3)) if sinks else None
    args = (q, kv_cache, batch.block_tables, batch.seq_lens, 0.25)
    outs = [cpu_native.paged_decode_attention(*args, n, sinks=sk, window=window) for n in (1, 2, 4, 8)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    ref = paged_attention_ref(q, kv_cache, batch, 0.25, sk, window)
    assert _rel_err(outs[0], ref) <= (1e-5 if dtype == torch.float32 else BF16_TOL["attention"])


def test_native_decode_extreme_scores():
    # a score gap of ~1e4 would overflow a softmax without max subtraction; a tied max gives 1/2 each
    batch, kv_cache, q = _decode_setup([20, 3], 4, 2, 2, 8)
    q.mul_(500.0)
    out = cpu_native.paged_decode_attention(q, kv_cache, batch.block_tables, batch.seq_lens, 8**-0.5)
    assert torch.isfinite(out).all()
    truth = naive_attention(q, kv_cache, batch, 8**-0.5)
    assert (out.double() - truth).abs().max().item() <= 1e-4 * max(truth.abs().max().item(), 1.0)


def test_native_decode_rejects_bad_input():
    batch, kv_cache, q = _decode_setup([5, 6], 4, 4, 2, 8)
    with pytest.raises(ValueError, match="float32"):
        cpu_native.paged_decode_attention(q.double(), kv_cache, batch.block_tables, batch.seq_lens, 0.3)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_native.paged_decode_attention(q[:, :3], kv_cache, batch.block_tables, batch.seq_lens, 0.3)
    with pytest.raises(ValueError, match="longer than its block table"):
        cpu_native.paged_decode_attention(q, kv_cache, batch.block_tables, batch.seq_lens + 100, 0.3)
    bad_table = batch.block_tables.clone()
    bad_table[0, 0] = kv_cache.shape[1]  # one past the pool: would read out of bounds
    with pytest.raises(ValueError, match="block table entries must lie in"):
        cpu_native.paged_decode_attention(q, kv_cache, bad_table, batch.seq_lens, 0.3)
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.cat([kv_cache, kv_cache], dim=-1)[..., ::2]  # same shape, not contiguous
        cpu_native.paged_decode_attention(q, strided, batch.block_tables, batch.seq_lens, 0.3)


def test_cpu_backend_uses_native_decode_and_reference_elsewhere(monkeypatch):
    calls = []
    real = cpu_native.paged_decode_attention
    monkeypatch.setattr(cpu_native, "paged_decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch, kv_cache, q = _decode_setup([9, 4, 30], 4, 4, 2, 8)
    out = dynserve_kernels.paged_attention(q, kv_cache, batch, 0.3, backend="cpu")
    assert calls == [1]
    torch.testing.assert_close(out, paged_attention_ref(q, kv_cache, batch, 0.3), atol=1e-5, rtol=1e-5)
    # a prefill batch and a float16 cache go to the torch reference
    pre, kv_pre = make_batch([(6, 6), (3, 3)], 4)
    kv = torch.randn(2, kv_pre, 4, 2, 8)
    qp = torch.randn(9, 4, 8)
    torch.testing.assert_close(
        dynserve_kernels.paged_attention(qp, kv, pre, 0.3, backend="cpu"), paged_attention_ref(qp, kv, pre, 0.3)
    )
    dynserve_kernels.paged_attention(q.half(), kv_cache.half(), batch, 0.3, backend="cpu")
    assert calls == [1]


def test_select_backend(monkeypatch):
    monkeypatch.delenv("DYNSERVE_KERNEL_BACKEND", raising=False)
    assert dynserve_kernels.select_backend("cpu") == "cpu"
    assert dynserve_kernels.select_backend("cpu", use_triton=True) == "triton"
    assert dynserve_kernels.select_backend("cuda") == "triton"
    assert dynserve_kernels.select_backend("cuda", use_triton=False) == "torch"
    monkeypatch.setenv("DYNSERVE_KERNEL_BACKEND", "torch")
    assert dynserve_kernels.select_backend("cpu") == "torch"
    monkeypatch.setenv("DYNSERVE_KERNEL_BACKEND", "cuda-graphs")
    with pytest.raises(ValueError, match="expected one of"):
        dynserve_kernels.select_backend("cpu")


def test_no_compiler_falls_back_to_torch(tmp_path):
    # a fresh process with no usable compiler and an empty kernel cache: the engine still generates,
    # through the torch references, the same greedy tokens as with the native kernels
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json; from dynserve import LLM, SamplingParams; from dynserve_kernels import cpu_native; "
        "llm = LLM(max_num_seqs=4); "
        "outs = llm.generate(['def f(x):', 'import os'], SamplingParams(temperature=0, max_tokens=12)); "
        "print(json.dumps([cpu_native.available(), cpu_native.unavailable_reason(), "
        "[o.outputs[0].token_ids for o in outs]]))"
    )
    results = []
    for cc in ("/nonexistent/cc", os.environ.get("CC", "cc")):
        env = dict(os.environ, CC=cc, DYNSERVE_CACHE_DIR=str(tmp_path / "cache"))
        env.pop("DYNSERVE_KERNEL_BACKEND", None)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    (avail0, reason0, toks0), (avail1, reason1, toks1) = results
    assert not avail0 and "no C compiler" in reason0
    assert avail1 and reason1 is None
    assert toks0 == toks1 and all(len(t) == 12 for t in toks0)


# (name, experts per token, num experts, restrict to these experts, H, I)
MOE_CASES = [
    ("mixed_k_odd_dims", [0, 1, 5, 2, 3, 0, 1, 4], 5, None, 40, 24),
    ("one_token_all_experts", [4], 4, None, 64, 32),
    ("all_on_one_expert_many_rows", [1] * 23, 4, [2], 48, 40),  # 23 rows: tiles of 4 plus a remainder
    ("idle_experts", [2, 1, 2, 0, 2, 1, 2, 2, 1], 6, [0, 3, 5], 17, 9),  # H, I not multiples of 8
    ("all_zero_k", [0, 0, 0], 3, None, 16, 8),
    ("decode_batch", [2] * 64, 8, None, 512, 256),  # the bench model's routing, smaller FFN
    ("tiny_dims", [1, 2, 1], 3, None, 3, 1),
]


def _moe_problem(ks, E, experts, H, inter, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = make_assignment(ks, E, gen, experts)
    x = torch.randn(len(ks), H, generator=gen)  # [T, H]
    w13 = torch.randn(E, 2 * inter, H, generator=gen) * H**-0.5  # [E, 2I, H]
    w2 = torch.randn(E, H, inter, generator=gen) * inter**-0.5  # [E, H, I]
    return x, w13, w2, a


def _native_moe(x, w13, w2, a, threads=None):
    return cpu_native.fused_moe(x, w13, w2, a.token_ids, a.expert_ids, a.weights, a.token_offsets, threads)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("name,ks,E,experts,H,inter", MOE_CASES, ids=[c[0] for c in MOE_CASES])
def test_native_moe_matches_reference(name, ks, E, experts, H, inter, threads):
    x, w13, w2, a = _moe_problem(ks, E, experts, H, inter)
    out = _native_moe(x, w13, w2, a, threads)
    ref = fused_moe_ref(x, w13, w2, a)
    dense = dense_moe_reference(x, w13, w2, a)
    assert out.shape == ref.shape and out.dtype == torch.float32
    scale = max(dense.abs().max().item(), 1.0)
    assert (out - dense).abs().max().item() <= 1e-5 * scale
    assert (out - ref).abs().max().item() <= 1e-5 * scale
    zero_k = torch.tensor(ks) == 0
    assert (out[zero_k] == 0).all()  # tokens with no expert get exactly zero


def test_native_moe_idle_experts_are_never_read():
    x, w13, w2, a = _moe_problem([1, 2, 1, 0, 2], 5, [1, 3], 24, 16)
    for e in (0, 2, 4):
        w13[e] = float("nan")
        w2[e] = float("nan")
    out = _native_moe(x, w13, w2, a)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, dense_moe_reference(x, w13.nan_to_num(), w2.nan_to_num(), a), atol=1e-5, rtol=0)


def test_native_moe_same_result_for_any_thread_count():
    x, w13, w2, a = _moe_problem([2] * 40, 8, None, 64, 48)
    outs = [_native_moe(x, w13, w2, a, n) for n in (1, 2, 4)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ks,experts", [([1], [3]), ([1, 1, 0, 1], [5]), ([2, 1], [0, 6])])
def test_native_moe_with_fewer_experts_than_threads_splits_rows_and_matches(ks, experts, dtype):
    """Fewer active experts than threads (batch 1 at k=1): the experts run in turn with each GEMM's
    rows split over the threads; the result equals the one-thread schedule bit for bit."""
    x, w13, w2, a = _moe_problem(ks, 8, experts, 72, 200)  # 2I = 400, H = 72 rows to split
    x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
    outs = [_native_moe(x, w13, w2, a, n) for n in (1, 2, 3, 8)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[0].float(), fused_moe_ref(x, w13, w2, a).float(), atol=tol, rtol=tol)


def test_native_moe_rejects_bad_input():
    x, w13, w2, a = _moe_problem([1, 2], 3, None, 16, 8)
    with pytest.raises(ValueError, match="float32"):
        _native_moe(x.double(), w13, w2, a)
    with pytest.raises(ValueError, match="shape mismatch"):
        _native_moe(x[:, :8], w13, w2, a)
    with pytest.raises(ValueError, match="contiguous"):
        _native_moe(x, w13.transpose(1, 2).contiguous().transpose(1, 2), w2, a)
    bad = a.expert_ids.clone()
    bad[0] = 3
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 3\)"):
        cpu_native.fused_moe(x, w13, w2, a.token_ids, bad, a.weights, a.token_offsets)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 2\)"):
        cpu_native.fused_moe(x, w13, w2, a.token_ids + 1, a.expert_ids, a.weights, a.token_offsets)
    with pytest.raises(ValueError, match="token_offsets must rise"):
        cpu_native.fused_moe(x, w13, w2, a.token_ids, a.expert_ids, a.weights, a.token_offsets.flip(0))


def test_cpu_backend_moe_dispatch(monkeypatch):
    calls = []
    real = cpu_native.fused_moe
    monkeypatch.setattr(cpu_native, "fused_moe", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w13, w2, a = _moe_problem([2] * 10, 4, None, 32, 16)
    torch.testing.assert_close(
        dynserve_kernels.fused_moe(x, w13, w2, a, backend="cpu"), fused_moe_ref(x, w13, w2, a), atol=1e-5, rtol=0
    )
    assert calls == [1]
    # more rows on one expert than the native kernel takes (prefill-sized) go to the reference
    n = cpu_native.NATIVE_MOE_MAX_ROWS + 1
    x, w13, w2, a = _moe_problem([1] * n, 4, [1], 16, 8)
    torch.testing.assert_close(
        dynserve_kernels.fused_moe(x, w13, w2, a, backend="cpu"), fused_moe_ref(x, w13, w2, a), atol=1e-5, rtol=0
    )
    assert calls == [1]
    dynserve_kernels.fused_moe(x.half(), w13.half(), w2.half(), a, backend="cpu")  # float16: the reference
    assert calls == [1]
    dynserve_kernels.fused_moe(x.bfloat16(), w13.bfloat16(), w2.bfloat16(), a, backend="cpu")  # no row limit
    assert calls == [1, 1]


@pytest.mark.parametrize(
    "m,k,n",
    [(1, 8, 1), (5, 17, 7), (16, 512, 96), (13, 64, 300), (4, 1024, 5), (0, 8, 3), (7, 40, 1001), (9, 1024, 203)],
)
def test_native_gemm_matches_torch(m, k, n):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    for threads in (1, 3):
        torch.testing.assert_close(cpu_native.gemm_nt(x, w, threads), x @ w.T, atol=1e-4 * k**0.5, rtol=1e-5)


def test_cpu_backend_linear(monkeypatch):
    calls = []
    real = cpu_native.gemm_nt
    monkeypatch.setattr(cpu_native, "gemm_nt", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(37, 21, generator=gen), torch.randn(37, generator=gen)
    for rows, native in (
        (1, True),
        (cpu_native.NATIVE_LINEAR_MAX_ROWS, True),
        (cpu_native.NATIVE_LINEAR_MAX_ROWS + 1, False),
    ):
        x = torch.randn(rows, 21, generator=gen)
        calls.clear()
        for bias in (None, b):
            out = dynserve_kernels.linear(x, w, bias, backend="cpu")
            torch.testing.assert_close(out, torch.nn.functional.linear(x, w, bias), atol=1e-5, rtol=1e-5)
        assert bool(calls) == native
    calls.clear()
    dynserve_kernels.linear(torch.randn(3, 21), w, b, backend="torch")
    dynserve_kernels.linear(torch.randn(3, 21).double(), w.double(), None, backend="cpu")
    assert not calls


def test_model_linears_follow_the_backend(checkpoint_factory):
    from dynserve.config import EngineConfig
    from dynserve.model.layers import Linear
    from dynserve.model.loader import load_model

    path = checkpoint_factory("mixtral")
    for use_triton, want in ((None, "cpu"), (True, "triton")):
        model = load_model(EngineConfig.create(str(path), use_triton=use_triton))
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        assert linears and {m.backend for m in linears} == {want}


def test_kernel_source_ships_in_the_package():
    # a non-editable install (the Docker images) must carry the C source that cpu_native compiles
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    kernels_dir = root / cfg["package-dir"]["dynserve_kernels"]
    patterns = cfg["package-data"]["dynserve_kernels"]
    rel = cpu_native._SRC.relative_to(kernels_dir).as_posix()
    assert any(fnmatch.fnmatch(rel, p) for p in patterns)


def test_portable_build_without_simd_flags(tmp_path, monkeypatch):
    # built without -march (no AVX2 on x86-64's baseline; any other ISA), the kernels take their
    # portable C paths and still match the references
    lib = cpu_native.build_library(["-O2", "-fopenmp", "-shared", "-fPIC"], tmp_path)
    monkeypatch.setattr(cpu_native, "_lib", lib)
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(7, 40, generator=gen), torch.randn(29, 40, generator=gen)
    torch.testing.assert_close(cpu_native.gemm_nt(x, w, 2), x @ w.T, atol=1e-4, rtol=1e-5)
    xm, w13, w2, a = _moe_problem([0, 1, 5, 2, 3, 0, 1, 4], 5, None, 40, 24)
    torch.testing.assert_close(_native_moe(xm, w13, w2, a), fused_moe_ref(xm, w13, w2, a), atol=1e-5, rtol=1e-5)
    batch, kv_cache, q = _decode_setup([9, 40, 3], 8, 4, 1, 24)
    out = cpu_native.paged_decode_attention(q, kv_cache, batch.block_tables, batch.seq_lens, 0.2)
    torch.testing.assert_close(out, paged_attention_ref(q, kv_cache, batch, 0.2), atol=1e-5, rtol=1e-5)


def test_cpu_moe_falls_back_for_layouts_the_kernel_does_not_take():
    x, w13, w2, a = _moe_problem([2] * 6, 4, None, 32, 16)
    ref = fused_moe_ref(x, w13, w2, a)
    strided = w13.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    out = dynserve_kernels.fused_moe(x, strided, w2, a, backend="cpu")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_reference_gathers_are_per_thread():
    # two threads running the torch reference at once (two engines in one process) must not share
    # gather buffers
    import threading

    problems = [_decode_setup([40, 7, 23], 4, 4, 2, 8, seed=s) for s in (1, 2)]
    # a prefill layout goes through the per-sequence gathers
    pre, n_blocks = make_batch([(30, 30), (17, 17)], 4, seed=5)
    kv = torch.randn(2, n_blocks, 4, 2, 8)
    qp = torch.randn(47, 4, 8)
    expected = [paged_attention_ref(qp, kv, pre, 0.3)] + [paged_attention_ref(q, c, b, 0.3) for b, c, q in problems]
    errors = []

    def work(k):
        for _ in range(60):
            got = [paged_attention_ref(qp, kv, pre, 0.3)] + [paged_attention_ref(q, c, b, 0.3) for b, c, q in problems]
            if not all(torch.equal(g, e) for g, e in zip(got, expected, strict=True)):
                errors.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ------------------------------------------------------------------------------------------------
# bfloat16: the kernels round where torch's bfloat16 ops round (GEMM and MoE outputs match the torch
# references to the last bit but for float32 summation order); tolerances as in test_kernels_*.py

BF16_TOL = {"moe": 3e-2, "attention": 2e-2}  # relative to max |reference|, as tests/test_kernels_*.py


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if not out.numel():
        return 0.0
    return (out.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1.0)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("lens,bs,hq,hkv,d", DECODE_CASES, ids=[f"case{i}" for i in range(len(DECODE_CASES))])
def test_native_decode_bf16_matches_reference(lens, bs, hq, hkv, d, threads):
    batch, kv_cache, q = _decode_setup(lens, bs, hq, hkv, d)
    q, kv_cache = q.bfloat16(), kv_cache.bfloat16()
    out = cpu_native.paged_decode_attention(q, kv_cache, batch.block_tables, batch.seq_lens, d**-0.5, threads)
    ref = paged_attention_ref(q, kv_cache, batch, d**-0.5)  # torch's bfloat16 SDPA
    truth = naive_attention(q.float(), kv_cache.float(), batch, d**-0.5)  # float64 on the same inputs
    assert out.dtype == torch.bfloat16
    assert _rel_err(out, ref) <= BF16_TOL["attention"]
    assert (out.double() - truth).abs().max().item() <= BF16_TOL["attention"] * max(truth.abs().max().item(), 1.0)


def test_native_decode_bf16_zero_length_sequence_gets_zeros():
    batch, kv_cache, q = _decode_setup([5, 9], 4, 4, 2, 8)
    lens = batch.seq_lens.clone()
    lens[1] = 0
    out = cpu_native.paged_decode_attention(q.bfloat16(), kv_cache.bfloat16(), batch.block_tables, lens, 0.3)
    assert (out[1] == 0).all() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("name,ks,E,experts,H,inter", MOE_CASES, ids=[c[0] for c in MOE_CASES])
def test_native_moe_bf16_matches_reference(name, ks, E, experts, H, inter, threads):
    x, w13, w2, a = (t.bfloat16() if isinstance(t, torch.Tensor) else t for t in _moe_problem(ks, E, experts, H, inter))
    out = _native_moe(x, w13, w2, a, threads)
    ref = fused_moe_ref(x, w13, w2, a)  # bfloat16 GEMMs and SiLU, float32 combine
    assert out.dtype == torch.bfloat16
    assert _rel_err(out, ref) <= BF16_TOL["moe"]
    assert _rel_err(out, dense_moe_reference(x, w13, w2, a)) <= BF16_TOL["moe"]
    assert (out != ref).sum().item() <= 0.01 * out.numel()  # the same roundings: (nearly) all bits equal
    zero_k = torch.tensor(ks) == 0
    assert (out[zero_k] == 0).all()  # tokens with no expert get exactly zero


def test_native_moe_bf16_same_result_for_any_thread_count_and_skips_idle_experts():
    x, w13, w2, a = _moe_problem([2, 1, 0, 2] * 10, 8, [0, 2, 3, 6], 64, 48)
    x, w13, w2 = x.bfloat16(), w13.bfloat16(), w2.bfloat16()
    for e in (1, 4, 5, 7):  # experts no token chose: never read
        w13[e] = float("nan")
        w2[e] = float("nan")
    outs = [_native_moe(x, w13, w2, a, n) for n in (1, 2, 4)]
    assert torch.isfinite(outs[0].float()).all()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize(
    "m,k,n",
    [(1, 8, 1), (5, 17, 7), (16, 512, 96), (13, 64, 300), (4, 1024, 5), (0, 8, 3), (7, 40, 1001), (9, 1024, 203)],
)
def test_native_gemm_bf16_matches_torch(m, k, n):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    x, w = torch.randn(m, k, generator=gen).bfloat16(), torch.randn(n, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16()
    for threads in (1, 3):
        for bias in (None, b):
            out = cpu_native.gemm_nt(x, w, threads, bias=bias)
            ref = torch.nn.functional.linear(x, w, bias)  # float32 accumulation, one rounding
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out, ref, atol=1e-2 * k**0.5, rtol=1e-2)
            assert (out != ref).sum().item() <= 0.01 * out.numel()  # one rounding, as torch's


def test_bf16_kernels_reject_mixed_dtypes():
    x, w13, w2, a = _moe_problem([1, 2], 3, None, 16, 8)
    with pytest.raises(ValueError, match="share one dtype"):
        _native_moe(x.bfloat16(), w13, w2.bfloat16(), a)
    with pytest.raises(ValueError, match="share one dtype"):
        cpu_native.gemm_nt(x.bfloat16(), w13[0])
    batch, kv_cache, q = _decode_setup([5, 6], 4, 4, 2, 8)
    with pytest.raises(ValueError, match="share one dtype"):
        cpu_native.paged_decode_attention(q.bfloat16(), kv_cache, batch.block_tables, batch.seq_lens, 0.3)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu_native.gemm_nt(x.half(), w13[0].half())


def test_cpu_backend_dispatches_bf16_and_leaves_float16_to_torch(monkeypatch):
    calls = []
    for name in ("gemm_nt", "fused_moe", "paged_decode_attention"):
        real = getattr(cpu_native, name)
        monkeypatch.setattr(cpu_native, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    x, w13, w2, a = _moe_problem([2] * 10, 4, None, 32, 16)
    batch, kv_cache, q = _decode_setup([9, 4, 30], 4, 4, 2, 8)
    for dtype, native in ((torch.bfloat16, True), (torch.float16, False)):
        calls.clear()
        xd, w13d, w2d = x.to(dtype), w13.to(dtype), w2.to(dtype)
        out = dynserve_kernels.fused_moe(xd, w13d, w2d, a, backend="cpu")
        assert out.dtype == dtype and _rel_err(out, fused_moe_ref(xd, w13d, w2d, a)) <= BF16_TOL["moe"]
        out = dynserve_kernels.linear(xd, w13d[0], None, backend="cpu")
        assert out.dtype == dtype
        qd, kvd = q.to(dtype), kv_cache.to(dtype)
        out = dynserve_kernels.paged_attention(qd, kvd, batch, 0.3, backend="cpu")
        assert out.dtype == dtype and _rel_err(out, paged_attention_ref(qd, kvd, batch, 0.3)) <= BF16_TOL["attention"]
        assert sorted(calls) == (["fused_moe", "gemm_nt", "paged_decode_attention"] if native else [])
    # bfloat16 prefill-sized work (more rows than the float32 limits) runs natively as well
    calls.clear()
    n = max(cpu_native.NATIVE_MOE_MAX_ROWS, cpu_native.NATIVE_LINEAR_MAX_ROWS) + 5
    x, w13, w2, a = (t.bfloat16() if isinstance(t, torch.Tensor) else t for t in _moe_problem([1] * n, 4, [1], 16, 8))
    out = dynserve_kernels.fused_moe(x, w13, w2, a, backend="cpu")
    assert _rel_err(out, fused_moe_ref(x, w13, w2, a)) <= BF16_TOL["moe"]
    torch.testing.assert_close(dynserve_kernels.linear(x, w13[0], backend="cpu"), x @ w13[0].T, atol=3e-2, rtol=1e-2)
    assert sorted(calls) == ["fused_moe", "gemm_nt"]


def test_portable_bf16_build_matches_references(tmp_path, monkeypatch):
    lib = cpu_native.build_library(["-O2", "-fopenmp", "-shared", "-fPIC"], tmp_path)
    monkeypatch.setattr(cpu_native, "_lib", lib)
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(7, 40, generator=gen).bfloat16(), torch.randn(29, 40, generator=gen).bfloat16()
    torch.testing.assert_close(cpu_native.gemm_nt(x, w, 2), x @ w.T, atol=5e-2, rtol=1e-2)
    xm, w13, w2, a = _moe_problem([0, 1, 5, 2, 3, 0, 1, 4], 5, None, 40, 24)
    xm, w13, w2 = xm.bfloat16(), w13.bfloat16(), w2.bfloat16()
    assert _rel_err(_native_moe(xm, w13, w2, a), fused_moe_ref(xm, w13, w2, a)) <= BF16_TOL["moe"]
    batch, kv_cache, q = _decode_setup([9, 40, 3], 8, 4, 1, 24)
    q, kv_cache = q.bfloat16(), kv_cache.bfloat16()
    out = cpu_native.paged_decode_attention(q, kv_cache, batch.block_tables, batch.seq_lens, 0.2)
    assert _rel_err(out, paged_attention_ref(q, kv_cache, batch, 0.2)) <= BF16_TOL["attention"]


# greedy decoding in bfloat16 with the native kernels against the torch references (the "torch"
# backend). The GEMM and MoE kernels round exactly where torch does; decode attention differs from
# torch's CPU flash attention by ~1 bfloat16 ulp in a few percent of outputs (its internal order),
# which can flip a later greedy pick where the reference's top two logits are a bfloat16 near-tie.
BF16_NEAR_TIE = 0.1  # max gap between the reference's top-2 logprobs where a pick may differ


def _bf16_greedy(path, prompts, backend, monkeypatch, attention=True):
    from dynserve import LLM, SamplingParams

    monkeypatch.setenv("DYNSERVE_KERNEL_BACKEND", backend)
    if not attention:
        monkeypatch.setattr(cpu_native, "takes_decode_attention", lambda *a: False)
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    outs = LLM(str(path), dtype="bfloat16").generate(prompt_token_ids=prompts, sampling_params=sp)
    monkeypatch.undo()
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3"])
def test_bf16_engine_greedy_matches_torch_path(arch, checkpoint_factory, monkeypatch):
    import json

    path = checkpoint_factory(arch)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in (3, 11, 20, 37, 50)]
    ref = _bf16_greedy(path, prompts, "torch", monkeypatch)
    no_attn = _bf16_greedy(path, prompts, "cpu", monkeypatch, attention=False)
    assert [o.token_ids for o in no_attn] == [o.token_ids for o in ref]  # native GEMM + MoE: same tokens
    full = _bf16_greedy(path, prompts, "cpu", monkeypatch)
    for got, want in zip(full, ref, strict=True):
        if got.token_ids == want.token_ids:
            continue
        i = next(i for i, (g, w) in enumerate(zip(got.token_ids, want.token_ids, strict=True)) if g != w)
        top = want.logprobs[i].top
        assert len(top) >= 2 and top[0].logprob - top[1].logprob <= BF16_NEAR_TIE, (i, top)
        assert got.token_ids[i] in {t.token_id for t in top[:2]}
    assert sum(g.token_ids == w.token_ids for g, w in zip(full, ref, strict=True)) >= len(ref) - 1


def test_triton_backend_without_triton_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"dynserve\[cuda\]"):
        dynserve_kernels.select_backend("cpu", use_triton=True)
    assert dynserve_kernels.select_backend("cpu") == "cpu"  # the CPU path never needs it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (3, 33), (5, 256), (70, 129), (2, 3, 17)])
def test_native_rms_norm_matches_reference(dtype, shape):
    from dynserve_kernels.norm_ref import add_rms_norm_ref, rms_norm_ref

    g = torch.Generator().manual_seed(shape[-1])
    x = (3 * torch.randn(shape, generator=g)).to(dtype)
    res = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    eps = 1e-5
    out, h = cpu_native.rms_norm(x, w, eps)
    assert h is None and out.dtype == dtype and out.shape == x.shape
    ref = rms_norm_ref(x, w, eps)
    out_a, h_a = cpu_native.rms_norm(x, w, eps, res)
    ref_a, ref_h = add_rms_norm_ref(x, res, w, eps)
    assert torch.equal(h_a, ref_h)  # the add rounds exactly as torch's
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out_a, ref_a, rtol=1e-6, atol=1e-6)
    else:  # same roundings; only the float32 sum order differs, flipping at most a rare last bit
        for o, r in ((out, ref), (out_a, ref_a)):
            diff = (o.float() - r.float()).abs()
            assert (diff > 0).float().mean() < 0.02
            torch.testing.assert_close(o, r, rtol=8e-3, atol=1e-5)


def test_rms_norm_dispatch_falls_back_for_what_the_kernel_does_not_take():
    from dynserve_kernels.norm_ref import rms_norm_ref

    x = torch.randn(4, 16)
    w = torch.rand(16)
    assert cpu_native.takes_rms_norm(x, w)
    assert not cpu_native.takes_rms_norm(x.t().contiguous().t(), w)  # non-contiguous
    assert not cpu_native.takes_rms_norm(x.half(), w.half())
    assert not cpu_native.takes_rms_norm(x, w.double())
    for t, wt in ((x[:, ::2], w[:8]), (x.half(), w.half())):
        torch.testing.assert_close(dynserve_kernels.rms_norm(t, wt, 1e-6, "cpu"), rms_norm_ref(t, wt, 1e-6))
    out, h = dynserve_kernels.add_rms_norm(x, x[:, :16].t().contiguous().t(), w, 1e-6, "cpu")  # residual view
    torch.testing.assert_close(h, 2 * x)
    with pytest.raises(ValueError):
        cpu_native.rms_norm(x.half(), w.half(), 1e-6)
    with pytest.raises(ValueError):
        cpu_native.rms_norm(x, w, 1e-6, torch.randn(4, 15))


def test_native_moe_grouping_matches_stable_argsort():
    lib = cpu_native._load()
    g = torch.Generator().manual_seed(3)
    for P, E in ((1, 1), (7, 3), (100, 13)):
        eids = torch.randint(0, E, (P,), generator=g)
        tok = torch.randint(0, 50, (P,), generator=g)
        w = torch.rand(P, generator=g)
        off, order, stok = (torch.empty(n, dtype=torch.int64) for n in (E + 1, P, P))
        sw = torch.empty(P)
        lib.dyn_moe_group(
            eids.data_ptr(), tok.data_ptr(), w.data_ptr(), P, E, off.data_ptr(), order.data_ptr(), stok.data_ptr(),
            sw.data_ptr(),
        )  # fmt: skip
        ref_order = torch.argsort(eids, stable=True)
        assert torch.equal(order, ref_order) and torch.equal(stok, tok[ref_order]) and torch.equal(sw, w[ref_order])
        assert torch.equal(off[1:], torch.cumsum(torch.bincount(eids, minlength=E), 0)) and off[0] == 0


def test_takes_moe_bounds_float32_rows_by_tokens_without_counts():
    w13, w2 = torch.zeros(4, 6, 8), torch.zeros(4, 8, 3)
    n = cpu_native.NATIVE_MOE_MAX_ROWS
    assert cpu_native.takes_moe(torch.zeros(n, 8), w13, w2)
    assert not cpu_native.takes_moe(torch.zeros(n + 1, 8), w13, w2, torch.tensor([n + 1, 0, 0, 0]))
    assert cpu_native.takes_moe(torch.zeros(n + 1, 8), w13, w2, torch.tensor([n, 1, 0, 0]))
    assert cpu_native.takes_moe(torch.zeros(n + 1, 8).bfloat16(), w13.bfloat16(), w2.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, H, D, R", [(1, 3, 8, 8), (5, 7, 18, 18), (3, 2, 16, 6), (9, 5, 64, 64)])
def test_native_rope_matches_reference(dtype, T, H, D, R):
    from dynserve_kernels.rope_ref import apply_rope_ref

    g = torch.Generator().manual_seed(T * 100 + D)
    base = torch.randn(T, H * D + 5, generator=g).to(dtype)  # token rows strided, as a view of qkv
    x = base[:, 2 : 2 + H * D].view(T, H, D)
    ang = torch.rand(T, R // 2, generator=g) * 6
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype)
    sin = torch.cat([-ang.sin(), ang.sin()], -1).to(dtype)
    assert cpu_native.takes_rope(x, cos, sin)
    out = cpu_native.rope(x, cos, sin)
    assert out.is_contiguous()
    assert torch.equal(out, apply_rope_ref(x, cos, sin))  # the same roundings, bit for bit
    assert torch.equal(dynserve_kernels.apply_rope(x, cos, sin, "cpu"), out)


def test_rope_dispatch_falls_back_for_what_the_kernel_does_not_take():
    from dynserve_kernels.rope_ref import apply_rope_ref

    x = torch.randn(4, 3, 8).transpose(0, 1)  # heads not contiguous within a token
    ang = torch.rand(3, 4)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([-ang.sin(), ang.sin()], -1)
    assert not cpu_native.takes_rope(x, cos, sin)
    assert not cpu_native.takes_rope(x.contiguous(), cos.half(), sin.half())
    assert torch.equal(dynserve_kernels.apply_rope(x, cos, sin, "cpu"), apply_rope_ref(x, cos, sin))
    with pytest.raises(ValueError):
        cpu_native.rope(x, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_write_kv_matches_reference(dtype):
    from dynserve_kernels.attention_ref import write_kv_ref

    g = torch.Generator().manual_seed(0)
    T, hkv, d = 5, 3, 6
    qkv = torch.randn(T, 4 * hkv * d + 1, generator=g).to(dtype)
    k = qkv[:, 1 : 1 + 2 * hkv * d].view(T, 2 * hkv, d)[:, hkv:]  # strided views, as Attention passes
    v = qkv[:, 1 + 2 * hkv * d : 1 + 3 * hkv * d].view(T, hkv, d)
    slots = torch.tensor([3, -1, 0, 13, 7])
    cache = torch.randn(2, 4, 4, hkv, d, generator=g).to(dtype)
    ref = cache.clone()
    write_kv_ref(k, v, ref, slots)
    assert cpu_native.takes_write_kv(k, v, cache, slots)
    dynserve_kernels.write_kv(k, v, cache, slots, "cpu")
    assert torch.equal(cache, ref)
    before = cache.clone()
    with pytest.raises(ValueError):
        cpu_native.write_kv(k, v, cache, torch.tensor([0, 1, 2, 3, 16]))
    assert torch.equal(cache, before)  # nothing written
    assert not cpu_native.takes_write_kv(k, v, cache, slots.int())
    assert not cpu_native.takes_write_kv(k.half(), v.half(), cache.half(), slots)


# ------------------------------------------------------------------------------------------------
# gpt-oss: attention sinks and sliding window in the native decode kernel (float32 and bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_sinks,window", [(True, None), (False, 6), (True, 6), (True, 1), (True, 500)])
@pytest.mark.parametrize("case", [0, 2, 4], ids=["mha", "mqa_odd_d", "long"])
def test_native_decode_sinks_and_window_match_reference(case, with_sinks, window, dtype):
    lens, bs, hq, hkv, d = DECODE_CASES[case]
    batch, kv_cache, q = _decode_setup(lens, bs, hq, hkv, d)
    q, kv_cache = q.to(dtype), kv_cache.to(dtype)
    sinks = torch.randn(hq, generator=torch.Generator().manual_seed(9)) * 2 if with_sinks else None
    out = cpu_native.paged_decode_attention(
        q, kv_cache, batch.block_tables, batch.seq_lens, d**-0.5, 3, sinks=sinks, window=window
    )
    ref = paged_attention_ref(q, kv_cache, batch, d**-0.5, sinks, window)
    truth = naive_attention(q.float(), kv_cache.float(), batch, d**-0.5, sinks, window)
    tol = 1e-5 if dtype == torch.float32 else BF16_TOL["attention"]
    assert out.dtype == dtype
    assert (out.double() - truth).abs().max().item() <= tol * max(truth.abs().max().item(), 1.0)
    assert _rel_err(out, ref) <= tol
    # the cpu backend's dispatcher hands sinks and window to the native kernel
    got = dynserve_kernels.paged_attention(q, kv_cache, batch, d**-0.5, backend="cpu", sinks=sinks, window=window)
    assert torch.equal(got.float(), cpu_native.paged_decode_attention(
        q, kv_cache, batch.block_tables, batch.seq_lens, d**-0.5, sinks=sinks, window=window
    ).float())  # fmt: skip


def test_native_decode_sinks_on_empty_context_give_zeros():
    batch, kv_cache, q = _decode_setup([5, 9], 4, 4, 2, 8)
    lens = batch.seq_lens.clone()
    lens[1] = 0
    out = cpu_native.paged_decode_attention(q, kv_cache, batch.block_tables, lens, 0.3, sinks=torch.ones(4), window=3)
    assert (out[1] == 0).all() and torch.isfinite(out[0]).all()


# ------------------------------------------------------------------------------------------------
# the decode attention block in one native call (norm, qkv, rope, KV write, attention, o_proj, add, norm)

# (context lengths after the step, block size, Hq, Hkv, D, rotary dims, hidden)
BLOCK_CASES = [
    ([5, 17, 1, 8], 4, 4, 4, 8, 8, 24),  # MHA, a length-1 sequence
    ([33, 2, 16], 16, 6, 2, 16, 6, 40),  # GQA, partial rotary
    ([9], 8, 4, 1, 24, 24, 33),  # MQA, batch 1, odd hidden size
    ([300, 7, 129, 64, 1, 250], 16, 8, 4, 64, 64, 512),  # the bench model's attention
]


def _block_problem(lens, bs, hq, hkv, d, R, H, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, num_blocks = make_batch([(n, 1) for n in lens], bs, seed=seed)
    cache = torch.zeros(2, num_blocks, bs, hkv, d)  # [2, N, bs, Hkv, D]
    fill_prefix(cache, batch, gen)
    T = len(lens)
    x = torch.randn(T, H, generator=gen)  # [T, H]
    w_qkv = torch.randn((hq + 2 * hkv) * d, H, generator=gen) / H**0.5
    w_o = torch.randn(H, hq * d, generator=gen) / (hq * d) ** 0.5
    in_w, post_w = 1 + 0.1 * torch.randn(H, generator=gen), 1 + 0.1 * torch.randn(H, generator=gen)
    ang = torch.rand(T, R // 2, generator=gen) * 6
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)  # [T, R] each
    ts = [t.to(dtype).contiguous() for t in (x, w_qkv, w_o, in_w, post_w, cos, sin, cache)]
    return batch, ts


def _run_block(fn, batch, ts, hq, dtype):
    x, w_qkv, w_o, in_w, post_w, cos, sin, cache = ts
    cache = cache.clone()
    scale = cache.shape[-1] ** -0.5
    y, h = fn(x, (in_w, 1e-5), w_qkv, cos, sin, cache, batch.slot_mapping, batch, scale, w_o, (post_w, 1e-6), hq)
    return y, h, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(BLOCK_CASES)))
def test_native_attention_block_matches_reference_and_the_layer_by_layer_kernels(case, dtype):
    from dynserve_kernels.attention_ref import attention_block_ref

    lens, bs, hq, hkv, d, R, H = BLOCK_CASES[case]
    batch, ts = _block_problem(lens, bs, hq, hkv, d, R, H, dtype, seed=case)
    x, w_qkv, w_o, in_w, post_w, cos, sin, cache = ts
    assert cpu_native.takes_attention_block(x, w_qkv, w_o, (in_w, post_w), cos, sin, cache, batch.slot_mapping, batch)
    y, h, kv = _run_block(cpu_native.attention_block, batch, ts, hq, dtype)
    y_ref, h_ref, kv_ref = _run_block(attention_block_ref, batch, ts, hq, dtype)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    assert _rel_err(kv, kv_ref) <= tol  # the new K/V rows (rope'd K) in the cache, nothing else touched
    assert _rel_err(h, h_ref) <= tol and _rel_err(y, y_ref) <= tol

    # the same kernels called one by one (the engine's path when the block is not fused): bit for bit
    def layer_by_layer(x, in_norm, w_qkv, cos, sin, cache, slots, batch, scale, w_o, post_norm, hq):
        T = x.shape[0]
        qkv = dynserve_kernels.linear(dynserve_kernels.rms_norm(x, in_norm[0], in_norm[1], "cpu"), w_qkv, None, "cpu")
        qk = dynserve_kernels.apply_rope(qkv[:, : (hq + hkv) * d].view(T, hq + hkv, d), cos, sin, "cpu")
        v = qkv[:, (hq + hkv) * d :].view(T, hkv, d)
        dynserve_kernels.write_kv(qk[:, hq:], v, cache, slots, "cpu")
        o = dynserve_kernels.paged_attention(qk[:, :hq], cache, batch, scale, "cpu")
        a = dynserve_kernels.linear(o.reshape(T, hq * d), w_o, None, "cpu")
        return dynserve_kernels.add_rms_norm(x, a, post_norm[0], post_norm[1], "cpu")

    y2, h2, kv2 = _run_block(layer_by_layer, batch, ts, hq, dtype)
    assert torch.equal(y, y2) and torch.equal(h, h2) and torch.equal(kv, kv2)


def test_native_attention_block_rejects_bad_input_and_writes_nothing():
    lens, bs, hq, hkv, d, R, H = BLOCK_CASES[0]
    batch, ts = _block_problem(lens, bs, hq, hkv, d, R, H, torch.float32)
    x, w_qkv, w_o, in_w, post_w, cos, sin, cache = ts
    scale = d**-0.5
    bad_slots = batch.slot_mapping.clone()
    bad_slots[-1] = cache.shape[1] * bs  # one past the cache
    before = cache.clone()
    with pytest.raises(ValueError, match="slots"):
        cpu_native.attention_block(x, (in_w, 1e-5), w_qkv, cos, sin, cache, bad_slots, batch, scale, w_o,
                                   (post_w, 1e-5), hq)  # fmt: skip
    assert torch.equal(cache, before)
    with pytest.raises(ValueError, match="shapes"):
        cpu_native.attention_block(x, (in_w, 1e-5), w_qkv[1:], cos, sin, cache, batch.slot_mapping, batch, scale, w_o,
                                   (post_w, 1e-5), hq)  # fmt: skip
    bad = make_batch([(n, 1) for n in lens], bs, seed=0)[0]
    bad.block_tables[0, 0] = cache.shape[1]  # a block past the cache
    with pytest.raises(ValueError, match="block table"):
        cpu_native.attention_block(x, (in_w, 1e-5), w_qkv, cos, sin, cache, bad.slot_mapping, bad, scale, w_o,
                                   (post_w, 1e-5), hq)  # fmt: skip
    # not taken: prefill-shaped batches, float16, more float32 rows than the native GEMM takes
    pre = make_batch([(6, 3)], bs)[0]
    assert not cpu_native.takes_attention_block(x[:3], w_qkv, w_o, (in_w, post_w), cos[:3], sin[:3], cache,
                                                pre.slot_mapping, pre)  # fmt: skip
    h16 = [t.half() for t in ts]
    assert not cpu_native.takes_attention_block(h16[0], h16[1], h16[2], (h16[3], h16[4]), h16[5], h16[6], h16[7],
                                                batch.slot_mapping, batch)  # fmt: skip
    assert dynserve_kernels.attention_block(x, (in_w, 1e-5), w_qkv, cos, sin, cache, batch.slot_mapping, batch, scale,
                                            w_o, (post_w, 1e-5), hq, "torch") is None  # fmt: skip
    args = (x, (in_w, 1e-5), w_qkv, cos, sin, cache, batch.slot_mapping, batch, scale, w_o, (post_w, 1e-5), hq, "cpu")
    assert dynserve_kernels.attention_block(*args) is not None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_decodes_the_same_tokens_with_the_fused_attention_block(dtype, checkpoint_factory, monkeypatch):
    from dynserve import LLM, SamplingParams
    from dynserve.model import layers
    from dynserve.model.decoder import DecoderForCausalLM

    path = checkpoint_factory("mixtral")
    calls = []
    real = cpu_native.attention_block
    monkeypatch.setattr(cpu_native, "attention_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(DecoderForCausalLM, "native_decode", False)  # the blocks layer by layer
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": [1 + i, 5, 9, 2 + 3 * i, 7][: 2 + i]} for i in range(3)]
    fused = [o.outputs[0].token_ids for o in LLM(str(path), dtype=dtype).generate(prompts, sp)]
    assert calls  # the decode steps went through the fused block
    monkeypatch.setattr(layers.Attention, "forward_block", lambda *a, **k: None)
    plain = [o.outputs[0].token_ids for o in LLM(str(path), dtype=dtype).generate(prompts, sp)]
    assert fused == plain
