"""One request can never take the engine down (issue 12), engine side: an error that belongs to one
request ends that request with an error and the others go on in the same step; request ids can be
reused right after an abort; a consumer whose event loop closed stops its request; usage (expert
activations, cached tokens) counts each token position once, whatever the load."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from dynserve.config import EngineConfig, RoutingConfig
from dynserve.engine.async_engine import AsyncEngine, RequestFailedError
from dynserve.engine.llm_engine import LLMEngine
from dynserve.sampling_params import SamplingParams

PROMPTS = ["def hello(name):", "import os\nimport sys\n", "class Foo:\n    def __init__(self):", "x = [1, 2, 3]"]


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory):
    return str(checkpoint_factory("mixtral"))


def _run(engine: LLMEngine) -> dict:
    finals = {}
    for _ in range(2000):
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if not engine.has_unfinished_requests():
            return finals
    raise AssertionError("engine did not finish")


def test_a_request_whose_stop_check_raises_fails_alone_in_its_step(ckpt):
    engine = LLMEngine(EngineConfig.create(ckpt, num_kv_blocks=64, max_num_seqs=8))
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine.add_request("alone", PROMPTS[0], greedy)
    want = _run(engine)["alone"].outputs[0].token_ids

    broken = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    bad_sampling = SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True)
    engine.add_request("ok-1", PROMPTS[0], greedy)
    engine.add_request("broken", PROMPTS[1], broken)
    engine.add_request("bad-sampling", PROMPTS[2], bad_sampling)
    engine.add_request("ok-2", PROMPTS[0], greedy)
    # corrupted after validation: the stop check of one, the sampling of the other raise TypeError
    broken.max_tokens = "12"
    bad_sampling.top_k = "all"
    finals = _run(engine)
    for rid in ("broken", "bad-sampling"):
        assert finals[rid].error is not None and "TypeError" in finals[rid].error
        assert finals[rid].finished
    for rid in ("ok-1", "ok-2"):
        assert finals[rid].error is None
        assert finals[rid].outputs[0].token_ids == want
        assert finals[rid].outputs[0].finish_reason == "length"
    stats = engine.get_stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total  # no leaked KV block


def test_extreme_top_p_and_penalties_finish_normally_next_to_others(ckpt):
    """The inputs that killed the engine: each now finishes with in-vocabulary tokens."""
    engine = LLMEngine(EngineConfig.create(ckpt, num_kv_blocks=64, max_num_seqs=16))
    vocab = engine.model_config.vocab_size
    extremes = [
        dict(top_p=1e-300),
        dict(top_p=5e-324),
        dict(top_p=1e-46, seed=1),
        dict(repetition_penalty=5e-324),
        dict(repetition_penalty=1e-39, temperature=0.0),
        dict(repetition_penalty=1e30),
        dict(repetition_penalty=1e30, top_p=0.5),
    ]
    for i, kw in enumerate(extremes):
        engine.add_request(f"r{i}", PROMPTS[i % 4], SamplingParams(max_tokens=8, ignore_eos=True, **kw))
    finals = _run(engine)
    assert len(finals) == len(extremes)
    for out in finals.values():
        assert out.error is None
        ids = out.outputs[0].token_ids
        assert len(ids) == 8 and all(0 <= t < vocab for t in ids)


def test_preemption_counts_each_position_once(ckpt):
    """Recomputing preempted sequences must not change what usage reports: expert activations and
    cached prompt tokens are the same as in a run without preemption."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [p * 3 for p in PROMPTS] + [PROMPTS[1] * 3 + "y = 1"]  # the last shares a cached prefix

    def run(num_kv_blocks: int) -> tuple[dict, int]:
        engine = LLMEngine(
            EngineConfig.create(
                ckpt, num_kv_blocks=num_kv_blocks, block_size=4, max_num_seqs=8, routing=RoutingConfig()
            )
        )
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        finals = _run(engine)
        k = engine.model_config.top_k
        for out in finals.values():  # top_k routing: exactly k experts per counted position
            assert out.expert_usage.avg_experts_per_token == pytest.approx(k)
        return finals, engine.get_stats().num_preemptions

    calm, calm_preemptions = run(256)
    busy, busy_preemptions = run(40)
    assert calm_preemptions == 0 and busy_preemptions > 0
    for rid, out in calm.items():
        if rid == f"r{len(PROMPTS)}":  # its prefix-cache hit depends on load (hits are not counted)
            continue
        other = busy[rid]
        assert other.outputs[0].token_ids == out.outputs[0].token_ids
        assert other.expert_usage.expert_activations == out.expert_usage.expert_activations
        assert other.expert_usage.per_layer == out.expert_usage.per_layer
        assert other.num_cached_tokens <= len(other.prompt_token_ids)
        assert other.num_cached_tokens == out.num_cached_tokens


@pytest.fixture(scope="module")
def shared_engine(ckpt):
    return LLMEngine(EngineConfig.create(ckpt, num_kv_blocks=96, max_num_seqs=4))


def test_request_id_reused_right_after_abort_gets_its_own_outputs(shared_engine):
    aengine = AsyncEngine(shared_engine)
    try:

        async def main() -> list:
            long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
            stream = await aengine.add_request("same-id", PROMPTS[0], long)
            await stream.__anext__()
            stream.abort()
            short = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
            for _ in range(500):  # the id is free once the engine processed the abort
                try:
                    stream2 = await aengine.add_request("same-id", PROMPTS[1], short)
                    break
                except ValueError:
                    await asyncio.sleep(0.001)
            return [out async for out in stream2]

        outs = asyncio.run(main())
        final = outs[-1]
        assert final.finished and final.outputs[0].finish_reason == "length"
        assert len(final.outputs[0].token_ids) == 5
    finally:
        aengine.shutdown_sync(timeout=0)


def test_a_consumer_whose_event_loop_closed_stops_its_request(shared_engine):
    aengine = AsyncEngine(shared_engine)
    try:
        before = shared_engine.get_stats().generation_tokens

        async def consume_one() -> None:
            params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
            stream = await aengine.add_request("orphan", PROMPTS[0], params)
            await stream.__anext__()  # then the loop ends without closing the stream

        t = threading.Thread(target=asyncio.run, args=(consume_one(),))
        t.start()
        t.join()
        deadline = time.monotonic() + 30
        while aengine.num_unfinished_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        stats = shared_engine.get_stats()
        assert aengine.num_unfinished_requests == 0 and not shared_engine.has_unfinished_requests()
        assert stats.generation_tokens - before < 400  # stopped, not run to max_tokens
        assert stats.num_kv_blocks_free == stats.num_kv_blocks_total
    finally:
        aengine.shutdown_sync(timeout=0)


def test_async_engine_reports_a_request_error_and_keeps_serving(shared_engine):
    aengine = AsyncEngine(shared_engine)
    try:

        async def main() -> tuple:
            broken = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
            ok = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
            s_bad = await aengine.add_request("bad", PROMPTS[0], broken)
            broken.max_tokens = "6"  # its stop check now raises TypeError
            s_ok = await aengine.add_request("ok", PROMPTS[1], ok)
            with pytest.raises(RequestFailedError, match="TypeError"):
                async for _ in s_bad:
                    pass
            outs = [o async for o in s_ok]
            return outs[-1]

        final = asyncio.run(main())
        assert final.outputs[0].finish_reason == "length" and len(final.outputs[0].token_ids) == 6
        assert aengine.is_healthy
    finally:
        aengine.shutdown_sync(timeout=0)


def test_request_routing_overrides_only_the_fields_it_sets(ckpt):
    """One rule in Python and over HTTP: a request's routing fields override the engine default,
    the fields it leaves out keep the default."""
    engine = LLMEngine(
        EngineConfig.create(ckpt, num_kv_blocks=64, routing=RoutingConfig(policy="top_p", p=0.99, max_experts=1))
    )
    params = dict(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("default", PROMPTS[0], SamplingParams(**params))
    engine.add_request("keeps-max", PROMPTS[0], SamplingParams(**params, routing=RoutingConfig(p=0.9)))
    engine.add_request("sets-max", PROMPTS[0], SamplingParams(**params, routing=RoutingConfig(max_experts=3)))
    engine.add_request("top-k", PROMPTS[0], SamplingParams(**params, routing=RoutingConfig(policy="top_k", k=2)))
    finals = _run(engine)
    avg = {rid: out.expert_usage.avg_experts_per_token for rid, out in finals.items()}
    assert avg["default"] == avg["keeps-max"] == 1.0  # max_experts=1 kept from the default
    assert avg["sets-max"] > 1.0  # p=0.99 of the default with the request's max_experts=3
    assert avg["top-k"] == 1.0  # k=2 clamped by the default's max_experts=1
