"""dynserve_kernels: the compute kernels of dynserve, each Triton kernel beside its torch reference.

Imported as `dynserve_kernels` (the folder is kernels/; a PyPI package named `kernels` exists).
Public ops (backend "torch" = the plain-torch reference, the CPU path; "triton" = GPU path, and
the Triton interpreter on CPU when TRITON_INTERPRET=1):

- fused_moe(x [T,H], w13 [E,2I,H], w2 [E,H,I], assignment) -> [T,H]
    sum over token t's (expert e, weight w) pairs of w * down_e(silu(gate_e(x)) * up_e(x));
    tokens with zero pairs get zeros. w13 rows [0, I) are gate, [I, 2I) are up.
- write_kv(key [T,Hkv,D], value [T,Hkv,D], kv_cache [2,N,bs,Hkv,D], slot_mapping [T])
    writes new K/V into the paged cache in place.
- paged_attention(q [T,Hq,D], kv_cache, batch, scale) -> [T,Hq,D]
    causal attention of each new token over its sequence's cached prefix and the new tokens
    (decode, prefill, and chunked prefill with a cached prefix; GQA by Hq // Hkv).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dynserve.model.base import ForwardBatch
    from dynserve.routing.base import Assignment

_BACKEND_ENV = "DYNSERVE_KERNEL_BACKEND"  # "torch" | "triton" forces a backend


def select_backend(device: torch.device | str, use_triton: bool | None = None) -> str:
    """Triton on CUDA, torch references on CPU, unless forced (config or env)."""
    forced = os.environ.get(_BACKEND_ENV)
    if forced:
        return forced
    if use_triton is not None:
        return "triton" if use_triton else "torch"
    return "triton" if torch.device(device).type == "cuda" else "torch"


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, assignment: Assignment, backend: str = "torch"
) -> torch.Tensor:
    if backend == "triton":
        from dynserve_kernels.moe_triton import fused_moe_triton

        return fused_moe_triton(x, w13, w2, assignment)
    from dynserve_kernels.moe_ref import fused_moe_ref

    return fused_moe_ref(x, w13, w2, assignment)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, backend: str = "torch"
) -> None:
    if backend == "triton":
        from dynserve_kernels.attention_triton import write_kv_triton

        return write_kv_triton(key, value, kv_cache, slot_mapping)
    from dynserve_kernels.attention_ref import write_kv_ref

    return write_kv_ref(key, value, kv_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch, scale: float, backend: str = "torch"
) -> torch.Tensor:
    if backend == "triton":
        from dynserve_kernels.attention_triton import paged_attention_triton

        return paged_attention_triton(q, kv_cache, batch, scale)
    from dynserve_kernels.attention_ref import paged_attention_ref

    return paged_attention_ref(q, kv_cache, batch, scale)
