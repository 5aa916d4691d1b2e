"""Torch reference of the RMSNorm kernel (`cpu_native.rms_norm`): the model's norm numerics."""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] -> weight * (x * rsqrt(mean(x^2) + eps)), normalized in float32 and cast back to
    x.dtype before the weight multiply (as transformers' RMSNorm does)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm_ref(x + residual), x + residual), the sum in x.dtype."""
    h = x + residual
    return rms_norm_ref(h, weight, eps), h
