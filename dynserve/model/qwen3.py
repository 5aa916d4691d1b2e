"""Qwen3 dense decoder: Llama layers with per-head q/k RMSNorm before rotary."""

from __future__ import annotations

from dynserve.config import ModelConfig
from dynserve.model.decoder import DecoderForCausalLM, DecoderSpec
from dynserve.model.layers import check_silu


class Qwen3ForCausalLM(DecoderForCausalLM):
    """Qwen3: q_norm / k_norm over head_dim on every head, applied before rotary;
    `attention_bias` on q/k/v/o."""

    @classmethod
    def make_spec(cls, config: ModelConfig) -> DecoderSpec:
        hf = config.hf
        check_silu(hf)
        bias = bool(hf.get("attention_bias", False))
        return DecoderSpec(
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            intermediate_size=hf["intermediate_size"],
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="head",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window") else None,
        )
