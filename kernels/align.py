"""Alignment of a ragged Assignment for a grouped GEMM: pairs sorted by expert, each expert's group
padded to a multiple of the kernel's BLOCK_M, one expert id per block.

Layout (P pairs, E experts, counts c_e, padded counts c'_e = ceil(c_e / block_m) * block_m):

    sorted_pair_ids  [sum c'_e] int32   expert 0's pair ids (in original order), then sentinel P up to
                                        c'_0, then expert 1's ... ; sentinel = P marks a padding row
    block_expert_ids [sum c'_e / block_m] int32   expert of each block of block_m rows
    num_padded_pairs int                sum c'_e

Experts with no pairs produce no blocks; zero-computation experts never appear as pairs (see
`Assignment`), so they produce none either. Unlike a fixed-top-k layout, a pair's input row is its
own `token_ids[pair]`, not `pair // top_k`. Vectorised torch (one host sync, for the block count).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dynserve.routing.base import Assignment


def moe_align(a: Assignment, block_m: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Returns (sorted_pair_ids [P_pad] int32, block_expert_ids [P_pad // block_m] int32, P_pad)."""
    return moe_align_ids(a.expert_ids, block_m, num_experts)


def moe_align_ids(expert_ids: torch.Tensor, block_m: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`moe_align` on the raw [P] expert id of each pair (ids must lie in [0, num_experts))."""
    if block_m <= 0:
        raise ValueError(f"block_m must be positive, got {block_m}")
    device = expert_ids.device
    P = int(expert_ids.numel())
    if P == 0:
        empty = torch.empty(0, dtype=torch.int32, device=device)
        return empty, empty.clone(), 0
    ids = expert_ids.long()  # [P]
    counts = torch.bincount(ids, minlength=num_experts)  # [E]
    if counts.numel() > num_experts:
        raise ValueError(f"expert ids must lie in [0, {num_experts})")
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    pad_start = torch.cumsum(padded, 0) - padded  # [E] exclusive prefix sums
    raw_start = torch.cumsum(counts, 0) - counts  # [E]
    num_padded = int(padded.sum())  # the one host sync
    order = torch.argsort(ids, stable=True)  # [P] pair ids grouped by expert
    e_sorted = ids[order]  # [P]
    dest = pad_start[e_sorted] + torch.arange(P, device=device) - raw_start[e_sorted]  # [P]
    sorted_ids = torch.full((num_padded,), P, dtype=torch.int32, device=device)  # [P_pad]
    sorted_ids[dest] = order.to(torch.int32)
    num_blocks = num_padded // block_m
    block_expert_ids = torch.repeat_interleave(
        torch.arange(num_experts, device=device, dtype=torch.int32), padded // block_m, output_size=num_blocks
    )  # [num_blocks]
    return sorted_ids, block_expert_ids, num_padded


def moe_align_bounded(
    expert_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """`moe_align_ids` with no host sync: the layout is laid out in buffers sized by a bound known on
    the host, so a GPU launch needs no device-to-host copy (and can be captured in a CUDA graph).

    Every expert with pairs pads at most block_m - 1 rows, so the blocks number at most
    P // block_m + min(E, P). Returns (sorted_ids [NB * block_m] int32: the exact layout, then
    sentinel P; block_expert [NB] int32: the exact experts, then the last expert; num_used [1] int32 on
    the device: how many blocks are real; NB: the bound). Kernels skip blocks >= num_used.
    """
    if block_m <= 0:
        raise ValueError(f"block_m must be positive, got {block_m}")
    device = expert_ids.device
    P = int(expert_ids.numel())  # a shape: no sync
    nb = P // block_m + min(num_experts, P)
    if P == 0:
        empty = torch.empty(0, dtype=torch.int32, device=device)
        return empty, empty.clone(), torch.zeros(1, dtype=torch.int32, device=device), 0
    ids = expert_ids.long()  # [P]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))  # [E]; bincount would sync on CUDA
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    pad_end = torch.cumsum(padded, 0)  # [E]
    pad_start = pad_end - padded  # [E]
    raw_start = torch.cumsum(counts, 0) - counts  # [E]
    order = torch.argsort(ids, stable=True)  # [P]
    e_sorted = ids[order]  # [P]
    dest = pad_start[e_sorted] + torch.arange(P, device=device) - raw_start[e_sorted]  # [P]
    sorted_ids = torch.full((nb * block_m,), P, dtype=torch.int32, device=device)  # [NB * bm]
    sorted_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(nb, device=device) * block_m  # [NB]
    block_expert = torch.searchsorted(pad_end, block_start, right=True).clamp_(max=num_experts - 1)  # [NB]
    num_used = (pad_end[-1:] // block_m).to(torch.int32)  # [1]
    return sorted_ids, block_expert.to(torch.int32), num_used, nb


def moe_align_reference(expert_ids: list[int], block_m: int, num_experts: int) -> tuple[list[int], list[int]]:
    """Plain-Python alignment (tests only): (sorted_pair_ids, block_expert_ids)."""
    P = len(expert_ids)
    sorted_ids: list[int] = []
    blocks: list[int] = []
    for e in range(num_experts):
        group = [p for p, x in enumerate(expert_ids) if x == e]
        if not group:
            continue
        n_blocks = -(-len(group) // block_m)
        sorted_ids += group + [P] * (n_blocks * block_m - len(group))
        blocks += [e] * n_blocks
    return sorted_ids, blocks
