"""Fused MoE kernels: the torch reference against a dense all-experts computation, the Triton kernel
against the reference (compiled on a GPU, under the interpreter on CPU: the `device` fixture), and
the alignment layout."""

from __future__ import annotations

import dataclasses

import dynserve_kernels
import pytest
import torch
from dynserve_kernels.align import moe_align, moe_align_bounded, moe_align_ids, moe_align_reference
from dynserve_kernels.moe_ref import dense_moe_reference, fused_moe_ref
from kernel_utils import make_assignment

from dynserve.routing.base import Assignment

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}  # relative to max |out|

# (name, experts per token, num experts, restrict to these experts)
CASES = [
    ("mixed_k", [0, 1, 5, 2, 3, 0, 1, 4], 5, None),
    ("one_token_all_experts", [4], 4, None),
    ("one_token_one_expert", [1], 3, None),
    ("all_on_one_expert", [1, 1, 1, 1, 1, 1], 4, [2]),
    ("idle_experts", [2, 1, 2, 0, 2, 1, 2, 2, 1], 6, [0, 3, 5]),
    ("all_zero_k", [0, 0, 0], 3, None),
]


def _weights(E: int, H: int, inter: int, dtype: torch.dtype, gen: torch.Generator):
    w13 = (torch.randn(E, 2 * inter, H, generator=gen) * H**-0.5).to(dtype)  # [E, 2I, H]
    w2 = (torch.randn(E, H, inter, generator=gen) * inter**-0.5).to(dtype)  # [E, H, I]
    return w13, w2


def _problem(ks, E, experts, dtype, H=40, inter=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = make_assignment(ks, E, gen, experts)
    x = torch.randn(len(ks), H, generator=gen).to(dtype)  # [T, H]
    w13, w2 = _weights(E, H, inter, dtype, gen)
    return x, w13, w2, a


def _on(device: str, x, w13, w2, a: Assignment):
    """The problem's tensors moved to `device` (the reference stays on the CPU copies)."""
    moved = {
        f.name: v.to(device) if isinstance(v := getattr(a, f.name), torch.Tensor) else v for f in dataclasses.fields(a)
    }
    return x.to(device), w13.to(device), w2.to(device), Assignment(**moved)


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    out, ref = out.cpu(), ref.cpu()
    scale = max(ref.float().abs().max().item(), 1.0)
    err = (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"max error {err} (scale {scale})"


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,ks,E,experts", CASES, ids=[c[0] for c in CASES])
def test_reference_matches_dense(name, ks, E, experts, dtype):
    x, w13, w2, a = _problem(ks, E, experts, dtype)
    out = fused_moe_ref(x, w13, w2, a)
    _close(out, dense_moe_reference(x, w13, w2, a), dtype)
    zero_tokens = torch.tensor(ks) == 0
    assert torch.all(out[zero_tokens] == 0)


def test_reference_matches_hand_computed_expert():
    # one token, one expert with weight 0.5: out = 0.5 * W2 (silu(G x) * (U x))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, generator=gen)
    w13, w2 = _weights(2, 8, 4, torch.float32, gen)
    a = Assignment.from_topk(torch.tensor([[1]]), torch.tensor([[0.5]]), 2)
    gate, up = w13[1, :4] @ x[0], w13[1, 4:] @ x[0]
    expected = 0.5 * (w2[1] @ (gate * torch.sigmoid(gate) * up))
    torch.testing.assert_close(fused_moe_ref(x, w13, w2, a)[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_idle_experts_are_never_read(backend, device):
    # NaN weights in experts no token picked must not leak: work is per pair, not T x E
    x, w13, w2, a = _problem([1, 2, 1, 0, 2], 5, [1, 3], torch.float32)
    for e in (0, 2, 4):
        w13[e] = float("nan")
        w2[e] = float("nan")
    out = dynserve_kernels.fused_moe(*_on(device if backend == "triton" else "cpu", x, w13, w2, a), backend=backend)
    assert torch.isfinite(out).all()
    _close(out, dense_moe_reference(x, w13.nan_to_num(), w2.nan_to_num(), a), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "name,ks,E,experts", [CASES[0], CASES[3], CASES[4], CASES[5]], ids=[CASES[i][0] for i in (0, 3, 4, 5)]
)
def test_triton_matches_reference(name, ks, E, experts, dtype, device):
    from dynserve_kernels.moe_triton import fused_moe_triton

    x, w13, w2, a = _problem(ks, E, experts, dtype)
    _close(fused_moe_triton(*_on(device, x, w13, w2, a)), fused_moe_ref(x, w13, w2, a), dtype)


@pytest.mark.parametrize(
    "config",
    [
        dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1),
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, GROUP_M=4),
    ],
    ids=["16x16x16", "32x64x16"],
)
def test_triton_block_sizes_not_dividing_pairs(config, device):
    # 37 pairs over 3 experts, H and I not multiples of the tiles
    from dynserve_kernels.moe_triton import fused_moe_triton

    ks = [3, 2, 1, 3, 2, 3, 1, 2, 3, 3, 2, 1, 3, 2, 3, 3]
    x, w13, w2, a = _problem(ks, 3, None, torch.float32, H=24, inter=20, seed=3)
    assert a.num_pairs == 37
    out = fused_moe_triton(*_on(device, x, w13, w2, a), config=config)
    _close(out, fused_moe_ref(x, w13, w2, a), torch.float32)


def test_triton_unsorted_pairs_within_token_and_strided_input(device):
    # pairs of one token need not be expert-sorted; x may be a non-contiguous view
    from dynserve_kernels.moe_triton import fused_moe_triton

    gen = torch.Generator().manual_seed(4)
    ids = torch.tensor([[3, 0], [1, 3], [2, 1]])
    a = Assignment.from_topk(ids, torch.rand(3, 2, generator=gen), 4)
    x = torch.randn(40, 3, generator=gen).t()  # [3, 40], non-contiguous
    w13, w2 = _weights(4, 40, 24, torch.float32, gen)
    xd, w13d, w2d, ad = _on(device, x, w13, w2, a)
    xd = x.t().contiguous().to(device).t()  # keep the non-contiguous layout on the device
    _close(fused_moe_triton(xd, w13d, w2d, ad), dense_moe_reference(x, w13, w2, a), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend, device):
    x = torch.randn(0, 16)
    w13, w2 = _weights(2, 16, 16, torch.float32, torch.Generator().manual_seed(0))
    a = make_assignment([], 2, torch.Generator())
    on = _on(device if backend == "triton" else "cpu", x, w13, w2, a)
    assert dynserve_kernels.fused_moe(*on, backend=backend).shape == (0, 16)


def test_triton_rejects_bad_inputs(device):
    from dynserve_kernels.moe_triton import fused_moe_triton

    x, w13, w2, a = _on(device, *_problem([1, 2], 3, None, torch.float32, H=16, inter=16))
    with pytest.raises(ValueError):
        fused_moe_triton(x[:, :8], w13, w2, a)
    with pytest.raises(TypeError):
        fused_moe_triton(x.half(), w13, w2, a)
    with pytest.raises(ValueError):
        fused_moe_ref(x, w13, w2[:, :8], a)


@pytest.mark.parametrize("block_m", [1, 3, 4, 16])
def test_align_matches_python_reference_and_invariants(block_m, device):
    gen = torch.Generator().manual_seed(block_m)
    E = 6
    for trial in range(20):
        P = int(torch.randint(0, 30, (1,), generator=gen))
        used = torch.randperm(E, generator=gen)[: 1 + trial % E]  # some experts stay idle
        ids = used[torch.randint(0, len(used), (P,), generator=gen)]  # [P]
        sorted_ids, blocks, p_pad = moe_align_ids(ids.to(device), block_m, E)
        sorted_ids, blocks = sorted_ids.cpu(), blocks.cpu()
        ref_sorted, ref_blocks = moe_align_reference(ids.tolist(), block_m, E)
        assert sorted_ids.dtype == torch.int32 and blocks.dtype == torch.int32
        assert sorted_ids.tolist() == ref_sorted and blocks.tolist() == ref_blocks
        assert p_pad == len(ref_sorted) and p_pad % block_m == 0 and len(blocks) == p_pad // block_m
        real = sorted_ids[sorted_ids < P]
        assert sorted(real.tolist()) == list(range(P))  # every pair exactly once
        # each block holds pairs of its own expert only; idle experts own no block
        rows = sorted_ids.view(-1, block_m) if p_pad else sorted_ids.view(0, block_m)
        for blk, e in zip(rows.tolist(), blocks.tolist(), strict=True):
            assert all(ids[p] == e for p in blk if p < P)
            assert any(p < P for p in blk)
        assert set(blocks.tolist()) == set(ids.tolist())


def test_align_from_assignment():
    a = Assignment.from_mask(
        torch.tensor([[True, False, True], [False, False, False], [True, False, False]]), torch.ones(3, 3)
    )
    sorted_ids, blocks, p_pad = moe_align(a, 2, 3)
    # pairs: (t0,e0)=0, (t0,e2)=1, (t2,e0)=2 -> expert 0: [0, 2], expert 2: [1, pad]
    assert sorted_ids.tolist() == [0, 2, 1, 3] and blocks.tolist() == [0, 2] and p_pad == 4


def test_bench_script_runs_small(capsys):
    from dynserve_kernels.bench_moe import main

    main(["--small", "--iters", "1"])
    out = capsys.readouterr().out
    fused = "fused (triton)" if torch.cuda.is_available() else "fused (torch ref)"
    assert fused in out and "per-expert loop" in out and "dense batched" in out


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_bounded_align_is_the_exact_layout_then_idle_blocks(block_m, device):
    # the sync-free alignment the Triton path uses: the same layout as moe_align_ids in its first
    # num_used blocks, sentinel rows after, and never fewer blocks than the data needs
    gen = torch.Generator().manual_seed(block_m)
    E = 6
    for trial in range(12):
        P = int(torch.randint(1, 40, (1,), generator=gen))
        used = torch.randperm(E, generator=gen)[: 1 + trial % E]
        ids = used[torch.randint(0, len(used), (P,), generator=gen)]  # [P]
        exact_ids, exact_blocks, p_pad = moe_align_ids(ids, block_m, E)
        s_ids, blocks, num_used, nb = moe_align_bounded(ids.to(device), block_m, E)
        n = int(num_used.item())
        assert n * block_m == p_pad and nb >= n and len(blocks) == nb and len(s_ids) == nb * block_m
        assert s_ids[: n * block_m].cpu().tolist() == exact_ids.tolist()
        assert blocks[:n].cpu().tolist() == exact_blocks.tolist()
        assert bool((s_ids[n * block_m :] == P).all())  # idle blocks hold padding only


@pytest.mark.parametrize("block_m", [1, 4, 16])
@pytest.mark.parametrize("E", [3, 8, 40, 256])
def test_triton_align_matches_torch_align(block_m, E, device):
    # the one-launch alignment equals its torch reference (moe_align_bounded) exactly: odd pair counts,
    # chunk boundaries crossed, idle experts, every pair on one expert, one pair
    from dynserve_kernels.moe_triton import moe_align_triton

    gen = torch.Generator().manual_seed(block_m * 100 + E)
    sizes = [1, 2, 63, 64, 65, 130]
    for trial, P in enumerate(sizes):
        used = torch.randperm(E, generator=gen)[: 1 + trial % E]
        ids = used[torch.randint(0, len(used), (P,), generator=gen)]  # [P]
        if trial == 3:
            ids = torch.full((P,), E - 1)  # all pairs on the last expert
        ref = moe_align_bounded(ids, block_m, E)
        got = moe_align_triton(ids.to(device), block_m, E)
        assert got[3] == ref[3]
        for g, r in zip(got[:3], ref[:3], strict=True):
            assert g.dtype == r.dtype and g.cpu().tolist() == r.tolist(), (P, trial)
