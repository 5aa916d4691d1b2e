"""Torch reference of the rotary kernel (`cpu_native.rope`): neox-style rotate-halves rotary."""

from __future__ import annotations

import torch


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by cos/sin [T, R] (cos = [c, c], sin = [-s, s]); returns a new contiguous tensor.

    First half: x1 * c - x2 * s; second half: x2 * c + x1 * s (transformers' rotate_half form).
    With R < D (partial rotary, GLM-4.5) only the first R dims of each head rotate, their halves
    split at R/2 (not interleaved), and the last D - R dims pass through, as transformers does."""
    R = cos.shape[-1]
    if R < x.shape[-1]:
        return torch.cat([apply_rope_ref(x[..., :R], cos, sin), x[..., R:]], dim=-1)  # [T, H, D]
    rolled = torch.roll(x, x.shape[-1] // 2, dims=-1)  # [T, H, D] halves swapped
    return x * cos[:, None, :] + rolled * sin[:, None, :]
