"""Benchmark fused MoE against a per-expert torch loop and a dense all-experts batched computation.

    python kernels/bench_moe.py --small                 # CPU-sized shapes, torch reference
    python kernels/bench_moe.py -T 4096 -E 64 -H 2048 -I 1024 --k-min 1 --k-max 8 --dtype bfloat16

Each token gets a random number of experts in [k-min, k-max] (variable k, as adaptive routing
produces). `fused` is the Triton kernel on CUDA and the torch reference elsewhere. TFLOP/s counts
useful FLOPs only (6 * pairs * H * I); GB/s counts the weights of the experts actually used plus
the activations read and written once.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from dynserve_kernels.moe_ref import fused_moe_ref

from dynserve.routing.base import Assignment


def per_expert_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, a: Assignment) -> torch.Tensor:
    """The common eager pattern: for every expert, find its tokens in the dense [T, E] matrix."""
    inter = w2.shape[2]
    dense = a.to_dense()  # [T, E]
    out = torch.zeros_like(x)  # [T, H]
    for e in range(w13.shape[0]):
        tok = torch.nonzero(dense[:, e]).squeeze(1)  # [n] (a device sync per expert)
        if tok.numel() == 0:
            continue
        gu = F.linear(x[tok], w13[e])  # [n, 2I]
        y = F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], w2[e])  # [n, H]
        out.index_add_(0, tok, y * dense[tok, e, None].to(x.dtype))
    return out


def dense_batched(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, a: Assignment) -> torch.Tensor:
    """Every expert on every token with batched GEMMs, then weighted by the dense [T, E] matrix."""
    E, inter = w13.shape[0], w2.shape[2]
    xs = x.unsqueeze(0).expand(E, -1, -1)  # [E, T, H]
    gu = torch.bmm(xs, w13.transpose(1, 2))  # [E, T, 2I]
    y = torch.bmm(F.silu(gu[..., :inter]) * gu[..., inter:], w2.transpose(1, 2))  # [E, T, H]
    return torch.einsum("te,eth->th", a.to_dense().to(x.dtype), y)


def grouped_mm_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, a: Assignment) -> torch.Tensor:
    """Baseline: pairs sorted by expert, two `torch._grouped_mm` calls, a weighted index_add (no host sync)."""
    T, H = x.shape
    E, inter = w13.shape[0], w2.shape[2]
    order = torch.argsort(a.expert_ids, stable=True)  # [P] pairs grouped by expert
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(
        0, a.expert_ids, torch.ones_like(a.expert_ids)
    )  # [E]
    offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] group ends
    tok = a.token_ids[order]  # [P]
    gu = torch._grouped_mm(x[tok], w13.transpose(1, 2), offs=offs)  # [P, 2I]
    h = F.silu(gu[:, :inter]) * gu[:, inter:]  # [P, I]
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)  # [P, H]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, y.float() * a.weights[order, None])
    return out.to(x.dtype)


def random_assignment(T: int, E: int, k_min: int, k_max: int, seed: int, device: str) -> Assignment:
    gen = torch.Generator().manual_seed(seed)
    ks = torch.randint(k_min, k_max + 1, (T,), generator=gen)  # [T]
    order = torch.rand(T, E, generator=gen).argsort(dim=1)  # [T, E] random expert ranking
    mask = torch.zeros(T, E, dtype=torch.bool)
    mask.scatter_(1, order, torch.arange(E)[None, :].expand(T, E) < ks[:, None])
    weights = torch.rand(T, E, generator=gen)
    a = Assignment.from_mask(mask, weights)
    return Assignment(
        a.num_tokens,
        E,
        a.token_ids.to(device),
        a.expert_ids.to(device),
        a.weights.to(device),
        a.token_offsets.to(device),
    )


def time_fn(fn: Callable[[], torch.Tensor], iters: int, device: str) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    samples = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return sorted(samples)[len(samples) // 2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-T", "--tokens", type=int, default=256)
    p.add_argument("-E", "--experts", type=int, default=8)
    p.add_argument("-H", "--hidden", type=int, default=1024)
    p.add_argument("-I", "--inter", type=int, default=512)
    p.add_argument("--k-min", type=int, default=1)
    p.add_argument("--k-max", type=int, default=2)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--small", action="store_true", help="tiny shapes that run in seconds on a CPU")
    p.add_argument("--no-baselines", action="store_true", help="time only the fused op")
    args = p.parse_args(argv)
    if args.small:
        args.tokens, args.experts, args.hidden, args.inter, args.iters = 64, 8, 128, 96, 3
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    T, E, H, inter = args.tokens, args.experts, args.hidden, args.inter
    k_max = min(args.k_max, E)
    k_min = min(args.k_min, k_max)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=gen).to(device, dtype)  # [T, H]
    w13 = (torch.randn(E, 2 * inter, H, generator=gen) * H**-0.5).to(device, dtype)  # [E, 2I, H]
    w2 = (torch.randn(E, H, inter, generator=gen) * inter**-0.5).to(device, dtype)  # [E, H, I]
    a = random_assignment(T, E, k_min, k_max, 1, device)

    if device == "cuda":
        from dynserve_kernels.moe_triton import fused_moe_triton

        fused, fused_name = (lambda: fused_moe_triton(x, w13, w2, a)), "fused (triton)"
    else:
        fused, fused_name = (lambda: fused_moe_ref(x, w13, w2, a)), "fused (torch ref)"
    runs = [(fused_name, fused)]
    if not args.no_baselines:
        runs += [
            ("per-expert loop", lambda: per_expert_loop(x, w13, w2, a)),
            ("dense batched", lambda: dense_batched(x, w13, w2, a)),
        ]

    P = a.num_pairs
    used = int(torch.unique(a.expert_ids).numel())
    elem = x.element_size()
    flops = 6.0 * P * H * inter
    bytes_moved = used * 3 * H * inter * elem + 2 * T * H * elem
    print(
        f"device={device} dtype={dtype} T={T} E={E} H={H} I={inter} k in [{k_min},{k_max}] "
        f"pairs={P} (avg k {P / max(T, 1):.2f}) experts used={used}"
    )
    ref = fused()
    print(f"{'op':<20} {'ms':>10} {'TFLOP/s':>10} {'GB/s':>10} {'max |diff|':>12}")
    for name, fn in runs:
        sec = time_fn(fn, args.iters, device)
        diff = (fn().float() - ref.float()).abs().max().item()
        tflops, gbps = flops / sec / 1e12, bytes_moved / sec / 1e9
        print(f"{name:<20} {sec * 1e3:>10.3f} {tflops:>10.4f} {gbps:>10.2f} {diff:>12.2e}")


if __name__ == "__main__":
    main()
