"""End-to-end: dynserve's engine generates exactly what transformers generates (greedy), through
the continuous-batching scheduler, with chunked prefill, prefix caching and preemption."""

from __future__ import annotations

import pytest
import torch

from dynserve import LLM, SamplingParams

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama", "qwen3", "deepseek_v3"]
NEW_TOKENS = 32


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = [3, 11, 20, 37, 50]
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(path, prompts: list[list[int]]) -> list[list[int]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
            outs.append(out[0, len(p) :].tolist())
    return outs


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request, checkpoint_factory):
    path = checkpoint_factory(request.param)
    import json

    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    prompts = _prompts(vocab)
    return request.param, path, prompts, _hf_greedy(path, prompts)


def _gen(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)]


def test_greedy_matches_transformers_batched(arch_case):
    _, path, prompts, expected = arch_case
    llm = LLM(str(path))
    assert _gen(llm, prompts) == expected


def test_greedy_matches_with_small_chunked_prefill(arch_case):
    _, path, prompts, expected = arch_case
    llm = LLM(str(path), max_num_batched_tokens=8, block_size=4)
    assert _gen(llm, prompts) == expected


def test_greedy_matches_with_prefix_cache_hits(arch_case):
    _, path, prompts, expected = arch_case
    llm = LLM(str(path), block_size=4)
    assert _gen(llm, prompts) == expected
    # the same prompts again: full blocks of every prompt come from the prefix cache
    assert _gen(llm, prompts) == expected
    stats = llm.get_stats()
    assert stats.prefix_cache_hits > 0


def test_greedy_matches_under_preemption(arch_case):
    _, path, prompts, expected = arch_case
    # 5 sequences need up to (50+32)/4 ~ 21 blocks each; 24 blocks force preemption by recompute
    llm = LLM(str(path), block_size=4, num_kv_blocks=24, enable_prefix_caching=False)
    assert _gen(llm, prompts) == expected
    stats = llm.get_stats()
    assert stats.num_preemptions > 0
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total


def test_alone_equals_in_batch_of_32(mixtral_dir):
    import json

    vocab = json.loads((mixtral_dir / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(7)
    prompts = [
        torch.randint(10, vocab, (int(n),), generator=g).tolist() for n in torch.randint(2, 40, (32,), generator=g)
    ]
    llm = LLM(str(mixtral_dir), max_num_batched_tokens=64)
    batched = _gen(llm, prompts)
    alone = [_gen(llm, [p])[0] for p in prompts[:6]]
    assert batched[:6] == alone
