"""Dense Llama-family decoders: LlamaForCausalLM (and Mistral / Qwen2, which differ only in
attention biases and the sliding-window setting)."""

from __future__ import annotations

from dynserve.config import ModelConfig
from dynserve.model.decoder import DecoderForCausalLM, DecoderSpec
from dynserve.model.layers import check_silu


class LlamaForCausalLM(DecoderForCausalLM):
    """Llama: RMSNorm pre-norm, rotary (default / linear / llama3 scaling), GQA, SwiGLU MLP;
    `attention_bias` on q/k/v/o and `mlp_bias` on the MLP."""

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
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama layers without biases; `sliding_window` (if set) is not applied."""

    @classmethod
    def make_spec(cls, config: ModelConfig) -> DecoderSpec:
        hf = config.hf
        check_silu(hf)
        return DecoderSpec(
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            intermediate_size=hf["intermediate_size"],
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=hf.get("sliding_window"),
        )


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: Llama layers with q/k/v biases (no o bias)."""

    @classmethod
    def make_spec(cls, config: ModelConfig) -> DecoderSpec:
        hf = config.hf
        check_silu(hf)
        return DecoderSpec(
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            intermediate_size=hf["intermediate_size"],
            qkv_bias=True,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window") else None,
        )
