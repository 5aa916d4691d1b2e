"""Tiny random-weight Hugging Face checkpoints built offline with save_pretrained (and their byte-level
BPE tokenizer). Plain module (no pytest), so scripts such as dynserve/bench/gpu_check.py can build them too."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = [
    "def hello(name):\n    return 'hello ' + name\n",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "import os, sys\nfor i in range(10):\n    print(i * i)\n",
    "class Foo(object):\n    pass\n",
    "# comment with unicode: caf\u00e9 \u00fc\u00f1\u00ee\u00e7\u00f8d\u00e9 \u65e5\u672c\u8a9e \U0001f600\n",
]


def save_tokenizer(path: Path, vocab_size: int = 384) -> int:
    """A byte-level BPE tokenizer (trained in-process on a few strings) with special tokens and a
    chat template; returns the vocab size actually produced."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|bos|>",
                "eos_token": "<|eos|>",
                "pad_token": "<|pad|>",
                "add_bos_token": False,
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": 4096,
            }
        )
    )
    return tok.get_vocab_size()


ARCH_CONFIGS = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=40,
            shared_expert_intermediate_size=56,
            intermediate_size=56,
            decoder_sparse_step=1,
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=40,
            intermediate_size=56,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            head_dim=16,
        ),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, intermediate_size=48)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=96)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(intermediate_size=96, head_dim=16)),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            num_hidden_layers=3,
            first_k_dense_replace=1,
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            partial_rotary_factor=0.5,
            attention_bias=True,
            head_dim=16,
        ),
    ),
}

# DeepSeek: multi-head latent attention (every query head its own K/V: num_key_value_heads = heads),
# qk head 8 + 8, v head 12 (K and V widths differ), dense first layer, 4 groups of 4 experts
_MLA = dict(
    num_key_value_heads=4,
    kv_lora_rank=24,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=12,
    head_dim=8,  # transformers' rotary reads head_dim (= qk_rope_head_dim)
    num_hidden_layers=3,
    first_k_dense_replace=1,
    intermediate_size=96,
    moe_intermediate_size=32,
    n_routed_experts=16,
    n_group=4,
    topk_group=2,
)
ARCH_CONFIGS.update(
    {
        "deepseek_v3": (
            "DeepseekV3Config",
            "DeepseekV3ForCausalLM",
            dict(
                _MLA,
                q_lora_rank=32,
                num_experts_per_tok=4,
                n_shared_experts=1,
                norm_topk_prob=True,
                routed_scaling_factor=2.5,
                attention_bias=True,
            ),
        ),
        # no q LoRA (q_proj), YaRN with mscale != mscale_all_dim (cos/sin and softmax both scaled),
        # two shared experts, two dense layers, weights not renormalised
        "deepseek_v3_nolora": (
            "DeepseekV3Config",
            "DeepseekV3ForCausalLM",
            dict(
                _MLA,
                num_hidden_layers=4,
                first_k_dense_replace=2,
                q_lora_rank=None,
                num_experts_per_tok=3,
                n_shared_experts=2,
                norm_topk_prob=False,
                routed_scaling_factor=1.5,
                attention_bias=True,
                rope_parameters={
                    "rope_type": "yarn",
                    "rope_theta": 10000.0,
                    "factor": 8.0,
                    "original_max_position_embeddings": 64,
                    "mscale": 0.707,
                    "mscale_all_dim": 1.0,
                },
            ),
        ),
        # DeepSeek-V2-Lite's shape: no q LoRA, softmax router, group-limited greedy, routed scaling
        "deepseek_v2": (
            "DeepseekV2Config",
            "DeepseekV2ForCausalLM",
            dict(
                _MLA,
                q_lora_rank=None,
                num_experts_per_tok=3,
                n_shared_experts=2,
                topk_method="group_limited_greedy",
                routed_scaling_factor=2.0,
            ),
        ),
    }
)

# gpt-oss: 4 layers, sliding (window 6, shorter than the test prompts) and full alternating but not
# in the default order; 8 experts, k = 2; intermediate = hidden, so the [E, I, H] down_proj layout
# is ambiguous by shape (it must be read as gpt-oss stores it); YaRN rotary (the config's default)
ARCH_CONFIGS["gpt_oss"] = (
    "GptOssConfig",
    "GptOssForCausalLM",
    dict(
        num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention", "full_attention", "sliding_attention"],
        sliding_window=6,
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=64,
        head_dim=16,
        swiglu_limit=1.5,  # low enough that the clamps bite on random weights
        rope_parameters=dict(
            rope_type="yarn", factor=8.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
            original_max_position_embeddings=64, rope_theta=10000.0,
        ),
    ),
)  # fmt: skip

# families whose tiny checkpoints get non-zero linear biases (the others keep transformers' zero init)
RANDOM_BIAS_ARCHS = {"glm4_moe", "deepseek_v3", "deepseek_v3_nolora", "gpt_oss"}


def make_checkpoint(path: Path, arch: str = "mixtral", seed: int = 0, num_shards: int = 1, **overrides: object) -> Path:
    """Save a tiny random-weight `arch` checkpoint (config.json, safetensors, tokenizer) to path."""
    import torch
    import transformers

    cfg_name, model_name, extra = ARCH_CONFIGS[arch]
    vocab = save_tokenizer(path)
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    # random init of a tiny model gives near-uniform logits; widen them so greedy is decisive
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 1.0)
            elif arch in RANDOM_BIAS_ARCHS and (name.endswith(".bias") or name.endswith("_proj_bias")):
                p.normal_(0.0, 0.05)  # attention (and gpt-oss expert) biases: non-zero, so a dropped bias shows
            elif name.endswith(".sinks"):
                p.normal_(0.0, 1.0)  # gpt-oss attention sinks: large enough to matter
        # sigmoid routers (DeepSeek-V3 / GLM-4.5): a non-zero selection bias, so ignoring it changes picks
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.2)
    size = None
    if num_shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        size = max(1, total // num_shards + 1)
    model.save_pretrained(path, safe_serialization=True, max_shard_size=size if size else "10GB")
    return path
