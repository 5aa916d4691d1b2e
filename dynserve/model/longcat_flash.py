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

Attention is multi-head latent attention (`mla.LatentAttention`, the module DeepSeek uses, with
LongCat's LoRA scales); see mla.py for the paged-cache layout and the rotary layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
    assign_param,
    check_silu,
)
from dynserve.model.mla import LatentAttention, mla_cache_head_dim
from dynserve.model.moe import QWEN_EXPERT_NAMES, ExpertNames, MoEBlock, _maybe_transposed
from dynserve.routing import Assignment, CheckpointRule, route_with_zero_experts


def _hf_num_layers(hf: Mapping[str, Any]) -> int:
    """Decoder layers (each with two attention sublayers): `num_layers`, else num_hidden_layers / 2."""
    if hf.get("num_layers") is not None:
        return int(hf["num_layers"])
    return int(hf["num_hidden_layers"]) // 2


def _fp32(ws: WeightSource, name: str) -> torch.Tensor:
    """A checkpoint tensor in float32 whatever the model dtype (router weights stay float32)."""
    if not ws.has(name):
        raise KeyError(f"checkpoint is missing tensor {name!r}")
    return ws.weights[name].float()


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
        self.self_attn = nn.ModuleList([LatentAttention(cfg, lora_scales=True) for _ in range(2)])
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
        return 2 * _hf_num_layers(hf), model_config.num_heads, mla_cache_head_dim(hf)

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
