"""Engine behaviour a user sees: stopping, n samples, seeds, aborts, errors, expert usage."""

from __future__ import annotations

import pytest

from dynserve import LLM, RoutingConfig, SamplingParams
from dynserve.engine.llm_engine import ContextLengthError


@pytest.fixture(scope="module")
def llm(mixtral_dir):
    return LLM(str(mixtral_dir), block_size=4, max_model_len=128)


def test_text_prompt_and_max_tokens(llm):
    out = llm.generate("def hello(name):", SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 7
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)


def test_stop_token_id_and_stop_string(llm):
    base = llm.generate("import os", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    stop_tok = base.token_ids[5]
    cut = base.token_ids.index(stop_tok)
    out = llm.generate(
        "import os", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_tok])
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert out.token_ids == base.token_ids[: cut + 1]
    # a stop string taken from the middle of the greedy text ends the text right before it
    text = base.text
    start = next(i for i in range(len(text) // 2, len(text)) if not text[i].isspace())
    stop = text[start : start + 3]
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])
    out = llm.generate("import os", sp)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]


def test_n_samples_and_seed_reproducible(llm):
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=1234, ignore_eos=True)
    a = llm.generate("class Foo", sp)[0]
    b = llm.generate(["x = 1", "class Foo"], sp)[1]  # another batch composition
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1  # the n samples differ


def test_n_samples_compute_the_prompt_once(mixtral_dir):
    # the later samples wait one step for the first to compute the prompt, then read its full
    # blocks from the prefix cache: 3 samples of a 23-token prompt (block size 4) compute
    # 23 + 2 x 3 prompt tokens, not 3 x 23
    llm = LLM(str(mixtral_dir), block_size=4, max_model_len=128)
    prompt = list(range(10, 33))  # 23 tokens: 5 full blocks + 3 tokens
    sp = SamplingParams(n=3, temperature=0, max_tokens=6, ignore_eos=True)
    eng = llm.engine
    computed = 0
    real_execute = eng.runner.execute

    def counting_execute(scheduled):
        nonlocal computed
        computed += sum(n for seq, n in scheduled if seq.num_computed_tokens < seq.num_prompt_tokens)
        return real_execute(scheduled)

    eng.runner.execute = counting_execute
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=sp)[0]
    assert computed == 23 + 2 * 3
    alone = LLM(str(mixtral_dir), block_size=4, max_model_len=128, enable_prefix_caching=False)
    ref = alone.generate(
        prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    )
    assert [o.token_ids for o in out.outputs] == [ref[0].outputs[0].token_ids] * 3
    stats = llm.get_stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total


def test_n_samples_of_a_one_block_prompt_start_together(mixtral_dir):
    # a prompt of exactly one block leaves nothing to share (a prefix hit keeps >= 1 token to
    # compute), so the later samples do not wait a step for the first
    llm = LLM(str(mixtral_dir), block_size=4, max_model_len=128)
    out = llm.generate(prompt_token_ids=[[11, 12, 13, 14]], sampling_params=SamplingParams(n=3, max_tokens=1))[0]
    assert len(out.outputs) == 3 and llm.engine.num_steps == 1


def test_context_length_error_wording(llm):
    with pytest.raises(ContextLengthError, match="maximum context length is 128 tokens"):
        llm.generate(prompt_token_ids=[[5] * 120], sampling_params=SamplingParams(max_tokens=20))


def test_invalid_requests_leave_no_blocks(llm):
    for bad in ([[]], [[10**6]]):
        with pytest.raises(ValueError):
            llm.generate(prompt_token_ids=bad)
    stats = llm.get_stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total
    assert not llm.engine.has_unfinished_requests()


def test_abort_frees_blocks_at_once(llm):
    eng = llm.engine
    for i in range(4):
        eng.add_request(f"a{i}", "import sys", SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.get_stats().num_kv_blocks_free < eng.get_stats().num_kv_blocks_total
    eng.abort_request([f"a{i}" for i in range(4)])
    s = eng.get_stats()
    assert s.num_kv_blocks_free == s.num_kv_blocks_total
    outs = eng.step()
    assert {o.request_id for o in outs} == {f"a{i}" for i in range(4)}
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert not eng.has_unfinished_requests()


def test_expert_usage_counts_top2(llm):
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    out = llm.generate(prompt_token_ids=[[7, 8, 9, 10]], sampling_params=sp)[0]
    u = out.expert_usage
    n_layers = llm.engine.runner.num_moe_layers
    # 4 prompt tokens + 4 generated tokens fed back (the 5th is never fed) = 8 positions, 2 experts each
    assert u.num_tokens == 8
    assert u.per_layer == [8 * 2] * n_layers
    assert u.expert_activations == 8 * 2 * n_layers
    assert u.avg_experts_per_token == pytest.approx(2.0)


def test_per_request_routing_in_one_batch(llm):
    sp_k = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    sp_1 = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, routing=RoutingConfig(k=1))
    outs = llm.generate(["import os", "import os"], [sp_k, sp_1])
    assert outs[0].expert_usage.avg_experts_per_token == pytest.approx(2.0)
    assert outs[1].expert_usage.avg_experts_per_token == pytest.approx(1.0)


def test_logprobs_returned(llm):
    out = llm.generate("x", SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok
        assert len(lp.top) == 3
        assert lp.top[0].logprob >= lp.top[-1].logprob
        assert lp.logprob <= 0.0
