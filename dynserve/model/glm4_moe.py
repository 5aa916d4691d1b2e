"""GLM-4.5 MoE (transformers `glm4_moe`): GQA attention with q/k/v biases (`attention_bias`), partial
rotary on the first `partial_rotary_factor` of each head (halves split, not interleaved), optional
per-head q/k RMSNorm (`use_qk_norm`), dense MLPs in the first `first_k_dense_replace` layers, then
MoE layers routed by DeepSeek-V3's sigmoid rule (group-limited top-k on score +
`e_score_correction_bias`, unbiased weights renormalised if `norm_topk_prob`, times
`routed_scaling_factor`) plus `n_shared_experts` ungated shared experts (`mlp.shared_experts`)."""

from __future__ import annotations

from dynserve.config import ModelConfig
from dynserve.model.decoder import DecoderForCausalLM, DecoderSpec
from dynserve.model.layers import check_silu, rope_parameters
from dynserve.model.moe import QWEN_EXPERT_NAMES
from dynserve.routing import CheckpointRule


def sigmoid_group_rule(config: ModelConfig) -> CheckpointRule:
    """The DeepSeek-V3 / GLM-4.5 router of a config.json (`n_group`, `topk_group`, `norm_topk_prob`,
    `routed_scaling_factor`; the per-layer `e_score_correction_bias` is a parameter of the MoE layer)."""
    hf = config.hf
    return CheckpointRule(
        num_experts=config.num_experts,
        top_k=config.top_k,
        renormalize=bool(hf.get("norm_topk_prob", True)),
        scoring="sigmoid",
        n_group=int(hf.get("n_group") or 1),
        topk_group=int(hf.get("topk_group") or 1),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        selection_bias=True,
    )


class Glm4MoeForCausalLM(DecoderForCausalLM):
    """GLM-4.5 / GLM-4.5-Air / GLM-4.6 MoE decoder (no o_proj bias; experts gate/up/down_proj)."""

    @classmethod
    def make_spec(cls, config: ModelConfig) -> DecoderSpec:
        hf = config.hf
        check_silu(hf)
        # transformers' Glm4MoeConfig defaults partial_rotary_factor to 0.5 when the config omits it
        factor = rope_parameters(hf).get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
        dense = int(hf.get("first_k_dense_replace", 1))
        moe_inter = hf["moe_intermediate_size"]
        return DecoderSpec(
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            intermediate_size=hf["intermediate_size"],
            qkv_bias=bool(hf.get("attention_bias", False)),
            qk_norm="head" if hf.get("use_qk_norm") else None,
            moe_layers=tuple(range(dense, config.num_layers)) if config.num_experts else (),
            moe_intermediate_size=moe_inter,
            shared_expert_intermediate_size=moe_inter * int(hf.get("n_shared_experts") or 0),
            shared_expert_gate=False,
            shared_expert_prefix="shared_experts",
            expert_names=QWEN_EXPERT_NAMES,
            rule=sigmoid_group_rule(config),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rotary_dim=int(config.head_dim * factor),
        )
