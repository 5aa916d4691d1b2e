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

Attention is multi-head latent attention (`mla.MLA`, the kind DeepSeek uses, with LongCat's LoRA
scales); see mla.py for the paged-cache layout and the rotary layout. The family is a
`DecoderSpec` whose `layer` is `LongcatFlashDecoderLayer` (two attention sublayers per layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynserve.config import ModelConfig
from dynserve.model.base import ForwardBatch
from dynserve.model.decoder import DecoderForCausalLM, DecoderSpec
from dynserve.model.layers import GatedMLP, RMSNorm, WeightSource, assign_param, check_silu
from dynserve.model.mla import MLA
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
        """The checkpoint's rule; a request's steering applies to the N FFN experts (bias added to their
        logits; excluded ones get -inf logits and -inf selection scores, so they are never picked while
        top_k experts, zero ones included, are left)."""
        logits = F.linear(x.float(), self.gate.weight)  # [T, N+Z] float32
        selection_bias = self.e_score_correction_bias  # [N+Z]
        steer = batch.routing.steering(batch.moe_layer_index, self.num_experts, logits.device)  # [T|1, N] or None
        if steer is not None:
            pad = steer.new_zeros(steer.shape[0], self.num_zero_experts)  # zero experts are not steered
            steer = torch.cat([steer, pad], dim=1)  # [T|1, N+Z]
            logits = logits + steer
            never = torch.zeros_like(steer).masked_fill(torch.isneginf(steer), float("-inf"))  # [T|1, N+Z]
            selection_bias = selection_bias + never
        return route_with_zero_experts(
            logits,
            self.num_experts,
            "identity",
            self.top_k,
            scoring="softmax",
            selection_bias=selection_bias,
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
    by the first sublayer's post-attention norm and added after the second sublayer. The spec's
    `layer` (two attention sublayers: KV cache list index 2i + j for sublayer j of layer i)."""

    is_moe = True

    def __init__(self, cfg: ModelConfig, spec: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        hf = cfg.hf
        H, eps = cfg.hidden_size, spec.rms_norm_eps
        self.self_attn = nn.ModuleList([spec.attention.build(cfg, spec) for _ in range(2)])
        self.mlps = nn.ModuleList([GatedMLP(H, spec.intermediate_size) for _ in range(2)])
        self.input_layernorm = nn.ModuleList([RMSNorm(H, eps) for _ in range(2)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(H, eps) for _ in range(2)])
        self.mlp = ZeroExpertMoE(
            H,
            spec.moe_intermediate_size,
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

    def load_hf(self, ws: WeightSource, prefix: str, device: torch.device | str, spec: DecoderSpec) -> None:
        for j in range(2):
            self.input_layernorm[j].load_hf(ws, f"{prefix}.input_layernorm.{j}.weight", device)
            self.post_attention_layernorm[j].load_hf(ws, f"{prefix}.post_attention_layernorm.{j}.weight", device)
            self.self_attn[j].load_hf(ws, f"{prefix}.self_attn.{j}", device)
            self.mlps[j].load_hf(ws, f"{prefix}.mlps.{j}", device)
        self.mlp.load_hf(ws, f"{prefix}.mlp", device)


class LongcatFlashForCausalLM(DecoderForCausalLM):
    """LongCat-Flash: embedding -> L x LongcatFlashDecoderLayer -> RMSNorm -> lm_head, as a spec: MLA
    with LoRA scales, two attention sublayers per layer, every layer's MoE a zero-expert MoE.
    Multi-token-prediction weights (`model.mtp.*`) are not used."""

    @classmethod
    def make_spec(cls, config: ModelConfig) -> DecoderSpec:
        hf = config.hf
        check_silu(hf)
        layers = _hf_num_layers(hf)
        return DecoderSpec(
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            intermediate_size=int(hf.get("ffn_hidden_size") or hf["intermediate_size"]),
            attention=MLA(lora_scales=True),
            moe_layers=tuple(range(layers)),
            moe_intermediate_size=int(hf.get("expert_ffn_hidden_size") or hf["moe_intermediate_size"]),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            layer=LongcatFlashDecoderLayer,
            num_layers=layers,
            attention_per_layer=2,
        )
