"""AsyncEngine over the real LLMEngine on a tiny checkpoint: streaming outputs, validation errors,
aborts returning KV blocks, backpressure, graceful shutdown, a dying loop thread, idle sleep."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from dynserve.config import EngineConfig
from dynserve.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineStoppedError,
    QueueFullError,
    RequestAbortedError,
)
from dynserve.engine.llm_engine import LLMEngine
from dynserve.engine.stats import EngineStats
from dynserve.sampling_params import SamplingParams

LONG = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)


@pytest.fixture(scope="module")
def llm_engine(checkpoint_factory) -> LLMEngine:
    cfg = EngineConfig.create(str(checkpoint_factory("mixtral")), num_kv_blocks=96, max_num_seqs=4)
    return LLMEngine(cfg)


@pytest.fixture
def aengine(llm_engine):
    """A fresh AsyncEngine (own loop thread) over the shared LLMEngine; shut down afterwards."""
    engines: list[AsyncEngine] = []

    def make(**kw) -> AsyncEngine:
        e = AsyncEngine(llm_engine, **kw)
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.shutdown_sync(timeout=0)
    assert not llm_engine.has_unfinished_requests()


def _wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> EngineStats:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.get_stats()
        if (
            engine.num_unfinished_requests == 0
            and s.num_running_requests == 0
            and s.num_waiting_requests == 0
            and s.num_kv_blocks_free == s.num_kv_blocks_total
        ):
            return s
        time.sleep(0.02)
    raise AssertionError(f"engine did not settle: {engine.get_stats()}")


def test_generate_streams_deltas_that_add_up(aengine):
    eng = aengine()

    async def run():
        outs = [
            o
            async for o in eng.generate(
                "def hello(name):", SamplingParams(temperature=0, max_tokens=9, ignore_eos=True), "r1"
            )
        ]
        return outs

    outs = asyncio.run(run())
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    final = outs[-1].outputs[0]
    assert len(final.token_ids) == 9 and final.finish_reason == "length"
    assert [t for o in outs for t in o.outputs[0].token_ids_delta] == final.token_ids
    assert "".join(o.outputs[0].text_delta for o in outs) == final.text
    assert outs[-1].expert_usage.expert_activations > 0


def test_validation_error_surfaces_as_value_error(aengine):
    eng = aengine()

    async def run():
        with pytest.raises(ValueError, match="maximum context length is 512 tokens"):
            await eng.add_request("big", None, SamplingParams(max_tokens=20), prompt_token_ids=[5] * 500)
        with pytest.raises(ValueError, match="out of range"):
            async for _ in eng.generate(None, SamplingParams(), "oob", prompt_token_ids=[10**7]):
                pass
        # the engine still serves afterwards
        return [o async for o in eng.generate("x = 1", SamplingParams(max_tokens=3), "ok")]

    assert asyncio.run(run())[-1].finished
    _wait_idle(eng)


def test_consumer_leaving_aborts_and_frees_kv(aengine):
    eng = aengine()

    async def run():
        agen = eng.generate("import os", LONG, "leaver")
        n = 0
        async for _ in agen:
            n += 1
            if n == 3:
                break
        await agen.aclose()
        # a cancelled consumer (task cancelled while waiting for the next output)
        stream = await eng.add_request("cancelled", "import sys", LONG)

        async def drain():
            async for _ in stream:
                pass

        task = asyncio.ensure_future(drain())
        await asyncio.sleep(0.1)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    s = _wait_idle(eng)
    assert s.num_kv_blocks_free == s.num_kv_blocks_total


def test_server_side_abort_raises_in_stream(aengine):
    eng = aengine()

    async def run():
        stream = await eng.add_request("victim", "class Foo", LONG)
        await stream.__anext__()
        eng.abort("victim")
        with pytest.raises(RequestAbortedError):
            async for _ in stream:
                pass

    asyncio.run(run())
    _wait_idle(eng)


def test_backpressure_rejects_beyond_waiting_limit(aengine):
    eng = aengine(max_queued_requests=2)

    async def run():
        results = await asyncio.gather(
            *[eng.add_request(f"bp{i}", "import os", LONG) for i in range(16)], return_exceptions=True
        )
        accepted = [r for r in results if not isinstance(r, BaseException)]
        rejected = [r for r in results if isinstance(r, QueueFullError)]
        assert len(accepted) + len(rejected) == 16
        assert rejected and len(accepted) >= 2
        assert all(r.retry_after > 0 for r in rejected)
        for s in accepted:
            s.abort()

    asyncio.run(run())
    _wait_idle(eng)


def test_shutdown_finishes_in_flight_then_refuses(aengine):
    eng = aengine()

    async def run():
        short = await eng.add_request("short", "x = 1", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        # the whole remaining context (~509 tokens): far longer than the shutdown window below
        long = await eng.add_request("long", "import os", SamplingParams(max_tokens=None, ignore_eos=True))

        async def drain(stream):
            try:
                return [o async for o in stream]
            except RequestAbortedError as e:
                return e

        tasks = [asyncio.ensure_future(drain(short)), asyncio.ensure_future(drain(long))]
        await asyncio.sleep(0)
        await eng.shutdown(timeout=0.5)
        short_out, long_out = await asyncio.gather(*tasks)
        assert short_out[-1].finished and short_out[-1].outputs[0].finish_reason == "length"
        assert isinstance(long_out, RequestAbortedError)
        with pytest.raises(EngineStoppedError):
            await eng.add_request("late", "x", SamplingParams())

    asyncio.run(run())
    assert not eng.is_healthy
    s = eng.engine.get_stats()
    assert s.num_kv_blocks_free == s.num_kv_blocks_total


class _ExplodingEngine:
    """Looks like an LLMEngine whose step() raises (touches no real engine state)."""

    def __init__(self, real: LLMEngine) -> None:
        self.config = real.config
        self.tokenizer = real.tokenizer
        self.added: list[str] = []
        self.num_steps = 0

    def add_request(self, request_id, prompt, params, prompt_token_ids=None, arrival_time=None):
        self.added.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.added)

    def step(self):
        raise RuntimeError("boom: device lost")

    def abort_request(self, request_id) -> None:
        pass

    def get_stats(self) -> EngineStats:
        return EngineStats()


def test_dead_loop_is_unhealthy_and_fails_requests(llm_engine):
    eng = AsyncEngine(_ExplodingEngine(llm_engine))

    async def run():
        assert eng.is_healthy or eng.dead_error is not None
        with pytest.raises(EngineDeadError, match="boom"):
            stream = await eng.add_request("doomed", "x", SamplingParams())
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await eng.add_request("after", "x", SamplingParams())

    asyncio.run(run())
    assert not eng.is_healthy
    assert "boom" in repr(eng.dead_error)


def test_outputs_reach_consumers_on_different_event_loops(aengine):
    eng = aengine()
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        async def run():
            outs = [o async for o in eng.generate("def hello", SamplingParams(temperature=0, max_tokens=6), f"t{i}")]
            results[i] = outs[-1].outputs[0].text

        asyncio.run(run())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 3 and len(set(results.values())) == 1  # greedy: the same text everywhere


def test_idle_loop_sleeps_instead_of_spinning(aengine, llm_engine):
    eng = aengine()

    async def one():
        return [o async for o in eng.generate("x", SamplingParams(max_tokens=2), "warm")]

    asyncio.run(one())
    _wait_idle(eng)
    calls = 0
    real = llm_engine.has_unfinished_requests

    def counting() -> bool:
        nonlocal calls
        calls += 1
        return real()

    llm_engine.has_unfinished_requests = counting  # type: ignore[method-assign]
    try:
        time.sleep(0.5)
    finally:
        del llm_engine.has_unfinished_requests
    assert calls <= 2


def test_latency_observations_reach_sinks(aengine):
    eng = aengine()

    class Sink:
        def __init__(self):
            self.ttft, self.itl, self.done = [], [], []

        def observe_first_token(self, s):
            self.ttft.append(s)

        def observe_inter_token(self, s):
            self.itl.append(s)

        def observe_finished(self, reason, e2e, queue):
            self.done.append((reason, e2e, queue))

    sink = Sink()
    eng.add_metrics_sink(sink)

    async def run():
        return [o async for o in eng.generate("x = 1", SamplingParams(max_tokens=5, ignore_eos=True), "m")]

    outs = asyncio.run(run())
    token_outputs = sum(1 for o in outs if o.outputs[0].token_ids_delta)
    assert len(sink.ttft) == 1 and sink.ttft[0] >= 0
    assert len(sink.itl) == token_outputs - 1
    assert len(sink.done) == 1 and sink.done[0][0] == "length"
    reason, e2e, queue = sink.done[0]
    assert e2e >= sink.ttft[0] >= 0 and queue is not None and 0 <= queue <= e2e
