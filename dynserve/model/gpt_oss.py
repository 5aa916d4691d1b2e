"""gpt-oss (transformers `gpt_oss`): GQA attention with q/k/v/o biases, a learned sink logit per head
(`self_attn.sinks`: an extra term in the softmax denominator that carries no value) and, per layer,
a sliding window (`layer_types[i] == "sliding_attention"`: the last `sliding_window` positions) or
full causal attention; YaRN rotary (`rope_parameters`); every layer MoE.

MoE: the router (`mlp.router`) is a linear with bias; the checkpoint takes the top-k logits and
softmaxes over those k (`rule`: softmax over all E with renormalisation over the kept experts, the
same weights). Experts (`mlp.experts`, fused, [E, in, out], gate/up interleaved) carry biases and
apply the clamped SwiGLU `moe_ref.ClampedSwiGLU(swiglu_alpha, swiglu_limit)`. Published checkpoints
store the experts in MXFP4 (`*_blocks` / `*_scales`), dequantised at load (`layers.WeightSource`).
"""

from __future__ import annotations

from dynserve_kernels.moe_ref import ClampedSwiGLU

from dynserve.config import ModelConfig
from dynserve.model.decoder import GQA, DecoderForCausalLM, DecoderSpec
from dynserve.model.moe import GPT_OSS_EXPERT_NAMES
from dynserve.routing import CheckpointRule

LAYER_TYPES = ("sliding_attention", "full_attention")


def gpt_oss_rule(config: ModelConfig) -> CheckpointRule:
    """transformers' `GptOssTopKRouter`: top-k of the (biased) router logits, softmax over those k.
    As a softmax rule with renormalisation: the top-k probabilities are the top-k logits, and
    p_i / sum of the kept p = softmax over the kept logits. Adaptive policies rank and sum the
    softmax over all E experts and weight by the softmax over the experts they keep (README)."""
    return CheckpointRule(num_experts=config.num_experts, top_k=config.top_k, renormalize=True)


def sliding_windows(hf: dict, num_layers: int) -> tuple[int, ...]:
    """Per layer: `sliding_window` for "sliding_attention" layers, 0 (full) for "full_attention";
    without `layer_types`, GptOssConfig's default (even layers sliding, odd layers full)."""
    types = hf.get("layer_types") or [LAYER_TYPES[i % 2] for i in range(num_layers)]
    if len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise ValueError(f"gpt-oss layer_types must list {num_layers} of {LAYER_TYPES}, got {types}")
    window = int(hf.get("sliding_window") or 0)
    return tuple(window if t == "sliding_attention" else 0 for t in types)


class GptOssForCausalLM(DecoderForCausalLM):
    """gpt-oss-20b / gpt-oss-120b (bf16 or MXFP4 experts)."""

    @classmethod
    def make_spec(cls, config: ModelConfig) -> DecoderSpec:
        hf = config.hf
        quant = hf.get("quantization_config")
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        if quant and method != "mxfp4":
            raise ValueError(f"gpt-oss: quantization {method!r} is not supported (only MXFP4 experts, dequantised)")
        bias = bool(hf.get("attention_bias", True))
        return DecoderSpec(
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            intermediate_size=int(hf["intermediate_size"]),
            attention=GQA(sinks=True, windows=sliding_windows(hf, config.num_layers)),
            qkv_bias=bias,
            o_bias=bias,
            moe_layers=tuple(range(config.num_layers)),
            moe_intermediate_size=int(hf["intermediate_size"]),
            expert_names=GPT_OSS_EXPERT_NAMES,
            rule=gpt_oss_rule(config),
            router_bias=True,
            expert_bias=True,
            expert_activation=ClampedSwiGLU(float(hf.get("swiglu_alpha", 1.702)), float(hf.get("swiglu_limit", 7.0))),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
