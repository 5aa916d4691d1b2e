"""dynserve_kernels: the compute kernels of dynserve, each Triton kernel beside its torch reference.

Imported as `dynserve_kernels` (the folder is kernels/; a PyPI package named `kernels` exists).
Backends: "torch" = the plain-torch references only; "cpu" = the CPU path: the native C kernels of
`cpu_native` where they apply (float32 decode-sized work; bfloat16 GEMMs and MoE at any size, decode
attention) and the torch references elsewhere, or
everywhere when no C compiler is available; "triton" = the GPU path, and the Triton interpreter on
CPU when TRITON_INTERPRET=1. Public ops:

- fused_moe(x [T,H], w13 [E,2I,H], w2 [E,H,I], assignment) -> [T,H]  ("cpu": native for decode-sized
  expert groups, see cpu_native.takes_moe)
    sum over token t's (expert e, weight w) pairs of w * down_e(silu(gate_e(x)) * up_e(x));
    tokens with zero pairs get zeros. w13 rows [0, I) are gate, [I, 2I) are up. Optional (gpt-oss):
    expert biases b13 [E,2I], b2 [E,H] and `activation` = moe_ref.ClampedSwiGLU; such layers run the
    per-expert torch reference on every backend (work still proportional to the pairs).
- linear(x [T,K], weight [N,K], bias [N] | None) -> [T,N]  ("cpu": the native small-M GEMM for
  decode-sized T, which streams a cold weight faster than MKL; F.linear otherwise)
- rms_norm(x [..., H], weight [H], eps) -> [..., H]; add_rms_norm(x, residual, weight, eps) ->
  (rms_norm(x + residual), x + residual)  ("cpu": native for float32/bfloat16, see cpu_native.rms_norm)
- apply_rope(x [T,H,D], cos [T,R], sin [T,R]) -> [T,H,D] neox rotary (rope_ref.apply_rope_ref; "cpu": native)
- write_kv(key [T,Hkv,D], value [T,Hkv,D], kv_cache [2,N,bs,Hkv,D], slot_mapping [T])
    writes new K/V into the paged cache in place.
- paged_attention(q [T,Hq,D], kv_cache, batch, scale, sinks=None, window=None) -> [T,Hq,D]
    causal attention of each new token over its sequence's cached prefix and the new tokens
    (decode, prefill, and chunked prefill with a cached prefix; GQA by Hq // Hkv). Optional
    (gpt-oss): `sinks` [Hq] float32, a per-head logit added to the softmax denominator with no
    value; `window` W > 0, a sliding window (position p sees p - W + 1 .. p). Every backend takes both.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import TYPE_CHECKING

import torch
from dynserve_kernels import cpu_native

if TYPE_CHECKING:
    from dynserve_kernels.metadata import AttentionMetadata
    from dynserve_kernels.moe_ref import ClampedSwiGLU

    from dynserve.routing.base import Assignment

_BACKEND_ENV = "DYNSERVE_KERNEL_BACKEND"  # "torch" | "cpu" | "triton" forces a backend
BACKENDS = ("torch", "cpu", "triton")


def select_backend(device: torch.device | str, use_triton: bool | None = None) -> str:
    """Triton on CUDA, the CPU path ("cpu") on CPU, unless forced (config or env)."""
    forced = os.environ.get(_BACKEND_ENV)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{_BACKEND_ENV}={forced!r}: expected one of {', '.join(BACKENDS)}")
        return forced
    on_cuda = torch.device(device).type == "cuda"
    if use_triton or (use_triton is None and on_cuda):
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError(
                "the Triton kernels need the triton package (pip install 'dynserve[cuda]'); "
                "without it, run on the CPU or pass use_triton=False"
            )
        if on_cuda and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            # correct but ~1000x slower: the kernels run on the CPU interpreter against GPU tensors
            warnings.warn(
                "TRITON_INTERPRET=1 is set but the device is CUDA: the Triton kernels will run in the CPU "
                "interpreter (~1000x slower). Unset TRITON_INTERPRET (or set it to 0) to run them compiled.",
                RuntimeWarning,
                stacklevel=2,
            )
        return "triton"
    return "torch" if on_cuda else "cpu"


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    assignment: Assignment,
    backend: str = "torch",
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: ClampedSwiGLU | None = None,
) -> torch.Tensor:
    if b13 is not None or b2 is not None or activation is not None:
        # expert biases / clamped SwiGLU (gpt-oss): the per-expert torch path on every backend
        from dynserve_kernels.moe_ref import fused_moe_ref

        return fused_moe_ref(x, w13, w2, assignment, b13, b2, activation)
    if backend == "triton":
        from dynserve_kernels.moe_triton import fused_moe_triton

        return fused_moe_triton(x, w13, w2, assignment)
    if backend == "cpu" and assignment.num_pairs > 0 and x.device.type == "cpu":  # never CUDA tensors
        a = assignment
        counts = None  # [E] rows per expert, needed only when a float32 expert might exceed the native limit
        if x.dtype == torch.float32 and x.shape[0] > cpu_native.NATIVE_MOE_MAX_ROWS:
            counts = torch.bincount(a.expert_ids, minlength=w13.shape[0])
        if cpu_native.takes_moe(x, w13, w2, counts):
            return cpu_native.fused_moe(x, w13, w2, a.token_ids, a.expert_ids, a.weights, a.token_offsets)
    from dynserve_kernels.moe_ref import fused_moe_ref

    return fused_moe_ref(x, w13, w2, assignment)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: str = "torch"
) -> torch.Tensor:
    if backend == "cpu" and cpu_native.takes_linear(x, weight) and (bias is None or bias.dtype == x.dtype):
        return cpu_native.gemm_nt(x, weight, bias=bias)  # [T, N]
    return torch.nn.functional.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "torch") -> torch.Tensor:
    if backend == "cpu" and cpu_native.takes_rms_norm(x, weight):
        return cpu_native.rms_norm(x, weight, eps, checked=True)[0]
    from dynserve_kernels.norm_ref import rms_norm_ref

    return rms_norm_ref(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    if (
        backend == "cpu"
        and cpu_native.takes_rms_norm(x, weight)
        and residual.dtype is x.dtype
        and residual.shape == x.shape
        and residual.is_contiguous()
    ):
        out, h = cpu_native.rms_norm(x, weight, eps, residual, checked=True)
        assert h is not None
        return out, h
    from dynserve_kernels.norm_ref import add_rms_norm_ref

    return add_rms_norm_ref(x, residual, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    if backend == "cpu" and cpu_native.takes_rope(x, cos, sin):
        return cpu_native.rope(x, cos, sin, checked=True)  # [T, H, D]
    from dynserve_kernels.rope_ref import apply_rope_ref

    return apply_rope_ref(x, cos, sin)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, backend: str = "torch"
) -> None:
    if backend == "triton":
        from dynserve_kernels.attention_triton import write_kv_triton

        return write_kv_triton(key, value, kv_cache, slot_mapping)
    if backend == "cpu" and cpu_native.takes_write_kv(key, value, kv_cache, slot_mapping):
        return cpu_native.write_kv(key, value, kv_cache, slot_mapping, checked=True)
    from dynserve_kernels.attention_ref import write_kv_ref

    return write_kv_ref(key, value, kv_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    batch: AttentionMetadata,
    scale: float,
    backend: str = "torch",
    sinks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    if backend == "triton":
        from dynserve_kernels.attention_triton import paged_attention_triton

        return paged_attention_triton(q, kv_cache, batch, scale, sinks, window)
    if backend == "cpu" and cpu_native.takes_decode_attention(q, kv_cache, batch):
        return cpu_native.paged_decode_attention(
            q, kv_cache, batch.block_tables, batch.seq_lens, scale, sinks=sinks, window=window
        )
    from dynserve_kernels.attention_ref import paged_attention_ref

    return paged_attention_ref(q, kv_cache, batch, scale, sinks, window)


def attention_block(
    x: torch.Tensor,
    in_norm: tuple[torch.Tensor, float],
    w_qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    batch: AttentionMetadata,
    scale: float,
    w_o: torch.Tensor,
    post_norm: tuple[torch.Tensor, float],
    num_heads: int,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A decode step's whole attention block (norm, qkv, rope, KV write, attention, o_proj, residual
    add and the next norm; `attention_ref.attention_block_ref`) in one call where the backend has a
    kernel for it (cpu: `cpu_native.attention_block`) -> (y, h); None where it has not, and the caller
    runs the block op by op."""
    if backend == "cpu" and cpu_native.takes_attention_block(
        x, w_qkv, w_o, (in_norm[0], post_norm[0]), cos, sin, kv_cache, slot_mapping, batch
    ):
        return cpu_native.attention_block(
            x, in_norm, w_qkv, cos, sin, kv_cache, slot_mapping, batch, scale, w_o, post_norm, num_heads
        )
    return None


def moe_block(
    y: torch.Tensor,
    h: torch.Tensor,
    w_router: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    rows: tuple[tuple, ...],
    config_index: torch.Tensor | None,
    backend: str = "torch",
) -> cpu_native.MoEBlockResult | None:
    """A decode step's whole MoE block (router, softmax, each token's routing config as `rows`, the
    fused experts and the residual add; `moe_ref.moe_block_ref`) in one call where the backend has a
    kernel for it (cpu: `cpu_native.moe_block`); None where it has not, or where the native pass
    cannot promise torch.topk's picks for a checkpoint top_k token, and the caller runs the block op by
    op."""
    if backend == "cpu" and cpu_native.takes_moe_block(y, h, w_router, w13, w2):
        return cpu_native.moe_block(y, h, w_router, w13, w2, rows, config_index)
    return None


def decode_layers(
    layers: list[cpu_native.DecodeLayerWeights],
    num_heads: int,
    in_eps: float,
    post_eps: float,
    scale: float,
    backend: str = "torch",
) -> cpu_native.DecodeLayers | None:
    """A model's [attention block, MoE block] decode layers as one native call per step where the
    backend has it (cpu: `cpu_native.DecodeLayers`, the fused blocks' kernels layer after layer); None
    where it has not or the layers are not what it takes (then each layer runs its own blocks)."""
    if backend != "cpu" or not cpu_native.available():
        return None
    try:
        return cpu_native.DecodeLayers(layers, num_heads, in_eps, post_eps, scale)
    except ValueError:
        return None


def route_selector(backend: str) -> object | None:
    """The native routing pass for `backend` (`dynserve.routing.policies.route(..., select=...)`): the
    CPU one on the "cpu" backend when the native kernels are built, else None (torch routing)."""
    if backend == "cpu" and cpu_native.available():
        return cpu_native.ROUTE_SELECTOR
    return None
