"""Plain-torch fused MoE: the CPU path of the engine and the reference the Triton kernel must match.

`fused_moe_ref` does work proportional to the number of (token, expert) pairs, never T x E: pairs
are grouped by expert with one stable sort, the per-expert counts cross to the host once, and only
experts that received pairs run their two GEMMs. `dense_moe_reference` runs every expert on every
token and weights by the dense [T, E] matrix; it is slow and exists only for tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from dynserve.routing.base import Assignment


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int, int]:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"expected x [T,H], w13 [E,2I,H], w2 [E,H,I]; got {x.shape}, {w13.shape}, {w2.shape}")
    T, H = x.shape
    E, two_i, h13 = w13.shape
    if h13 != H or two_i % 2 or w2.shape != (E, H, two_i // 2):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    return T, H, E, two_i // 2


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, a: Assignment) -> torch.Tensor:
    """sum over token t's pairs (e, w) of w * W2_e (silu(gate_e x_t) * up_e x_t); [T, H] in x.dtype.

    GEMMs run in x.dtype; the weighted combine accumulates in float32. Tokens with no pair get 0.
    """
    T, H, E, inter = _check(x, w13, w2)
    P = a.num_pairs
    if P == 0 or T == 0:
        return torch.zeros(T, H, dtype=x.dtype, device=x.device)
    order = torch.argsort(a.expert_ids, stable=True)  # [P] pair ids grouped by expert
    tok_sorted = a.token_ids[order]  # [P]
    w_sorted = a.weights[order].float()  # [P]
    counts = torch.bincount(a.expert_ids, minlength=E).tolist()  # the one host sync
    # Weighted expert outputs land in pair order, which is token-major; one segmented sum per token
    # then combines them. Copies, not accumulating scatters: index_add_ is serial on the CPU.
    y_pairs = torch.empty(P, H, dtype=torch.float32, device=x.device)  # [P, H]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = tok_sorted[start : start + n]  # [n]
        xe = x.index_select(0, tok)  # [n, H]
        gu = F.linear(xe, w13[e])  # [n, 2I]
        h = F.silu(gu[:, :inter]) * gu[:, inter:]  # [n, I]
        y = F.linear(h, w2[e]).float()  # [n, H]
        y.mul_(w_sorted[start : start + n, None])
        y_pairs.index_copy_(0, order[start : start + n], y)
        start += n
    lengths = a.token_offsets[1:] - a.token_offsets[:-1]  # [T], zero-length segments sum to 0
    out = torch.segment_reduce(y_pairs, "sum", lengths=lengths, axis=0)  # [T, H]
    return out.to(x.dtype)


def dense_moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, a: Assignment) -> torch.Tensor:
    """Every expert on every token in float32, weighted by `a.to_dense()` [T, E]. Tests only."""
    T, H, E, inter = _check(x, w13, w2)
    xf = x.float()  # [T, H]
    dense = a.to_dense().to(x.device)  # [T, E]
    gu = torch.einsum("th,ejh->etj", xf, w13.float())  # [E, T, 2I]
    h = F.silu(gu[..., :inter]) * gu[..., inter:]  # [E, T, I]
    y = torch.einsum("eti,ehi->eth", h, w2.float())  # [E, T, H]
    out = torch.einsum("te,eth->th", dense, y)  # [T, H]
    return out.to(x.dtype)
