"""LongCat-Flash (transformers `longcat_flash`): zero-computation experts, MLA, shortcut-connected MoE.

Each of the `num_layers` decoder layers holds two attention sublayers, two dense SwiGLU MLPs and one
MoE block whose output is added at the end of the layer (shortcut-connected MoE):

    h = x + attn0(ln_in0(x));  y = ln_post0(h);  moe_out = moe(y);  h = h + mlp0(y)
    h = h + attn1(ln_in1(h));  out = h + mlp1(ln_post1(h)) + moe_out

The router scores N routed FFN experts plus Z *zero experts* (identity functions) with a float32
softmax, picks the top `moe_topk` of score + `e_score_correction_bias`, and weights each pick by its
unbiased score x `routed_scaling_factor` (no renormalisation). A picked zero expert adds w * x. Here
the Assignment holds only the FFN picks, so a token that picks zero experts costs fewer expert GEMMs
(vLLM and SGLang map those slots to expert 0 with weight 0 and run them anyway); the zero experts'
weight becomes the Assignment's `identity_weight`. The checkpoint's rule always applies: requests'
RoutingConfig policies are ignored for this family (see RoutingConfig).

Attention is multi-head latent attention (DeepSeek-V3 style, with LongCat's LoRA scales). The paged
cache holds the decompressed per-head key [k_nope, k_rope] and value, both zero-padded to
max(qk_head_dim, v_head_dim), so the generic paged-attention kernels serve it unchanged; the rotary
part of q and k is de-interleaved at load time (rows of the projections permuted) so that the
neox-style `apply_rope` reproduces transformers' interleaved rotary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import dynserve_kernels
import torch
import torch.nn.functional as F
from torch import nn

from dynserve.config import ModelConfig
from dynserve.model.base import CausalLM, ForwardBatch
from dynserve.model.decoder import torch_dtype
from dynserve.model.layers import (
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    WeightSource,
    apply_rope,
    assign_param,
    check_silu,
    load_linear,
    rope_parameters,
)
from dynserve.model.moe import QWEN_EXPERT_NAMES, ExpertNames, MoEBlock, _maybe_transposed
from dynserve.routing import Assignment, CheckpointRule, route_with_zero_experts

_LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the default eps


def _hf_num_layers(hf: Mapping[str, Any]) -> int:
    """Decoder layers (each with two attention sublayers): `num_layers`, else num_hidden_layers / 2."""
    if hf.get("num_layers") is not None:
        return int(hf["num_layers"])
    return int(hf["num_hidden_layers"]) // 2


def _qk_head_dim(hf: Mapping[str, Any]) -> int:
    return int(hf.get("qk_head_dim") or hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"])


def _deinterleave(rows: int) -> torch.Tensor:
    """Row order [0, 2, 4, ..., 1, 3, 5, ...] of a `rows`-dim rotary block: interleaved pairs
    (x0, x1), (x2, x3), ... become halves, the layout `apply_rope` rotates."""
    return torch.cat([torch.arange(0, rows, 2), torch.arange(1, rows, 2)])


def _fp32(ws: WeightSource, name: str) -> torch.Tensor:
    """A checkpoint tensor in float32 whatever the model dtype (router weights stay float32)."""
    if not ws.has(name):
        raise KeyError(f"checkpoint is missing tensor {name!r}")
    return ws.weights[name].float()


class LatentAttention(nn.Module):
    """Multi-head latent attention over the paged KV cache: q through a LoRA (q_a -> RMSNorm -> q_b),
    k/v decompressed from a shared latent (kv_a -> RMSNorm -> kv_b) plus one shared rotary key head.
    Owns the merged down-projection `qkv_a_proj` (q_a_proj and kv_a_proj_with_mqa rows), the up
    projections, the two latent norms and o_proj; caches per-head K and V padded to `cache_dim`."""

    backend: str = "torch"  # set by `set_backend`

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hf = cfg.hf
        H = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_lora_rank, self.kv_lora_rank = int(hf["q_lora_rank"]), int(hf["kv_lora_rank"])
        self.nope, self.rope = int(hf["qk_nope_head_dim"]), int(hf["qk_rope_head_dim"])
        self.qk_dim, self.v_dim = _qk_head_dim(hf), int(hf["v_head_dim"])
        if self.qk_dim != self.nope + self.rope:
            raise ValueError(f"qk_head_dim {self.qk_dim} != qk_nope_head_dim + qk_rope_head_dim")
        self.cache_dim = max(self.qk_dim, self.v_dim)
        bias = bool(hf.get("attention_bias", False))
        self.qkv_a_proj = Linear(H, self.q_lora_rank + self.kv_lora_rank + self.rope, bias=bias)
        self.q_a_layernorm = RMSNorm(self.q_lora_rank, _LATENT_NORM_EPS)
        self.q_b_proj = Linear(self.q_lora_rank, self.num_heads * self.qk_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_lora_rank, self.num_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(self.num_heads * self.v_dim, H, bias=bias)
        self.q_lora_scale = (H / self.q_lora_rank) ** 0.5
        self.kv_lora_scale = (H / self.kv_lora_rank) ** 0.5
        self.scale = self.qk_dim**-0.5 * _yarn_softmax_mscale(hf)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        T = x.shape[0]
        nh, nope, pad = self.num_heads, self.nope, self.cache_dim - self.qk_dim
        q_lat, kv_lat, k_rope = self.qkv_a_proj(x).split([self.q_lora_rank, self.kv_lora_rank, self.rope], dim=-1)
        q = self.q_b_proj(self.q_a_layernorm(q_lat)).view(T, nh, self.qk_dim)  # [T, Hq, Dqk]
        q = q * self.q_lora_scale
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_lat) * self.kv_lora_scale).view(T, nh, nope + self.v_dim)
        k_nope, v = kv.split([nope, self.v_dim], dim=-1)  # [T, Hq, Dn], [T, Hq, Dv]
        q_rope = apply_rope(q[..., nope:], cos, sin)  # [T, Hq, Dr]
        k_rope = apply_rope(k_rope.reshape(T, 1, self.rope), cos, sin).expand(T, nh, self.rope)  # [T, Hq, Dr]
        q = F.pad(torch.cat([q[..., :nope], q_rope], dim=-1), (0, pad))  # [T, Hq, Dc]
        k = F.pad(torch.cat([k_nope, k_rope], dim=-1), (0, pad))  # [T, Hq, Dc]
        v = F.pad(v, (0, self.cache_dim - self.v_dim))  # [T, Hq, Dc]
        if self.backend == "triton":  # the Triton kernels take dense inputs
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        dynserve_kernels.write_kv(k, v, kv_cache, batch.slot_mapping, self.backend)
        o = dynserve_kernels.paged_attention(q, kv_cache, batch, self.scale, self.backend)  # [T, Hq, Dc]
        return self.o_proj(o[..., : self.v_dim].reshape(T, nh * self.v_dim))  # [T, H]

    def load_hf(self, ws: WeightSource, prefix: str, device: torch.device | str) -> None:
        # the rotary rows are de-interleaved (see `_deinterleave`): kv_a's last `rope` rows and the last
        # `rope` rows of every head of q_b; new tensors, so the caller's weights are left untouched
        perm = _deinterleave(self.rope)
        kv_rows = torch.cat([torch.arange(self.kv_lora_rank), self.kv_lora_rank + perm])  # [Rkv + Dr]
        head_rows = torch.cat([torch.arange(self.nope), self.nope + perm])  # [Dqk]
        qa, kva = f"{prefix}.q_a_proj", f"{prefix}.kv_a_proj_with_mqa"
        w = torch.cat([ws.get(f"{qa}.weight"), ws.get(f"{kva}.weight")[kv_rows]])  # [Rq + Rkv + Dr, H]
        assign_param(self.qkv_a_proj, "weight", w, device, f"{qa}.weight + {kva}.weight")
        if self.qkv_a_proj.bias is not None:
            bias = torch.cat([ws.get(f"{qa}.bias"), ws.get(f"{kva}.bias")[kv_rows]])
            assign_param(self.qkv_a_proj, "bias", bias, device, f"{qa}.bias + {kva}.bias")
        name = f"{prefix}.q_b_proj.weight"
        qb = ws.get(name)
        if qb.shape[0] == self.num_heads * self.qk_dim:
            qb = qb.view(self.num_heads, self.qk_dim, -1)[:, head_rows].reshape(qb.shape)  # [Hq Dqk, Rq]
        assign_param(self.q_b_proj, "weight", qb, device, name)
        load_linear(self.kv_b_proj, ws, [f"{prefix}.kv_b_proj"], device)
        load_linear(self.o_proj, ws, [f"{prefix}.o_proj"], device)
        self.q_a_layernorm.load_hf(ws, f"{prefix}.q_a_layernorm.weight", device)
        self.kv_a_layernorm.load_hf(ws, f"{prefix}.kv_a_layernorm.weight", device)


def _yarn_softmax_mscale(hf: Mapping[str, Any]) -> float:
    """transformers' extra softmax scale for YaRN with `mscale_all_dim`: mscale(factor, mscale_all_dim)^2."""
    p = rope_parameters(dict(hf))
    all_dim = p.get("mscale_all_dim") or 0
    if p["rope_type"] == "default" or not all_dim:
        return 1.0
    factor = float(p["factor"])
    m = 1.0 if factor <= 1 else 0.1 * all_dim * math.log(factor) + 1.0
    return m * m


class ZeroExpertMoE(MoEBlock):
    """LongCat-Flash's MoE: N FFN experts + Z identity (zero-computation) experts behind one float32
    softmax router (`gate` [N+Z, H], float32 whatever the model dtype) with a selection-only
    `e_score_correction_bias` [N+Z]. Only FFN picks reach `fused_moe`; identity picks add w * x."""

    def __init__(
        self,
        hidden: int,
        moe_inter: int,
        num_experts: int,
        num_zero_experts: int,
        top_k: int,
        routed_scaling_factor: float,
    ) -> None:
        super().__init__(hidden, moe_inter, CheckpointRule(num_experts=num_experts, top_k=top_k))
        self.num_zero_experts = num_zero_experts
        self.top_k = top_k
        self.routed_scaling_factor = routed_scaling_factor
        total = num_experts + num_zero_experts
        self.gate = nn.Linear(hidden, total, bias=False, dtype=torch.float32)  # router classifier
        self.e_score_correction_bias = nn.Parameter(torch.zeros(total, dtype=torch.float32), requires_grad=False)

    def assign(self, x: torch.Tensor, batch: ForwardBatch) -> Assignment:
        logits = F.linear(x.float(), self.gate.weight)  # [T, N+Z] float32
        return route_with_zero_experts(
            logits,
            self.num_experts,
            "identity",
            self.top_k,
            scoring="softmax",
            selection_bias=self.e_score_correction_bias,
            renormalize=False,
            scaling_factor=self.routed_scaling_factor,
        )

    def load_hf(
        self,
        ws: WeightSource,
        prefix: str,
        device: torch.device | str,
        names: ExpertNames = QWEN_EXPERT_NAMES,
    ) -> None:
        """Router `<prefix>.router.classifier.weight` and `.e_score_correction_bias`; experts fused
        (`<prefix>.experts.gate_up_proj` [N(+Z), 2I, H] — transformers allocates rows for the zero
        experts too, which are never used — and `.down_proj` [N, H, I]) or per expert
        (`<prefix>.experts.{e}.<names.gate|up|down>.weight`)."""
        r = f"{prefix}.router"
        assign_param(self.gate, "weight", _fp32(ws, f"{r}.classifier.weight"), device, f"{r}.classifier.weight")
        name = f"{r}.e_score_correction_bias"
        assign_param(self, "e_score_correction_bias", _fp32(ws, name), device, name)
        N = self.num_experts
        ex = f"{prefix}.experts"
        if ws.has(f"{ex}.gate_up_proj"):
            w13 = ws.get(f"{ex}.gate_up_proj")[:N]
            w2 = ws.get(f"{ex}.down_proj")[:N]
            w13 = _maybe_transposed(w13, tuple(self.w13.shape))
            w2 = _maybe_transposed(w2, tuple(self.w2.shape))
        else:
            gate_up = [
                [ws.get(f"{ex}.{e}.{names.gate}.weight"), ws.get(f"{ex}.{e}.{names.up}.weight")] for e in range(N)
            ]
            w13 = torch.stack([torch.cat(gu) for gu in gate_up])  # [N, 2I, H]
            w2 = torch.stack([ws.get(f"{ex}.{e}.{names.down}.weight") for e in range(N)])  # [N, H, I]
        assign_param(self, "w13", w13, device, f"{ex} (gate/up)")
        assign_param(self, "w2", w2, device, f"{ex} (down)")


class LongcatFlashDecoderLayer(nn.Module):
    """One LongCat-Flash layer: two (norm, attention, norm, dense MLP) sublayers and a shortcut MoE fed
    by the first sublayer's post-attention norm and added after the second sublayer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hf = cfg.hf
        H, eps = cfg.hidden_size, float(hf.get("rms_norm_eps", 1e-5))
        ffn = int(hf.get("ffn_hidden_size") or hf["intermediate_size"])
        self.self_attn = nn.ModuleList([LatentAttention(cfg) for _ in range(2)])
        self.mlps = nn.ModuleList([GatedMLP(H, ffn) for _ in range(2)])
        self.input_layernorm = nn.ModuleList([RMSNorm(H, eps) for _ in range(2)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(H, eps) for _ in range(2)])
        self.mlp = ZeroExpertMoE(
            H,
            int(hf.get("expert_ffn_hidden_size") or hf["moe_intermediate_size"]),
            cfg.num_experts,
            int(hf.get("zero_expert_num", 256) or 0),  # defaults: transformers' LongcatFlashConfig
            cfg.top_k,
            float(hf.get("routed_scaling_factor", 6.0)),
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_caches: list[torch.Tensor],
        batch: ForwardBatch,
    ) -> torch.Tensor:
        h = x + self.self_attn[0](self.input_layernorm[0](x), cos, sin, kv_caches[0], batch)  # [T, H]
        y = self.post_attention_layernorm[0](h)  # [T, H]
        shortcut = self.mlp(y, batch)  # [T, H]
        h = h + self.mlps[0](y)
        h = h + self.self_attn[1](self.input_layernorm[1](h), cos, sin, kv_caches[1], batch)
        return h + self.mlps[1](self.post_attention_layernorm[1](h)) + shortcut  # [T, H]


class LongcatFlashForCausalLM(CausalLM):
    """LongCat-Flash: embedding -> L x LongcatFlashDecoderLayer -> RMSNorm -> lm_head. Owns 2L attention
    sublayers (KV cache list index 2i + j for sublayer j of layer i) and L zero-expert MoE blocks.
    Multi-token-prediction weights (`model.mtp.*`) are not used."""

    def __init__(self, config: ModelConfig, *, device: torch.device | str = "cpu") -> None:
        super().__init__()
        hf = config.hf
        check_silu(hf)
        heads, kv_heads = config.num_heads, hf.get("num_key_value_heads") or config.num_heads
        if kv_heads != heads:
            raise ValueError(
                f"LongCat-Flash MLA needs num_key_value_heads == num_attention_heads ({kv_heads} != {heads})"
            )
        rope_dim = int(hf["qk_rope_head_dim"])
        if (hf.get("head_dim") or rope_dim) != rope_dim:
            raise ValueError(
                f"head_dim ({hf['head_dim']}) must equal qk_rope_head_dim ({rope_dim}): "
                "transformers' rotary embedding uses head_dim"
            )
        self.config = config
        self.dtype = torch_dtype(config.dtype)
        self.device = torch.device(device)
        H = config.hidden_size
        self.num_decoder_layers = _hf_num_layers(hf)
        self.embed_tokens = nn.Embedding(config.vocab_size, H)
        self.layers = nn.ModuleList([LongcatFlashDecoderLayer(config) for _ in range(self.num_decoder_layers)])
        self.norm = RMSNorm(H, float(hf.get("rms_norm_eps", 1e-5)))
        self.lm_head = Linear(H, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(hf, rope_dim)
        self.tie_word_embeddings = bool(hf.get("tie_word_embeddings", False))
        self.num_moe_layers = self.num_decoder_layers
        self.requires_grad_(False)

    @classmethod
    def kv_cache_layout(cls, model_config: ModelConfig) -> tuple[int, int, int]:
        """(2 x num_layers attention sublayers, num_attention_heads, max(qk_head_dim, v_head_dim))."""
        hf = model_config.hf
        return 2 * _hf_num_layers(hf), model_config.num_heads, max(_qk_head_dim(hf), int(hf["v_head_dim"]))

    @property
    def num_attention_layers(self) -> int:
        return 2 * len(self.layers)

    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        if len(kv_caches) != self.num_attention_layers:
            raise ValueError(f"expected {self.num_attention_layers} KV caches, got {len(kv_caches)}")
        x = F.embedding(batch.input_ids, self.embed_tokens.weight)  # [T, H]
        cos, sin = self.rotary(batch.positions, x.dtype)  # [T, Dr] each
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_caches[2 * i : 2 * i + 2], batch)
        return self.norm(x)  # [T, H]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [S, V]

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        ws = WeightSource(weights, self.dtype)
        dev = self.device
        name = "model.embed_tokens.weight"
        assign_param(self.embed_tokens, "weight", ws.get(name), dev, name)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}"
            for j in range(2):
                layer.input_layernorm[j].load_hf(ws, f"{p}.input_layernorm.{j}.weight", dev)
                layer.post_attention_layernorm[j].load_hf(ws, f"{p}.post_attention_layernorm.{j}.weight", dev)
                layer.self_attn[j].load_hf(ws, f"{p}.self_attn.{j}", dev)
                layer.mlps[j].load_hf(ws, f"{p}.mlps.{j}", dev)
            layer.mlp.load_hf(ws, f"{p}.mlp", dev)
        self.norm.load_hf(ws, "model.norm.weight", dev)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            assign_param(self.lm_head, "weight", ws.get("lm_head.weight"), dev, "lm_head.weight")
        left = [n for n, prm in self.named_parameters() if prm.is_meta]
        if left:
            raise ValueError(f"parameters not loaded from the checkpoint: {left}")
