"""Plain-torch fused MoE: the CPU path of the engine and the reference the Triton kernel must match.

`fused_moe_ref` does work proportional to the number of (token, expert) pairs, never T x E: pairs
are grouped by expert with one stable sort, the per-expert counts cross to the host once, and only
experts that received pairs run their two GEMMs. `dense_moe_reference` runs every expert on every
token and weights by the dense [T, E] matrix; it is slow and exists only for tests.

Both take gpt-oss's expert options: per-expert biases `b13` [E, 2I] (gate then up, as w13's rows)
and `b2` [E, H], and `activation` = a `ClampedSwiGLU` in place of silu(gate) * up. The native and
Triton kernels do not; `fused_moe` sends such layers here on every backend (still only the pairs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation (transformers' `GptOssExperts._apply_gate`) on gate g and up u:
    g = min(g, limit), u = clamp(u, -limit, limit), out = (u + 1) * g * sigmoid(alpha * g)."""

    alpha: float = 1.702
    limit: float = 7.0

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)  # [n, I]
        up = up.clamp(min=-self.limit, max=self.limit)  # [n, I]
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))  # [n, I]


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    a: Assignment,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: ClampedSwiGLU | None = None,
) -> torch.Tensor:
    """sum over token t's pairs (e, w) of w * (W2_e act(W13_e x_t + b13_e) + b2_e); [T, H] in x.dtype,
    act = silu(gate) * up unless `activation` is given; biases optional ([E, 2I], [E, H]).

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
        gu = F.linear(xe, w13[e], None if b13 is None else b13[e])  # [n, 2I]
        gate, up = gu[:, :inter], gu[:, inter:]  # [n, I] each
        h = F.silu(gate) * up if activation is None else activation(gate, up)  # [n, I]
        y = F.linear(h, w2[e], None if b2 is None else b2[e]).float()  # [n, H]
        y.mul_(w_sorted[start : start + n, None])
        y_pairs.index_copy_(0, order[start : start + n], y)
        start += n
    lengths = a.token_offsets[1:] - a.token_offsets[:-1]  # [T], zero-length segments sum to 0
    out = torch.segment_reduce(y_pairs, "sum", lengths=lengths, axis=0)  # [T, H]
    return out.to(x.dtype)


def dense_moe_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    a: Assignment,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: ClampedSwiGLU | None = None,
) -> torch.Tensor:
    """Every expert on every token in float32, weighted by `a.to_dense()` [T, E]. Tests only."""
    T, H, E, inter = _check(x, w13, w2)
    xf = x.float()  # [T, H]
    dense = a.to_dense().to(x.device)  # [T, E]
    gu = torch.einsum("th,ejh->etj", xf, w13.float())  # [E, T, 2I]
    if b13 is not None:
        gu = gu + b13.float()[:, None, :]
    gate, up = gu[..., :inter], gu[..., inter:]  # [E, T, I] each
    h = F.silu(gate) * up if activation is None else activation(gate, up)  # [E, T, I]
    y = torch.einsum("eti,ehi->eth", h, w2.float())  # [E, T, H]
    if b2 is not None:
        y = y + b2.float()[:, None, :]
    out = torch.einsum("te,eth->th", dense, y)  # [T, H]
    return out.to(x.dtype)


def moe_block_ref(
    y: torch.Tensor,
    h: torch.Tensor,
    w_router: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    route: Callable[[torch.Tensor], Assignment],
) -> tuple[torch.Tensor, Assignment]:
    """A MoE block op by op (what `cpu_native.moe_block` fuses): router logits y [T, H] @ w_router
    [E, H]^T in y's dtype, softmax in float32 (a NaN or +inf logit: the token's probabilities are 0),
    `route(probs [T, E]) -> Assignment`, and h [T, H] + `fused_moe_ref` on its pairs. Returns
    (out [T, H], the Assignment)."""
    logits = F.linear(y, w_router)  # [T, E]
    probs = torch.softmax(logits.float(), dim=-1).nan_to_num_(nan=0.0)  # [T, E]
    a = route(probs)
    return h + fused_moe_ref(y, w13, w2, a), a
