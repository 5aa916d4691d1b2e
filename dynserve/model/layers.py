"""Layer modules shared by every architecture family: RMSNorm, rotary embedding, gated MLP, attention.

Owns the numerics that must match Hugging Face bit for bit in float32 (norm in float32, neox-style
rotary halves, softmax attention through the paged-KV kernels) and the loading of each module's
weights from Hugging Face tensor names (`load_hf(weights, prefix)`), including the merges done at
load time (q/k/v into one projection, gate/up into one projection).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import dynserve_kernels
import torch
import torch.nn.functional as F
from torch import nn

from dynserve.model.base import ForwardBatch

# ---------------------------------------------------------------------------------------------
# weight plumbing


# the 16 FP4 (e2m1) values by 4-bit code: sign bit 3, exponent bits 2-1, mantissa bit 0
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 (OCP microscaling FP4, gpt-oss's `*_blocks` / `*_scales`) -> `dtype`.

    blocks [..., G, 16] uint8 hold 32 FP4 e2m1 values per block of a row, two per byte, the low
    nibble first; scales [..., G] uint8 are e8m0 exponents, value = fp4 * 2^(scale - 127).
    Returns [..., G * 32]. Converted one leading slice (expert) at a time to bound host memory."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not fit scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32)  # [16]
    out = torch.empty(*blocks.shape[:-2], blocks.shape[-2] * 32, dtype=dtype)  # [..., G*32]
    flat_b = blocks.reshape(-1, *blocks.shape[-2:]) if blocks.dim() > 2 else blocks[None]  # [N, G, 16]
    flat_s = scales.reshape(-1, scales.shape[-1]) if scales.dim() > 1 else scales[None]  # [N, G]
    flat_o = out.view(-1, out.shape[-1])  # [N, G*32]
    for i in range(flat_b.shape[0]):
        b = flat_b[i].to(torch.uint8).long()  # [G, 16]
        vals = torch.stack([lut[b & 0x0F], lut[b >> 4]], dim=-1).reshape(b.shape[0], 32)  # [G, 32]
        exp = flat_s[i].to(torch.int32) - 127  # [G]
        flat_o[i] = torch.ldexp(vals, exp[:, None].float()).reshape(-1).to(dtype)  # [G*32]
    return out


class WeightSource:
    """Hugging Face-named checkpoint tensors, converted to the model's dtype on the way out.

    `get(name)` raises KeyError naming the tensor when the checkpoint does not have it.
    Tensors stay on the host until `assign_param` moves the final (merged/stacked) tensor.
    MXFP4 tensors (published gpt-oss experts: `<name>_blocks` + `<name>_scales`, quant_method
    "mxfp4") are dequantised here: `get(name)` returns the tensor an unquantised checkpoint stores
    under `name` (the [E, out, in] dequantised weight transposed to [E, in, out], as transformers'
    MXFP4 conversion does).
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.weights = weights
        self.dtype = dtype

    def _mxfp4(self, name: str) -> bool:
        return f"{name}_blocks" in self.weights and f"{name}_scales" in self.weights

    def has(self, name: str) -> bool:
        return name in self.weights or self._mxfp4(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weights:
            if self._mxfp4(name):
                w = dequantize_mxfp4(self.weights[f"{name}_blocks"], self.weights[f"{name}_scales"], self.dtype)
                return w.transpose(-1, -2)  # [E, out, in] -> [E, in, out]
            raise KeyError(f"checkpoint is missing tensor {name!r}")
        t = self.weights[name]
        return t.to(self.dtype) if t.is_floating_point() else t


def assign_param(
    module: nn.Module, attr: str, tensor: torch.Tensor, device: torch.device | str, source: str = ""
) -> None:
    """Replace `module.<attr>` with `tensor` (moved to `device`, contiguous, no grad), checking shape;
    `source` names the checkpoint tensor(s) in the error message."""
    old = getattr(module, attr)
    if old is not None and tuple(old.shape) != tuple(tensor.shape):
        raise ValueError(
            f"checkpoint tensor {source or attr!r} has shape {tuple(tensor.shape)}, "
            f"expected {tuple(old.shape)} for {type(module).__name__}.{attr}"
        )
    setattr(module, attr, nn.Parameter(tensor.to(device).contiguous(), requires_grad=False))


def load_linear(linear: nn.Linear, ws: WeightSource, prefixes: list[str], device: torch.device | str) -> None:
    """Load one Linear from one or more HF linears (`<prefix>.weight` / `.bias`), concatenated on rows."""
    names = [p + ".weight" for p in prefixes]
    assign_param(linear, "weight", torch.cat([ws.get(n) for n in names], dim=0), device, " + ".join(names))
    if linear.bias is not None:
        names = [p + ".bias" for p in prefixes]
        assign_param(linear, "bias", torch.cat([ws.get(n) for n in names], dim=0), device, " + ".join(names))


# ---------------------------------------------------------------------------------------------
# norms and activations


class Linear(nn.Linear):
    """nn.Linear through `dynserve_kernels.linear`, so the CPU path can use its native small-batch GEMM."""

    backend: str = "torch"  # set by `set_backend`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dynserve_kernels.linear(x, self.weight, self.bias, self.backend)


def set_backend(model: nn.Module, backend: str, fused_blocks: bool | None = None) -> None:
    """Point every module of `model` that calls kernels (those with a `backend` class attribute:
    Linear, attention, MoE blocks, the model itself) at the kernel backend: the one place it is set.
    `fused_blocks` (None: `DYNSERVE_FUSED_BLOCKS`, default on) lets the modules that have a fused
    decode block (a `fused_blocks` class attribute) run it in one kernel call where the backend can;
    off, they run op by op (the A/B switch of the decode benchmark)."""
    if fused_blocks is None:
        fused_blocks = os.environ.get("DYNSERVE_FUSED_BLOCKS", "1") != "0"
    for m in model.modules():
        if hasattr(type(m), "backend"):
            m.backend = backend
        if hasattr(type(m), "fused_blocks"):
            m.fused_blocks = fused_blocks


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in float32, scaled by a learned weight
    (`dynserve_kernels.rms_norm`: the native kernel on the CPU path, `norm_ref.rms_norm_ref` else)."""

    backend: str = "torch"  # set by `set_backend`

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dynserve_kernels.rms_norm(x, self.weight, self.eps, self.backend)  # [..., H]

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), the add fused into the norm on the CPU path."""
        return dynserve_kernels.add_rms_norm(x, residual, self.weight, self.eps, self.backend)

    def load_hf(self, ws: WeightSource, name: str, device: torch.device | str) -> None:
        assign_param(self, "weight", ws.get(name), device, name)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate then up) -> [..., I]: silu(gate) * up."""
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]


def check_silu(hf: dict[str, Any]) -> None:
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported (only silu)")


class GatedMLP(nn.Module):
    """Dense SwiGLU MLP: down(silu(gate(x)) * up(x)), gate and up merged into one projection."""

    def __init__(self, hidden: int, inter: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * inter, bias=bias)
        self.down_proj = Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))  # [T, H]

    def load_hf(
        self,
        ws: WeightSource,
        prefix: str,
        device: torch.device | str,
        names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    ) -> None:
        gate, up, down = names
        load_linear(self.gate_up_proj, ws, [f"{prefix}.{gate}", f"{prefix}.{up}"], device)
        load_linear(self.down_proj, ws, [f"{prefix}.{down}"], device)


# ---------------------------------------------------------------------------------------------
# rotary embedding


def rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """Merge transformers-5 `rope_parameters` and older `rope_theta` / `rope_scaling` into one dict
    with at least `rope_type` and `rope_theta`."""
    params: dict[str, Any] = {}
    params.update(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    if "rope_type" not in params:
        params["rope_type"] = params.get("type", "default")
    if params.get("rope_theta") is None:
        params["rope_theta"] = hf.get("rope_theta", 10000.0)
    return params


def rope_inv_freq(hf: dict[str, Any], head_dim: int, rotary_dim: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] (float32, host) and the cos/sin scale, as transformers computes them.

    R = `rotary_dim` when the family applies rotary to part of each head (it says so by passing
    it); otherwise R = head_dim, and a config asking for partial rotary is refused."""
    p = rope_parameters(hf)
    rope_type = p["rope_type"]
    base = float(p["rope_theta"])
    if rotary_dim is not None:
        dim = rotary_dim
    else:
        dim = int(head_dim * p.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        if dim != head_dim:
            raise ValueError(f"partial rotary embeddings (rotary dim {dim} < head_dim {head_dim}) are not supported")
    if dim % 2 or not 0 < dim <= head_dim:
        raise ValueError(f"rotary dim {dim} must be even and in (0, head_dim={head_dim}]")
    exps = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim  # [D/2]
    inv_freq = 1.0 / (base**exps)  # [D/2]
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(p["factor"]), 1.0
    if rope_type == "llama3":
        factor = float(p["factor"])
        low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_ctx = float(p.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq  # [D/2]
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type == "dynamic":
        # dynamic NTK only rescales past max_position_embeddings, which max_model_len never exceeds
        return inv_freq, 1.0
    if rope_type == "yarn":
        return _yarn(p, hf, exps, base, dim)
    raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, linear, dynamic, llama3, yarn)")


def _yarn(
    p: dict[str, Any], hf: dict[str, Any], exps: torch.Tensor, base: float, dim: int
) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies by `factor`, keep high ones, blend linearly in between;
    cos/sin are scaled by the attention factor."""
    max_pos = hf.get("max_position_embeddings", 2048)
    orig = p.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or max_pos
    factor = p.get("factor")
    factor = float(factor) if factor is not None else max_pos / orig

    def mscale_of(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = p.get("attention_factor")
    if attn is None:
        ms, ms_all = p.get("mscale"), p.get("mscale_all_dim")
        attn = mscale_of(factor, ms) / mscale_of(factor, ms_all) if ms and ms_all else mscale_of(factor)

    def correction_dim(rotations: float) -> float:  # dim index whose wavelength makes `rotations` turns
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)  # [D/2]
    keep = 1 - ramp  # weight of the original (extrapolated) frequency
    pos_freqs = base**exps  # [D/2]
    inv = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep  # [D/2]
    return inv, float(attn)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary position embedding (rotate halves), frequencies as transformers derives them.

    `forward(positions)` returns (cos, sin), each [T, R] in `dtype` (R = rotary_dim, default
    head_dim), computed once per step and shared by every layer: cos = [c, c] and sin = [-s, s],
    so that rope(x) = x * cos + swap_halves(x) * sin on the first R dims (see `apply_rope`).
    """

    def __init__(self, hf: dict[str, Any], head_dim: int, rotary_dim: int | None = None) -> None:
        super().__init__()
        inv_freq, self.scale = rope_inv_freq(hf, head_dim, rotary_dim)
        self._inv_freq: dict[torch.device, torch.Tensor] = {torch.device("cpu"): inv_freq}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self._inv_freq.get(positions.device)
        if inv is None:
            inv = self._inv_freq[torch.device("cpu")].to(positions.device)
            self._inv_freq[positions.device] = inv
        freqs = positions.float()[:, None] * inv[None, :]  # [T, D/2]
        c, s = freqs.cos(), freqs.sin()
        if self.scale != 1.0:
            c, s = c * self.scale, s * self.scale
        cos = torch.cat((c, c), dim=-1)  # [T, D]
        sin = torch.cat((-s, s), dim=-1)  # [T, D]
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """x [T, H, D] rotated by `RotaryEmbedding`'s cos/sin [T, R]; returns a new contiguous tensor.

    First half: x1 * c - x2 * s; second half: x2 * c + x1 * s (transformers' rotate_half form).
    With R < D (partial rotary, GLM-4.5) only the first R dims of each head rotate, their halves
    split at R/2 (not interleaved), and the last D - R dims pass through, as transformers does.
    `dynserve_kernels.apply_rope`: native on the CPU path, `rope_ref.apply_rope_ref` otherwise."""
    return dynserve_kernels.apply_rope(x, cos, sin, backend)


# ---------------------------------------------------------------------------------------------
# attention


class Attention(nn.Module):
    """Self-attention over the paged KV cache: merged q/k/v projection (optional bias), optional
    q/k RMSNorm ("head": per head over head_dim, as Qwen3; "full": over the whole projected q/k,
    as OLMoE), optional clipping, rotary, write_kv, paged_attention, o_proj. gpt-oss: learned
    attention sinks (`sinks`: one logit per query head, `<prefix>.sinks`) and a sliding `window`
    (> 0: each query sees its last `window` positions), both applied by every kernel backend."""

    backend: str = "torch"  # set by `set_backend`
    fused_blocks: bool = True  # set by `set_backend`: `forward_block` may fuse the decode block

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        clip_qkv: float | None = None,
        sinks: bool = False,
        window: int = 0,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, hidden, bias=o_bias)
        self.qk_norm = qk_norm
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(head_dim, norm_eps), RMSNorm(head_dim, norm_eps)
        elif qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(self.q_size, norm_eps), RMSNorm(self.kv_size, norm_eps)
        elif qk_norm is not None:
            raise ValueError(f"qk_norm must be None, 'head' or 'full', got {qk_norm!r}")
        self.clip_qkv = clip_qkv
        self.sinks = nn.Parameter(torch.zeros(num_heads), requires_grad=False) if sinks else None  # [Hq]
        self.window = window

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        T = x.shape[0]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        if self.qk_norm is None and self.clip_qkv is None:
            # q and k rotated in one op; q and k stay views of that result
            qk_in = qkv[:, : self.q_size + self.kv_size].view(T, hq + hkv, d)  # [T, Hq+Hkv, D], a view
            qk = apply_rope(qk_in, cos, sin, self.backend)  # [T, Hq+Hkv, D]
            q, k = qk[:, :hq], qk[:, hq:]  # [T, Hq, D], [T, Hkv, D]
            v = qkv[:, self.q_size + self.kv_size :].view(T, hkv, d)  # [T, Hkv, D]
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            if self.qk_norm == "full":
                q, k = self.q_norm(q), self.k_norm(k)  # [T, Hq D], [T, Hkv D]
            if self.clip_qkv is not None:
                c = self.clip_qkv
                q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
            q, k, v = q.view(T, hq, d), k.reshape(T, hkv, d), v.reshape(T, hkv, d)
            if self.qk_norm == "head":
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin, self.backend), apply_rope(k, cos, sin, self.backend)
        if self.backend == "triton":  # the Triton kernels take dense inputs
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        dynserve_kernels.write_kv(k, v, kv_cache, batch.slot_mapping, self.backend)
        o = dynserve_kernels.paged_attention(
            q, kv_cache, batch, self.scale, self.backend, self.sinks, self.window
        )  # [T, Hq, D]
        return self.o_proj(o.reshape(T, self.q_size))  # [T, H]

    def fusable_block(self) -> bool:
        """Whether this attention is what the fused decode attention block computes (plain attention:
        no q/k norm, clipping, sinks, window or projection biases) and fused blocks are on."""
        return not (
            not self.fused_blocks
            or self.qk_norm is not None
            or self.clip_qkv is not None
            or self.sinks is not None
            or self.window
            or self.qkv_proj.bias is not None
            or self.o_proj.bias is not None
        )

    def forward_block(
        self,
        x: torch.Tensor,
        input_norm: RMSNorm,
        post_norm: RMSNorm,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(post_norm(h), h), h = x + self(input_norm(x)), in one kernel call where the backend fuses
        the block (decode steps of plain attention: no q/k norm, clipping, sinks, window or biases);
        None otherwise."""
        if not self.fusable_block():
            return None
        return dynserve_kernels.attention_block(
            x, (input_norm.weight, input_norm.eps), self.qkv_proj.weight, cos, sin, kv_cache, batch.slot_mapping,
            batch, self.scale, self.o_proj.weight, (post_norm.weight, post_norm.eps), self.num_heads, self.backend,
        )  # fmt: skip

    def load_hf(self, ws: WeightSource, prefix: str, device: torch.device | str) -> None:
        load_linear(self.qkv_proj, ws, [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"], device)
        load_linear(self.o_proj, ws, [f"{prefix}.o_proj"], device)
        if self.qk_norm is not None:
            self.q_norm.load_hf(ws, f"{prefix}.q_norm.weight", device)
            self.k_norm.load_hf(ws, f"{prefix}.k_norm.weight", device)
        if self.sinks is not None:
            assign_param(self, "sinks", ws.get(f"{prefix}.sinks"), device, f"{prefix}.sinks")
