"""The engine with the Triton kernels forced (CPU interpreter) generates what the torch path does."""

from __future__ import annotations

import json

import pytest
import torch

from dynserve import LLM, RoutingConfig, SamplingParams


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])  # gpt_oss: sinks + window
def test_triton_path_matches_torch_path(checkpoint_factory, arch):
    path = checkpoint_factory(arch)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, vocab, (n,), generator=g).tolist() for n in (5, 13, 9)]
    params = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        SamplingParams(
            temperature=0, max_tokens=6, ignore_eos=True, routing=RoutingConfig(policy="top_p", p=0.6, min_experts=0)
        ),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, routing=RoutingConfig(k=1)),
    ]
    # small chunks so the prefill kernel also runs over a cached prefix
    opts = dict(block_size=4, max_num_batched_tokens=8)
    ref = LLM(str(path), use_triton=False, **opts).generate(prompt_token_ids=prompts, sampling_params=params)
    tri = LLM(str(path), use_triton=True, **opts).generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.outputs[0].token_ids for o in tri] == [o.outputs[0].token_ids for o in ref]
    assert [o.expert_usage.per_layer for o in tri] == [o.expert_usage.per_layer for o in ref]
