"""Multi-head latent attention (MLA; DeepSeek-V2/V3, LongCat-Flash) over the paged KV cache.

Owns `LatentAttention` (the module) and `MLA` (the attention kind a `DecoderSpec` names). q comes
from a LoRA (q_a -> RMSNorm -> q_b) or, with `q_lora_rank: null`, one projection; k/v are
decompressed from a shared latent (kv_a -> RMSNorm -> kv_b) plus one shared rotary key head.

Compressed cache: the paged cache holds one row per token, [latent c (kv_lora_rank), roped k_rope
(qk_rope_head_dim)], as one KV head whose K and V halves are the same memory (`shared_kv`), instead
of per-head K and V (DeepSeek-V3: 576 values per token per layer instead of 2 x 128 x 192). Attention
absorbs the up-projections (DeepSeek's "absorb" inference, vLLM's MLA): with kv_b = [W_UK; W_UV] per
head, q_nope . (W_UK c) = (W_UK^T q_nope) . c, so each head's query becomes [W_UK^T q_nope, q_rope]
and attends over the cached rows as multi-query attention with V = K; the first kv_lora_rank dims of
its output, times W_UV^T, are the head's value. The generic paged-attention kernels serve it.

Rotary layout: DeepSeek's checkpoints lay the rotary dims out in interleaved pairs (x0, x1),
(x2, x3), ...; the rows of the projections that produce them are de-interleaved at load time, so
the neox-style `apply_rope` (rotate halves) reproduces transformers' interleaved rotary (q.k is
unchanged by permuting the dims of both). Softmax scale: qk_head_dim^-0.5, times mscale^2 for
YaRN with `mscale_all_dim`, as transformers computes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import dynserve_kernels
import torch
from torch import nn

from dynserve.config import ModelConfig
from dynserve.model.base import ForwardBatch
from dynserve.model.layers import (
    Linear,
    RMSNorm,
    RotaryEmbedding,
    WeightSource,
    apply_rope,
    assign_param,
    load_linear,
    rope_parameters,
)

if TYPE_CHECKING:
    from dynserve.model.decoder import DecoderSpec

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the default eps


def qk_head_dim(hf: Mapping[str, Any]) -> int:
    return int(hf.get("qk_head_dim") or hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"])


def mla_cache_head_dim(hf: Mapping[str, Any]) -> int:
    """Width of the compressed cache's one row per token: kv_lora_rank + qk_rope_head_dim."""
    return int(hf["kv_lora_rank"]) + int(hf["qk_rope_head_dim"])


def check_mla_heads(cfg: ModelConfig) -> None:
    """MLA decompresses one K/V per query head: num_key_value_heads must equal num_attention_heads."""
    kv_heads = cfg.hf.get("num_key_value_heads") or cfg.num_heads
    if kv_heads != cfg.num_heads:
        raise ValueError(
            f"{cfg.architecture}: multi-head latent attention needs num_key_value_heads == num_attention_heads "
            f"({kv_heads} != {cfg.num_heads})"
        )


def deinterleave(rows: int) -> torch.Tensor:
    """Row order [0, 2, 4, ..., 1, 3, 5, ...] of a `rows`-dim rotary block: interleaved pairs
    (x0, x1), (x2, x3), ... become halves, the layout `apply_rope` rotates."""
    return torch.cat([torch.arange(0, rows, 2), torch.arange(1, rows, 2)])


def yarn_softmax_mscale(hf: Mapping[str, Any]) -> float:
    """transformers' extra softmax scale for YaRN with `mscale_all_dim`: mscale(factor, mscale_all_dim)^2."""
    p = rope_parameters(dict(hf))
    all_dim = p.get("mscale_all_dim") or 0
    if p["rope_type"] == "default" or not all_dim:
        return 1.0
    factor = float(p["factor"])
    m = 1.0 if factor <= 1 else 0.1 * all_dim * math.log(factor) + 1.0
    return m * m


class LatentAttention(nn.Module):
    """Multi-head latent attention over the paged KV cache. Owns the merged down-projection
    `qkv_a_proj` (q_a_proj — or, without q LoRA, q_proj — and kv_a_proj_with_mqa rows), the q
    up-projection and norm (q LoRA only), kv_a_layernorm, kv_b_proj (as `w_uk` / `w_uv`) and o_proj; caches the latent
    row [c, k_rope] (`cache_dim` = kv_lora_rank + qk_rope_head_dim) once per token.

    `lora_scales` multiplies q by sqrt(hidden / q_lora_rank) and the normed kv latent by
    sqrt(hidden / kv_lora_rank) (LongCat-Flash); `interleaved_rope` says the checkpoint's rotary
    dims are interleaved pairs (DeepSeek's layout; de-interleaved at load)."""

    backend: str = "torch"  # set by `set_backend`

    def __init__(self, cfg: ModelConfig, *, lora_scales: bool = False, interleaved_rope: bool = True) -> None:
        super().__init__()
        check_mla_heads(cfg)
        hf = cfg.hf
        H = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_lora_rank = int(hf["q_lora_rank"]) if hf.get("q_lora_rank") else None
        self.kv_lora_rank = int(hf["kv_lora_rank"])
        self.nope, self.rope = int(hf["qk_nope_head_dim"]), int(hf["qk_rope_head_dim"])
        self.qk_dim, self.v_dim = qk_head_dim(hf), int(hf["v_head_dim"])
        if self.qk_dim != self.nope + self.rope:
            raise ValueError(f"qk_head_dim {self.qk_dim} != qk_nope_head_dim + qk_rope_head_dim")
        self.cache_dim = self.kv_lora_rank + self.rope
        self.interleaved_rope = interleaved_rope
        bias = bool(hf.get("attention_bias", False))
        q_out = self.q_lora_rank if self.q_lora_rank is not None else self.num_heads * self.qk_dim
        self.q_out = q_out
        self.qkv_a_proj = Linear(H, q_out + self.kv_lora_rank + self.rope, bias=bias)
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: Linear | None = None
        if self.q_lora_rank is not None:
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(self.q_lora_rank, self.num_heads * self.qk_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        # kv_b_proj [Hq (Dn + Dv), Rkv] split per head into the absorbed forms (kv_b_proj itself is never run):
        # w_uk [Hq, Dn, Rkv] (q_nope -> latent space) and w_uv [Hq, Rkv, Dv] (latent -> value), each dense
        self.w_uk = nn.Parameter(torch.empty(self.num_heads, self.nope, self.kv_lora_rank), requires_grad=False)
        self.w_uv = nn.Parameter(torch.empty(self.num_heads, self.kv_lora_rank, self.v_dim), requires_grad=False)
        self.o_proj = Linear(self.num_heads * self.v_dim, H, bias=bias)
        self.q_lora_scale = self.kv_lora_scale = 1.0
        if lora_scales:
            if self.q_lora_rank is None:
                raise ValueError("LoRA scales need a q_lora_rank")
            self.q_lora_scale = (H / self.q_lora_rank) ** 0.5
            self.kv_lora_scale = (H / self.kv_lora_rank) ** 0.5
        self.scale = self.qk_dim**-0.5 * yarn_softmax_mscale(hf)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        T = x.shape[0]
        nh, nope, rank = self.num_heads, self.nope, self.kv_lora_rank
        q_lat, kv_lat, k_rope = self.qkv_a_proj(x).split([self.q_out, rank, self.rope], dim=-1)
        if self.q_b_proj is not None:
            assert self.q_a_layernorm is not None
            q_lat = self.q_b_proj(self.q_a_layernorm(q_lat))  # [T, Hq Dqk]
        q = q_lat.reshape(T, nh, self.qk_dim)  # [T, Hq, Dqk]
        if self.q_lora_scale != 1.0:
            q = q * self.q_lora_scale
        kv_lat = self.kv_a_layernorm(kv_lat)  # [T, Rkv]
        if self.kv_lora_scale != 1.0:
            kv_lat = kv_lat * self.kv_lora_scale
        k_rope = apply_rope(k_rope.reshape(T, 1, self.rope), cos, sin)  # [T, 1, Dr]
        row = torch.cat([kv_lat.unsqueeze(1), k_rope], dim=-1)  # [T, 1, Rkv + Dr]: the cached latent
        dynserve_kernels.write_kv(row, row, kv_cache, batch.slot_mapping, self.backend)
        # (a dense copy first: CPU bmm over a strided batch can take a slow path)
        q_nope = torch.bmm(q[..., :nope].transpose(0, 1).contiguous(), self.w_uk)  # [Hq, T, Rkv]: W_UK^T q_nope
        q_rope = apply_rope(q[..., nope:], cos, sin)  # [T, Hq, Dr]
        q = torch.cat([q_nope.transpose(0, 1), q_rope], dim=-1)  # [T, Hq, Rkv + Dr]
        o = dynserve_kernels.paged_attention(q, kv_cache, batch, self.scale, self.backend)  # [T, Hq, Rkv + Dr]
        o = torch.bmm(o[..., :rank].transpose(0, 1), self.w_uv)  # [Hq, T, Dv]: W_UV c
        return self.o_proj(o.transpose(0, 1).reshape(T, nh * self.v_dim))  # [T, H]

    def load_hf(self, ws: WeightSource, prefix: str, device: torch.device | str) -> None:
        """`<prefix>.q_a_proj` + `.q_a_layernorm` + `.q_b_proj` (or `.q_proj`), `.kv_a_proj_with_mqa`,
        `.kv_a_layernorm`, `.kv_b_proj`, `.o_proj`. With an interleaved rotary layout the rotary rows
        (kv_a's last `rope` rows, the last `rope` rows of every q head) are de-interleaved; new
        tensors, so the caller's weights are left untouched."""
        rope_rows = deinterleave(self.rope) if self.interleaved_rope else torch.arange(self.rope)
        kv_rows = torch.cat([torch.arange(self.kv_lora_rank), self.kv_lora_rank + rope_rows])  # [Rkv + Dr]
        head_rows = torch.cat([torch.arange(self.nope), self.nope + rope_rows])  # [Dqk]

        def per_head(w: torch.Tensor) -> torch.Tensor:  # [Hq Dqk, ...] rows permuted within each head
            return w.view(self.num_heads, self.qk_dim, *w.shape[1:])[:, head_rows].reshape(w.shape)

        kva = f"{prefix}.kv_a_proj_with_mqa"
        qa = f"{prefix}.q_a_proj" if self.q_lora_rank is not None else f"{prefix}.q_proj"
        q_w = ws.get(f"{qa}.weight")  # [Rq, H] or [Hq Dqk, H]
        if self.q_lora_rank is None:
            q_w = per_head(q_w)
        w = torch.cat([q_w, ws.get(f"{kva}.weight")[kv_rows]])  # [Rq + Rkv + Dr, H]
        assign_param(self.qkv_a_proj, "weight", w, device, f"{qa}.weight + {kva}.weight")
        if self.qkv_a_proj.bias is not None:
            if ws.has(f"{qa}.bias"):
                q_b = ws.get(f"{qa}.bias")
                q_b = per_head(q_b) if self.q_lora_rank is None else q_b
            else:  # transformers' q_proj (no q LoRA) has no bias even with attention_bias
                q_b = torch.zeros(self.q_out, dtype=ws.dtype)
            bias = torch.cat([q_b, ws.get(f"{kva}.bias")[kv_rows]])
            assign_param(self.qkv_a_proj, "bias", bias, device, f"{qa}.bias + {kva}.bias")
        if self.q_b_proj is not None:
            assert self.q_a_layernorm is not None
            name = f"{prefix}.q_b_proj.weight"
            assign_param(self.q_b_proj, "weight", per_head(ws.get(name)), device, name)  # [Hq Dqk, Rq]
            self.q_a_layernorm.load_hf(ws, f"{prefix}.q_a_layernorm.weight", device)
        name = f"{prefix}.kv_b_proj.weight"
        w_kv = ws.get(name).view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)  # [Hq, Dn + Dv, Rkv]
        assign_param(self, "w_uk", w_kv[:, : self.nope], device, name)
        assign_param(self, "w_uv", w_kv[:, self.nope :].transpose(1, 2), device, name)
        load_linear(self.o_proj, ws, [f"{prefix}.o_proj"], device)
        self.kv_a_layernorm.load_hf(ws, f"{prefix}.kv_a_layernorm.weight", device)


@dataclass(frozen=True)
class MLA:
    """The multi-head latent attention kind of a `DecoderSpec` (see `LatentAttention` for the flags)."""

    lora_scales: bool = False
    interleaved_rope: bool = True

    def build(self, cfg: ModelConfig, spec: DecoderSpec, layer_idx: int = 0) -> nn.Module:
        return LatentAttention(cfg, lora_scales=self.lora_scales, interleaved_rope=self.interleaved_rope)

    shared_kv: ClassVar[bool] = True

    def cache_layout(self, cfg: ModelConfig) -> tuple[int, int]:
        """(heads, width) of one layer's paged cache: one latent row [c, k_rope] per token."""
        return 1, mla_cache_head_dim(cfg.hf)

    def rotary(self, cfg: ModelConfig, spec: DecoderSpec) -> RotaryEmbedding:
        """Rotary over the qk_rope_head_dim dims (transformers' rotary reads head_dim, which DeepSeek's
        configs set to qk_rope_head_dim)."""
        rope = int(cfg.hf["qk_rope_head_dim"])
        head_dim = int(cfg.hf.get("head_dim") or rope)
        if head_dim != rope:
            raise ValueError(
                f"{cfg.architecture}: head_dim ({head_dim}) must equal qk_rope_head_dim ({rope}): "
                "transformers' rotary embedding uses head_dim"
            )
        return RotaryEmbedding(cfg.hf, rope)
