"""Qwen MoE decoders: Qwen2-MoE (q/k/v bias, shared expert with sigmoid gate) and Qwen3-MoE
(per-head q/k RMSNorm, no shared expert). Both place MoE layers by `decoder_sparse_step` and
`mlp_only_layers`; the other layers use a dense MLP of `intermediate_size`."""

from __future__ import annotations

from dynserve.config import ModelConfig
from dynserve.model.decoder import DecoderForCausalLM, DecoderSpec, moe_layer_indices
from dynserve.model.layers import check_silu
from dynserve.model.moe import QWEN_EXPERT_NAMES
from dynserve.routing import CheckpointRule


def _rule(config: ModelConfig) -> CheckpointRule:
    # transformers' Qwen2MoeTopKRouter / Qwen3MoeTopKRouter: softmax, top-k, renormalise iff norm_topk_prob
    return CheckpointRule(
        num_experts=config.num_experts,
        top_k=config.top_k,
        renormalize=bool(config.hf.get("norm_topk_prob", False)),
    )


class Qwen2MoeForCausalLM(DecoderForCausalLM):
    """Qwen2-MoE / Qwen1.5-MoE: q/k/v biases (`qkv_bias`, default true), no o bias; MoE output plus
    sigmoid(shared_expert_gate(x)) * shared_expert(x)."""

    @classmethod
    def make_spec(cls, config: ModelConfig) -> DecoderSpec:
        hf = config.hf
        check_silu(hf)
        return DecoderSpec(
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            intermediate_size=hf["intermediate_size"],
            qkv_bias=bool(hf.get("qkv_bias", True)),
            moe_layers=moe_layer_indices(hf, config.num_layers, config.num_experts),
            moe_intermediate_size=hf["moe_intermediate_size"],
            shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
            expert_names=QWEN_EXPERT_NAMES,
            rule=_rule(config),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window") else None,
        )


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    """Qwen3-MoE: per-head q/k RMSNorm before rotary, `attention_bias` on q/k/v/o, no shared expert."""

    @classmethod
    def make_spec(cls, config: ModelConfig) -> DecoderSpec:
        hf = config.hf
        check_silu(hf)
        bias = bool(hf.get("attention_bias", False))
        return DecoderSpec(
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            intermediate_size=hf.get("intermediate_size") or hf["moe_intermediate_size"],
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="head",
            moe_layers=moe_layer_indices(hf, config.num_layers, config.num_experts),
            moe_intermediate_size=hf["moe_intermediate_size"],
            expert_names=QWEN_EXPERT_NAMES,
            rule=_rule(config),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window") else None,
        )
