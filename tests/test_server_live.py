"""A live `uvicorn` server (subprocess, loopback, one per module) driven by the official `openai`
SDK (sync and async) and raw httpx: chat, completions, streaming usage, n, stop, logprobs,
seeds, per-request routing, API key, offline parity, errors, metrics, disconnects returning KV
blocks, backpressure, graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

MODEL = "tiny-moe"
KEY = "sk-live-test"
MAX_SEQS = 4
MAX_QUEUED = 8


@dataclass
class Live:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    log: Path
    model_dir: str

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.v1, api_key=key, max_retries=0, timeout=60)

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.v1, api_key=KEY, max_retries=0, timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint_factory, tmp_path_factory):
    ckpt = str(checkpoint_factory("mixtral"))
    port = _free_port()
    log = tmp_path_factory.mktemp("live_server") / "server.log"
    code = textwrap.dedent(
        f"""
        from dynserve.config import EngineConfig
        from dynserve.server.run import ServerSettings, run_server
        cfg = EngineConfig.create({ckpt!r}, num_kv_blocks=128, max_num_seqs={MAX_SEQS}, routing={{"policy": "top_k"}})
        run_server(cfg, ServerSettings(host="127.0.0.1", port={port}, api_key={KEY!r},
                   served_model_name={MODEL!r}, max_queued_requests={MAX_QUEUED}, shutdown_timeout=20,
                   enable_expert_token_metrics=True, log_level="warning"))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "DYNSERVE_API_KEY"}
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=logf, stderr=subprocess.STDOUT, env=env)
    live = Live(f"http://127.0.0.1:{port}", proc, log, ckpt)
    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{live.url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not become healthy:\n{log.read_text()[-4000:]}")
        time.sleep(0.25)
    yield live
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def offline(server) -> LLM:
    return LLM(server.model_dir, num_kv_blocks=64, routing={"policy": "top_k"})


def _metrics(live: Live) -> dict[str, float]:
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _wait_settled(live: Live, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(live)
        if (
            m["dynserve_num_requests_running"] == 0
            and m["dynserve_num_requests_waiting"] == 0
            and m["dynserve_kv_cache_free_blocks"] == m["dynserve_kv_cache_blocks"]
        ):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(
                f"server did not settle: running={m['dynserve_num_requests_running']} "
                f"free={m['dynserve_kv_cache_free_blocks']}/{m['dynserve_kv_cache_blocks']}"
            )
        time.sleep(0.1)


def _usage_extra(usage) -> tuple[int, float]:
    return usage.model_extra["expert_activations"], usage.model_extra["avg_experts_per_token"]


# ------------------------------------------------------------------------------- basics
def test_models_and_api_key(server):
    assert [m.id for m in server.client().models.list()] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        server.client(key="sk-wrong").models.list()
    r = httpx.post(f"{server.v1}/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key


def test_greedy_matches_offline(server, offline):
    client = server.client()
    prompt = "def hello(name):"
    resp = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    ref = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert resp.choices[0].text == ref.outputs[0].text
    assert resp.usage.completion_tokens == 12 and resp.choices[0].finish_reason == "length"
    acts, avg = _usage_extra(resp.usage)
    assert acts == ref.expert_usage.expert_activations
    assert avg == pytest.approx(ref.expert_usage.avg_experts_per_token)

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "import os"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=10))[0]
    assert chat.choices[0].message.content == ref.outputs[0].text
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert chat.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_async_streaming_with_usage(server):
    async def run():
        client = server.aclient()
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0)
        stream = await client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        full = await client.chat.completions.create(**kw)
        await client.close()
        return chunks, full

    chunks, full = asyncio.run(run())
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    assert body[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == full.choices[0].message.content
    acts, avg = _usage_extra(usage_chunk.usage)
    assert usage_chunk.usage.completion_tokens == full.usage.completion_tokens
    assert acts > 0 and avg > 0


def test_completion_stream_sync_n2(server):
    stream = server.client().completions.create(
        model=MODEL, prompt="import os", max_tokens=6, n=2, seed=3, stream=True, extra_body={"ignore_eos": True}
    )
    texts = {0: "", 1: ""}
    finish = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "length", 1: "length"}


def test_n_seed_and_stop(server):
    client = server.client()
    kw = dict(model=MODEL, prompt="class Foo", max_tokens=10, temperature=1.0, extra_body={"ignore_eos": True})
    r = client.completions.create(**kw, n=2, seed=11)
    assert sorted(c.index for c in r.choices) == [0, 1] and r.usage.completion_tokens == 20
    again = client.completions.create(**kw, n=2, seed=11)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    texts = {client.completions.create(**kw, seed=s).choices[0].text for s in (1, 2, 3)}
    assert len(texts) > 1

    base = (
        client.completions.create(
            model=MODEL, prompt="import sys", max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = next(ch for ch in base[1:] if ch.isascii() and ch.isalnum())
    cut = client.completions.create(
        model=MODEL, prompt="import sys", max_tokens=16, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    ).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == base[: base.index(stop)]


def test_logprobs(server):
    client = server.client()
    r = client.completions.create(
        model=MODEL, prompt="x = 1", max_tokens=5, logprobs=2, temperature=0, extra_body={"ignore_eos": True}
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(x <= 0 for x in lp.token_logprobs)
    c = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    content = c.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.logprob >= item.top_logprobs[0].logprob - 1e-4  # greedy = most likely token


def test_routing_per_request_via_extra_body(server):
    client = server.client()

    def avg(routing: dict | None) -> float:
        extra = {"ignore_eos": True, **({"routing": routing} if routing else {})}
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "The quick brown"}],
            max_tokens=8,
            temperature=0,
            extra_body=extra,
        )
        return _usage_extra(r.usage)[1]

    top2 = avg({"policy": "top_k"})
    assert top2 == pytest.approx(2.0)  # the checkpoint's top-2
    assert avg(None) == pytest.approx(top2)  # the server default is the checkpoint's rule
    top_p = avg({"policy": "top_p", "p": 0.3})
    assert 1.0 <= top_p < top2
    assert avg({"policy": "top_k", "k": 1}) == pytest.approx(1.0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            extra_body={"routing": {"policy": "top_p", "p": 1.5}},
        )
    assert e.value.param == "routing.p"


def test_routed_experts_steering_and_recorder_with_the_sdk(server):
    """Issue 15 with the official SDK: ragged routed experts (top_p) for completions and chat, streamed
    and not, matching usage, null rows for cached prompt positions; excluded experts never appear; the
    recorder's dump sums to what was served."""
    client = server.client()
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{server.url}/expert_distribution/start", headers=auth, timeout=10).status_code == 200
    extra = {"ignore_eos": True, "return_routed_experts": True, "routing": {"policy": "top_p", "p": 0.6}}
    prompt = "routed experts through the official client, twice over " * 2
    served = []
    for _ in range(2):  # the second one finds the prompt in the prefix cache
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, extra_body=extra)
        served.append(r)
    first, second = (r.model_extra for r in served)
    rows = first["prompt_routed_experts"] + served[0].choices[0].model_extra["routed_experts"]
    assert len({len(ids) for row in rows if row for ids in row}) > 1  # ragged
    assert sum(len(ids) for row in rows if row for ids in row) == _usage_extra(served[0].usage)[0]
    cached = served[1].usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and second["prompt_routed_experts"][:cached] == [None] * cached
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello experts"}],
        max_tokens=5,
        temperature=0,
        extra_body={**extra, "routing": {"policy": "top_p", "p": 0.6, "exclude_experts": [1]}},
    )
    served.append(chat)
    chat_rows = chat.model_extra["prompt_routed_experts"] + chat.choices[0].model_extra["routed_experts"]
    assert not any(1 in ids for row in chat_rows if row for ids in row)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello experts"}],
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={**extra, "routing": {"policy": "top_p", "p": 0.6, "exclude_experts": [1]}},
    )
    chunks = list(stream)
    streamed = [row for ch in chunks for c in ch.choices for row in (c.model_extra or {}).get("routed_experts", [])]
    assert streamed == chat.choices[0].model_extra["routed_experts"]
    served.append(chunks[-1])  # the usage chunk
    assert httpx.post(f"{server.url}/expert_distribution/stop", headers=auth, timeout=10).status_code == 200
    dump = httpx.get(f"{server.url}/expert_distribution/dump", headers=auth, timeout=10).json()
    assert sum(map(sum, dump["expert_tokens"])) == sum(_usage_extra(r.usage)[0] for r in served)


def test_errors_context_length_and_unknown_model(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[5] * 500, max_tokens=20)
    assert "This model's maximum context length is 512 tokens. However, you requested 520 tokens" in str(e.value)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "import os " * 300}])
    assert "maximum context length is 512 tokens" in str(e.value)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", suffix="y")
    assert "suffix is not supported" in str(e.value)


def test_metrics_move_by_the_traffic(server):
    before = _wait_settled(server)
    r = server.client().completions.create(
        model=MODEL, prompt="import os", max_tokens=7, extra_body={"ignore_eos": True}
    )
    after = _wait_settled(server)

    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert d("dynserve_generation_tokens_total") == r.usage.completion_tokens == 7
    assert d("dynserve_prompt_tokens_total") == r.usage.prompt_tokens
    assert d("dynserve_expert_activations_total") == _usage_extra(r.usage)[0]
    assert d("dynserve_request_success_total{finished_reason=length}") == 1
    assert d("dynserve_e2e_request_latency_seconds_count") == 1
    assert d("dynserve_time_to_first_token_seconds_count") == 1
    assert after[f"vllm:num_requests_running{{model_name={MODEL}}}"] == 0
    assert after[f"vllm:kv_cache_usage_perc{{model_name={MODEL}}}"] == 0
    # --enable-expert-token-metrics: per-(layer, expert) counts agree with the k histogram
    layers = sorted(
        {k.split("layer=")[1].split(",")[0].rstrip("}") for k in after if k.startswith("dynserve_expert_tokens_total")}
    )
    assert layers == ["0", "1"]
    for layer in layers:
        per_expert = sum(
            v for k, v in after.items() if k.startswith("dynserve_expert_tokens_total") and f"layer={layer}}}" in k
        )
        assert per_expert == after[f"dynserve_experts_per_token_sum{{layer={layer}}}"]


def test_disconnects_return_every_kv_block(server):
    before = _wait_settled(server)
    rng = random.Random(1234)
    headers = {"Authorization": f"Bearer {KEY}"}
    outcome = {"cut": 0, "503": 0, "timeout": 0, "done": 0}

    gate = asyncio.Semaphore(6)  # 200 streams, at most 6 in flight: within MAX_SEQS + MAX_QUEUED, so no 503

    async def streamer(i: int, client: httpx.AsyncClient) -> None:
        async with gate:
            await one_stream(i, client)

    async def one_stream(i: int, client: httpx.AsyncClient) -> None:
        chat = i % 2 == 0
        path = "/chat/completions" if chat else "/completions"
        body = {"model": MODEL, "max_tokens": 200, "ignore_eos": True, "stream": True}
        body.update({"messages": [{"role": "user", "content": f"request {i}"}]} if chat else {"prompt": f"x{i}"})
        cut_after = rng.randint(0, 6)
        await asyncio.sleep(rng.random() * 0.05)
        async with client.stream("POST", f"{server.v1}{path}", json=body, headers=headers) as r:
            if r.status_code == 503:
                outcome["503"] += 1
                return
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen > cut_after:
                        outcome["cut"] += 1
                        return  # leaving the block closes the connection mid-stream
        outcome["done"] += 1

    async def impatient(i: int, client: httpx.AsyncClient) -> None:
        try:
            r = await client.post(
                f"{server.v1}/completions",
                headers=headers,
                timeout=0.4 + 0.1 * i,
                json={"model": MODEL, "prompt": f"y{i}", "max_tokens": 300, "ignore_eos": True},
            )
            outcome["503" if r.status_code == 503 else "done"] += 1
        except httpx.TimeoutException:
            outcome["timeout"] += 1

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*[streamer(i, client) for i in range(200)], *[impatient(i, client) for i in range(3)])

    asyncio.run(run())
    assert outcome["cut"] >= 150 and outcome["timeout"] >= 1, outcome
    after = _wait_settled(server)
    assert after["dynserve_kv_cache_free_blocks"] == after["dynserve_kv_cache_blocks"]
    aborted = after["dynserve_request_success_total{finished_reason=abort}"]
    assert aborted - before["dynserve_request_success_total{finished_reason=abort}"] >= outcome["cut"]
    # and the server still answers
    r = server.client().completions.create(model=MODEL, prompt="x", max_tokens=3)
    assert r.usage.completion_tokens >= 1


def test_backpressure_503_with_retry_after_while_health_ok(server):
    _wait_settled(server)
    headers = {"Authorization": f"Bearer {KEY}"}
    statuses: list[tuple[int, dict, dict]] = []

    async def one(i: int, client: httpx.AsyncClient) -> None:
        r = await client.post(
            f"{server.v1}/completions",
            headers=headers,
            json={"model": MODEL, "prompt": f"z{i}", "max_tokens": 400, "ignore_eos": True},
        )
        statuses.append((r.status_code, dict(r.headers), r.json()))

    async def run() -> float:
        async with httpx.AsyncClient(timeout=120) as client:
            tasks = [asyncio.ensure_future(one(i, client)) for i in range(3 * (MAX_SEQS + MAX_QUEUED))]
            deadline = time.monotonic() + 30
            while not any(s == 503 for s, _, _ in statuses) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            t0 = time.monotonic()
            health = await client.get(f"{server.url}/health")
            health_s = time.monotonic() - t0
            assert health.status_code == 200
            for t in tasks:
                t.cancel()  # the rest disconnect: their requests are aborted
            await asyncio.gather(*tasks, return_exceptions=True)
            return health_s

    health_s = asyncio.run(run())
    rejected = [(h, b) for s, h, b in statuses if s == 503]
    assert rejected, statuses
    for h, b in rejected:
        assert int(h["retry-after"]) >= 1
        assert b["error"]["type"] == "server_error" and b["error"]["code"] == "server_overloaded"
    assert health_s < 5.0
    _wait_settled(server)


def test_zz_graceful_shutdown_on_sigterm(server):
    """Last in the module: SIGTERM lets an in-flight stream finish, then the process exits."""
    _wait_settled(server)
    events: list[str] = []

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": MODEL, "prompt": "import os", "max_tokens": 40, "ignore_eos": True, "stream": True}
            async with client.stream(
                "POST", f"{server.v1}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
            ) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    events.append(line)
                    if len(events) == 2:
                        server.proc.send_signal(signal.SIGTERM)

    asyncio.run(run())
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("error" not in c for c in chunks)
    assert server.proc.wait(30) == 0  # a graceful SIGTERM shutdown exits 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=2)
