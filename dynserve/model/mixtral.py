"""Mixtral: Mistral attention with a sparse MoE block (`block_sparse_moe`) in every layer."""

from __future__ import annotations

from dynserve.config import ModelConfig
from dynserve.model.decoder import DecoderForCausalLM, DecoderSpec
from dynserve.model.layers import check_silu
from dynserve.model.moe import MIXTRAL_EXPERT_NAMES
from dynserve.routing import CheckpointRule


class MixtralForCausalLM(DecoderForCausalLM):
    """Mixtral: every layer is MoE; router softmax -> top-k -> weights renormalised over the k
    picked (always, as transformers' MixtralTopKRouter does). Experts w1 (gate), w3 (up), w2 (down)."""

    @classmethod
    def make_spec(cls, config: ModelConfig) -> DecoderSpec:
        hf = config.hf
        check_silu(hf)
        return DecoderSpec(
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            intermediate_size=hf["intermediate_size"],
            moe_layers=tuple(range(config.num_layers)),
            moe_prefix="block_sparse_moe",
            moe_intermediate_size=hf["intermediate_size"],
            expert_names=MIXTRAL_EXPERT_NAMES,
            rule=CheckpointRule(num_experts=config.num_experts, top_k=config.top_k, renormalize=True),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=hf.get("sliding_window"),
        )
