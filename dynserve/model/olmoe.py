"""OLMoE: every layer is MoE; q/k RMSNorm over the whole projected vectors before rotary."""

from __future__ import annotations

from dynserve.config import ModelConfig
from dynserve.model.decoder import DecoderForCausalLM, DecoderSpec
from dynserve.model.layers import check_silu
from dynserve.model.moe import QWEN_EXPERT_NAMES
from dynserve.routing import CheckpointRule


class OlmoeForCausalLM(DecoderForCausalLM):
    """OLMoE: q_norm over Hq*D and k_norm over Hkv*D (before the head reshape), optional `clip_qkv`
    clamp of q/k/v, `attention_bias` on q/k/v/o; router softmax -> top-k, renormalised iff
    `norm_topk_prob` (default false)."""

    @classmethod
    def make_spec(cls, config: ModelConfig) -> DecoderSpec:
        hf = config.hf
        check_silu(hf)
        if config.head_dim * config.num_heads != config.hidden_size:
            raise ValueError("OLMoE q/k norms assume head_dim * num_attention_heads == hidden_size")
        bias = bool(hf.get("attention_bias", False))
        return DecoderSpec(
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            intermediate_size=hf["intermediate_size"],
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="full",
            clip_qkv=hf.get("clip_qkv"),
            moe_layers=tuple(range(config.num_layers)),
            moe_intermediate_size=hf["intermediate_size"],
            expert_names=QWEN_EXPERT_NAMES,
            rule=CheckpointRule(
                num_experts=config.num_experts,
                top_k=config.top_k,
                renormalize=bool(hf.get("norm_topk_prob", False)),
            ),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
