"""DeepSeek-V2 and DeepSeek-V3 (transformers `deepseek_v2` / `deepseek_v3`): multi-head latent
attention (`mla.MLA`: q LoRA or a plain q projection with `q_lora_rank: null`, interleaved rotary,
YaRN with the mscale on the softmax scale), dense MLPs in the first `first_k_dense_replace` layers,
then MoE layers with `n_shared_experts` ungated shared experts (`mlp.shared_experts`).

Routers: DeepSeek-V3 scores with a sigmoid and selects on score + `e_score_correction_bias`
within the best `topk_group` of `n_group` groups (`glm4_moe.sigmoid_group_rule`, the rule GLM-4.5
shares); DeepSeek-V2 scores with a float32 softmax and selects by `topk_method`: "greedy" (plain
top-k) or "group_limited_greedy" (top-k within the best `topk_group` groups, a group ranked by its
best probability); weights are the probabilities times `routed_scaling_factor`, never renormalised
(transformers' `DeepseekV2TopkRouter` does not read `norm_topk_prob`).
"""

from __future__ import annotations

import logging

from dynserve.config import ModelConfig
from dynserve.model.decoder import DecoderForCausalLM, DecoderSpec
from dynserve.model.glm4_moe import sigmoid_group_rule
from dynserve.model.layers import check_silu
from dynserve.model.mla import MLA
from dynserve.model.moe import QWEN_EXPERT_NAMES
from dynserve.routing import CheckpointRule

logger = logging.getLogger(__name__)

V2_TOPK_METHODS = ("greedy", "group_limited_greedy")


def softmax_group_rule(config: ModelConfig) -> CheckpointRule:
    """The DeepSeek-V2 router of a config.json (`topk_method`, `n_group`, `topk_group`,
    `routed_scaling_factor`)."""
    hf = config.hf
    method = hf.get("topk_method") or "greedy"
    if method not in V2_TOPK_METHODS:
        supported = ", ".join(V2_TOPK_METHODS)
        raise ValueError(f"DeepSeek-V2 topk_method {method!r} is not supported (supported: {supported})")
    grouped = method == "group_limited_greedy"
    if hf.get("norm_topk_prob"):
        logger.warning("DeepSeek-V2: norm_topk_prob is ignored, as transformers' DeepseekV2TopkRouter ignores it")
    return CheckpointRule(
        num_experts=config.num_experts,
        top_k=config.top_k,
        renormalize=False,
        scoring="softmax",
        n_group=int(hf.get("n_group") or 1) if grouped else 1,
        topk_group=int(hf.get("topk_group") or 1) if grouped else 1,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
    )


def _deepseek_spec(
    config: ModelConfig, rule: CheckpointRule, *, interleaved_rope: bool, router_fp32: bool | None = None
) -> DecoderSpec:
    """What DeepSeek-V2 and V3 share: MLA, dense-first layers, ungated shared experts."""
    hf = config.hf
    check_silu(hf)
    quant = hf.get("quantization_config")
    if quant:
        # the published DeepSeek-V3 / R1 weights are block-wise FP8 with `weight_scale_inv` tensors:
        # casting them without the scales would load garbage
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise ValueError(
            f"{config.architecture}: quantized checkpoints ({method!r}) are not supported; "
            "convert the weights to bfloat16 first (DeepSeek's fp8_cast_bf16.py)"
        )
    dense = int(hf.get("first_k_dense_replace") or 0)
    moe_inter = int(hf["moe_intermediate_size"])
    return DecoderSpec(
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        intermediate_size=int(hf["intermediate_size"]),
        attention=MLA(interleaved_rope=interleaved_rope),
        moe_layers=tuple(range(dense, config.num_layers)) if config.num_experts else (),
        moe_intermediate_size=moe_inter,
        shared_expert_intermediate_size=moe_inter * int(hf.get("n_shared_experts") or 0),
        shared_expert_gate=False,
        shared_expert_prefix="shared_experts",
        expert_names=QWEN_EXPERT_NAMES,
        rule=rule,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        router_fp32=router_fp32,
    )


class DeepseekV3ForCausalLM(DecoderForCausalLM):
    """DeepSeek-V3 / R1 (and checkpoints of the same shape, e.g. Kimi-K2): MLA + sigmoid
    group-limited router with a selection bias."""

    @classmethod
    def make_spec(cls, config: ModelConfig) -> DecoderSpec:
        interleaved = bool(config.hf.get("rope_interleave", True))
        return _deepseek_spec(config, sigmoid_group_rule(config), interleaved_rope=interleaved)


class DeepseekV2ForCausalLM(DecoderForCausalLM):
    """DeepSeek-V2 / V2-Lite: MLA (always interleaved rotary) + softmax router, greedy or
    group-limited greedy, router in float32."""

    @classmethod
    def make_spec(cls, config: ModelConfig) -> DecoderSpec:
        if config.hf.get("mlp_bias"):
            raise ValueError("DeepSeek-V2 with mlp_bias=true is not supported (shared experts carry no bias here)")
        # transformers' DeepSeek-V2 rotary is always on interleaved pairs (complex multiplication)
        return _deepseek_spec(config, softmax_group_rule(config), interleaved_rope=True, router_fp32=True)
