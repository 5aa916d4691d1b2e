"""loadtests/: the load generator's SSE parsing, statistics, arrival processes and bounds against an
in-test fake OpenAI server with known timings; then the generator, the routing sweep and a short
soak with client disconnects against a live `dynserve serve` subprocess on a tiny checkpoint."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from dataclasses import replace

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loadtests import loadgen, routing_sweep, soak
from loadtests.loadgen import LoadConfig, RequestResult, RunOutput, SSEDecoder
from loadtests.server import ServerProcess, dynserve_command, free_port, scrape

FAKE_MODEL = "fake-model"
FAKE_TTFT = 0.12
FAKE_ITL = 0.04
FAKE_TOKENS = 5


# ------------------------------------------------------------------------------- fake server
class FakeState:
    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []


def _fake_app(state: FakeState) -> FastAPI:
    """Streams FAKE_TOKENS tokens: the first after FAKE_TTFT, then one every FAKE_ITL, with SSE
    comments and a usage chunk; prompts starting with fail/midfail/slow/nodone misbehave."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": FAKE_MODEL, "object": "model"}]}

    async def handle(req: Request, chat: bool):
        body = await req.json()
        state.bodies.append(body)
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        ids_only = isinstance(prompt, list)  # token-id prompts: a model without a tokenizer, no text out
        prompt = "" if ids_only else prompt
        if prompt.startswith("fail"):
            return JSONResponse(
                {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}},
                status_code=500,
            )
        usage = {
            "prompt_tokens": 7,
            "completion_tokens": FAKE_TOKENS,
            "total_tokens": 7 + FAKE_TOKENS,
            "expert_activations": 30,
            "avg_experts_per_token": 1.25,
        }

        def choice(text: str, finish: str | None) -> dict:
            if ids_only:
                return {
                    "index": 0,
                    "text": "",
                    "finish_reason": finish,
                    "token_ids": [7] if body.get("return_token_ids") else [],
                }
            if chat:
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        if not body.get("stream"):
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                await asyncio.sleep(30 if prompt.startswith("slow") else FAKE_TTFT)
            finally:
                state.in_flight -= 1
            c = choice("hello", "length")
            if chat:
                c["message"] = {"role": "assistant", "content": c.pop("delta")["content"]}
            return {"id": "x", "object": "text_completion", "choices": [c], "usage": usage}

        async def gen():
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                yield ": keep-alive comment\n\n"
                if chat:  # a role-only first chunk carries no content: not a token
                    yield ("data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}) + "\n\n")
                await asyncio.sleep(30 if prompt.startswith("slow") else FAKE_TTFT)
                for i in range(FAKE_TOKENS):
                    if i:
                        await asyncio.sleep(FAKE_ITL)
                    if prompt.startswith("midfail") and i == 2:
                        yield "data: " + json.dumps({"error": {"message": "engine died", "type": "server_error"}})
                        yield "\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    finish = "length" if i == FAKE_TOKENS - 1 else None
                    yield ("data: " + json.dumps({"choices": [choice(f"t{i} ", finish)], "usage": None}) + "\n\n")
                if prompt.startswith("nodone"):
                    return
                yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state.in_flight -= 1

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: Request):
        return await handle(req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        return await handle(req, chat=True)

    return app


@pytest.fixture(scope="module")
def fake():
    state = FakeState()
    port = free_port()
    config = uvicorn.Config(
        _fake_app(state), host="127.0.0.1", port=port, log_level="error", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(10)


def _run(cfg: LoadConfig, prompts: list[str] | None = None, **spec_kw) -> RunOutput:
    specs = loadgen.build_requests(cfg)
    if prompts is not None:
        for s, p in zip(specs, prompts, strict=False):
            if s.messages is not None:
                s.messages = [{"role": "user", "content": p}]
            else:
                s.prompt = p
    for s in specs:
        for k, v in spec_kw.items():
            setattr(s, k, v)
    return asyncio.run(loadgen.run_requests(cfg, specs))


# ------------------------------------------------------------------------------- pure units
def test_refuses_targets_off_loopback():
    for url in (
        "http://10.0.0.1:8000",
        "http://192.168.1.10",
        "https://example.com/v1",
        "http://8.8.8.8:80",
        "http://[2001:db8::1]:8000",
        "ftp://127.0.0.1",
    ):
        with pytest.raises(loadgen.TargetNotAllowedError):
            loadgen.check_target(url)
    for url in ("http://127.0.0.1:8000", "http://localhost:8000/", "http://[::1]:9000", "http://127.9.8.7"):
        assert loadgen.check_target(url) == url.rstrip("/")
    assert loadgen.check_target("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert loadgen.check_target("http://10.0.0.1:8000", allow_remote=True) == "http://10.0.0.1:8000"
    t0 = time.monotonic()
    assert loadgen.main(["--base-url", "http://10.1.2.3:8000", "--num-requests", "5"]) == 2
    assert routing_sweep.main(["--base-url", "http://10.1.2.3:8000"]) == 2
    assert soak.main(["--base-url", "http://10.1.2.3:8000", "--duration", "1"]) == 2
    assert time.monotonic() - t0 < 2.0  # refused up front, no connection attempt to time out


def test_config_validation_rejects_unbounded_runs():
    for bad in (
        dict(max_duration=math.inf),
        dict(max_duration=0),
        dict(num_requests=0),
        dict(concurrency=0),
        dict(request_rate=0),
        dict(stream_ratio=1.5),
        dict(prompt_format="token-ids", endpoint="/v1/chat/completions"),
        dict(endpoint="/v1/embeddings"),
    ):
        with pytest.raises(ValueError):
            LoadConfig(**bad).validate()
    LoadConfig().validate()


def test_poisson_arrivals_have_the_requested_rate():
    times = loadgen.poisson_arrivals(4000, rate=50.0, seed=3)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert times[0] == 0.0 and all(g >= 0 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50.0, rel=0.08)
    # exponential gaps: standard deviation close to the mean (not evenly spaced)
    mean = sum(gaps) / len(gaps)
    std = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
    assert std == pytest.approx(mean, rel=0.12)
    assert loadgen.poisson_arrivals(4000, 50.0, seed=3) == times
    assert loadgen.poisson_arrivals(3, math.inf) == [0.0, 0.0, 0.0]


def test_synthetic_and_jsonl_workloads(tmp_path):
    cfg = LoadConfig(num_requests=200, input_len=40, output_len=10, range_ratio=0.5, seed=1)
    specs = loadgen.build_requests(cfg)
    assert specs == loadgen.build_requests(cfg)  # same seed, same workload
    assert {len(s.prompt.split()) for s in specs} <= set(range(20, 61))
    assert {s.max_tokens for s in specs} <= set(range(5, 16)) and len({s.max_tokens for s in specs}) > 5
    mixed = loadgen.build_requests(replace(cfg, stream_ratio=0.5, disconnect_prob=0.25))
    assert 60 < sum(s.stream for s in mixed) < 140
    assert 25 < sum(s.disconnect_after is not None for s in mixed) < 75
    ids = loadgen.build_requests(replace(cfg, prompt_format="token-ids", token_id_range=(5, 9), range_ratio=0.0))
    assert all(len(s.prompt) == 40 and set(s.prompt) <= {5, 6, 7, 8} for s in ids)

    data = tmp_path / "prompts.jsonl"
    data.write_text(
        json.dumps({"prompt": "a b c", "max_tokens": 3}) + "\n\n" + json.dumps({"prompt": [1, 2, 3, 4]}) + "\n"
    )
    got = loadgen.build_requests(LoadConfig(num_requests=5, dataset_path=str(data), output_len=9))
    assert [s.prompt for s in got] == ["a b c", [1, 2, 3, 4], "a b c", [1, 2, 3, 4], "a b c"]
    assert [s.max_tokens for s in got] == [3, 9, 3, 9, 3]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi there"}], "output_len": 4}) + "\n")
    got = loadgen.build_requests(LoadConfig(num_requests=2, dataset_path=str(chat), endpoint="/v1/chat/completions"))
    assert got[0].messages[0]["content"] == "hi there" and got[0].max_tokens == 4
    with pytest.raises(ValueError):
        loadgen.build_requests(LoadConfig(num_requests=2, dataset_path=str(chat)))  # chat rows need chat endpoint


def test_sse_decoder():
    lines = [
        ": ping",
        "",
        'data: {"a": 1}',
        "",
        "event: message",
        'data:{"b":',
        "data: 2}",
        "",
        "",
        "id: 7",
        "data: [DONE]",
    ]
    assert list(SSEDecoder().events(lines)) == ['{"a": 1}', '{"b":\n2}', "[DONE]"]
    d = SSEDecoder()
    assert d.feed("data: x\r") is None and d.feed("\r") == "x"


def test_summary_fields_and_percentiles():
    def ok(ttft, itl, latency, out, inp=10):
        return RequestResult(
            success=True,
            ttft=ttft,
            itl=itl,
            latency=latency,
            output_tokens=out,
            prompt_tokens=inp,
            expert_activations=out * 4,
            avg_experts_per_token=2.0,
        )

    results = [
        ok(0.1, [0.02, 0.02], 0.5, 5),
        ok(0.3, [0.04], 0.9, 3),
        ok(0.2, [], 0.2, 1),
        RequestResult(error="HTTP 500: boom"),
        RequestResult(error="HTTP 500: boom"),
        RequestResult(disconnected=True),
        RequestResult(cancelled=True),
    ]
    s = loadgen.summarize(RunOutput(results, duration=2.0, not_sent=4))
    assert (s["completed"], s["failed"], s["disconnected"], s["incomplete"], s["not_sent"]) == (3, 2, 1, 1, 4)
    assert s["errors"] == {"HTTP 500: boom": 2}
    assert s["total_output_tokens"] == 9 and s["total_input_tokens"] == 30
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(4.5)
    assert s["total_token_throughput"] == pytest.approx(19.5)
    assert s["mean_ttft_ms"] == pytest.approx(200.0) and s["median_ttft_ms"] == pytest.approx(200.0)
    assert s["p99_ttft_ms"] == pytest.approx(298.0)
    assert s["p90_e2el_ms"] == pytest.approx(820.0)
    # TPOT excludes the first token and requests with a single token: (0.5-0.1)/4, (0.9-0.3)/2
    assert s["mean_tpot_ms"] == pytest.approx((100.0 + 300.0) / 2)
    assert s["median_itl_ms"] == pytest.approx(20.0) and s["mean_itl_ms"] == pytest.approx(80 / 3)
    assert s["avg_experts_per_token"] == pytest.approx(2.0) and s["expert_activations"] == 36
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            assert f"{stat}_{name}_ms" in s


# ------------------------------------------------------------------------------- fake server
def test_streaming_timings_from_fake_server(fake):
    url, _ = fake
    for endpoint in ("/v1/completions", "/v1/chat/completions"):
        cfg = LoadConfig(base_url=url, endpoint=endpoint, num_requests=4, concurrency=4, max_duration=20)
        s = loadgen.summarize(_run(cfg))
        assert s["completed"] == 4 and s["failed"] == 0
        assert s["total_output_tokens"] == 4 * FAKE_TOKENS and s["total_input_tokens"] == 4 * 7  # from usage
        assert FAKE_TTFT * 1000 <= s["median_ttft_ms"] < FAKE_TTFT * 1000 + 150
        assert FAKE_ITL * 1000 * 0.9 <= s["median_itl_ms"] < FAKE_ITL * 1000 + 40
        assert s["median_tpot_ms"] == pytest.approx(s["mean_itl_ms"], rel=0.25)
        assert s["median_e2el_ms"] >= (FAKE_TTFT + (FAKE_TOKENS - 1) * FAKE_ITL) * 1000
        assert s["avg_experts_per_token"] == pytest.approx(1.25)


def test_request_body_carries_routing_and_stream_options(fake):
    url, state = fake
    state.bodies.clear()
    cfg = LoadConfig(
        base_url=url,
        num_requests=2,
        concurrency=1,
        routing={"policy": "top_p", "p": 0.5},
        output_len=7,
        extra_body={"seed": 3},
    )
    _run(cfg)
    assert len(state.bodies) == 2
    for b in state.bodies:
        assert b["routing"] == {"policy": "top_p", "p": 0.5} and b["max_tokens"] == 7 and b["seed"] == 3
        assert b["stream"] is True and b["stream_options"] == {"include_usage": True}
        assert b["ignore_eos"] is True and b["model"] == FAKE_MODEL


def test_errors_are_counted_not_raised(fake):
    url, _ = fake
    cfg = LoadConfig(base_url=url, num_requests=6, concurrency=6, max_duration=20)
    prompts = ["fail now", "midfail x", "nodone x", "ok", "ok", "fail again"]
    s = loadgen.summarize(_run(cfg, prompts))
    assert s["completed"] == 2 and s["failed"] == 4
    assert s["errors"] == {
        "HTTP 500: boom": 2,
        "stream error: engine died": 1,
        "stream ended without [DONE]": 1,
    }
    refused = loadgen.summarize(_run(replace(cfg, base_url=f"http://127.0.0.1:{free_port()}", model="m")))
    assert refused["failed"] == 6 and all(k.startswith("ConnectError") for k in refused["errors"])


def test_non_streaming_requests(fake):
    url, _ = fake
    cfg = LoadConfig(base_url=url, endpoint="/v1/chat/completions", num_requests=3, concurrency=3, stream_ratio=0.0)
    run = _run(cfg)
    assert all(r.success and not r.stream and r.ttft is None and r.text == "hello" for r in run.results)
    s = loadgen.summarize(run)
    assert s["completed"] == 3 and s["num_streaming"] == 0 and s["total_output_tokens"] == 3 * FAKE_TOKENS
    assert s["median_e2el_ms"] >= FAKE_TTFT * 1000 and s["mean_ttft_ms"] == 0.0


def test_closed_loop_keeps_concurrency(fake):
    url, state = fake
    state.max_in_flight = 0
    cfg = LoadConfig(base_url=url, num_requests=9, concurrency=3, max_duration=20)
    s = loadgen.summarize(_run(cfg))
    assert s["completed"] == 9 and state.max_in_flight == 3
    # 3 waves of 3 requests each, one after the other
    assert s["duration"] >= 3 * (FAKE_TTFT + (FAKE_TOKENS - 1) * FAKE_ITL)


def test_max_duration_bounds_the_run(fake):
    url, _ = fake
    slow = ["slow"] * 50
    for cfg, started in (
        (LoadConfig(base_url=url, num_requests=50, max_duration=1.0), 50),  # open loop, all at once
        (LoadConfig(base_url=url, num_requests=50, max_duration=1.0, concurrency=2), 2),  # closed loop
        (LoadConfig(base_url=url, num_requests=50, max_duration=1.0, request_rate=10.0), None),  # Poisson
    ):
        t0 = time.monotonic()
        run = _run(cfg, slow)
        assert time.monotonic() - t0 < 3.0
        s = loadgen.summarize(run)
        assert s["completed"] == 0 and s["failed"] == 0 and s["duration"] == pytest.approx(1.0, abs=0.3)
        if started is not None:
            assert s["incomplete"] == started and s["not_sent"] == 50 - started
        else:  # ~10 requests arrived within the second, the rest were never sent
            assert 2 <= s["incomplete"] <= 25 and s["incomplete"] + s["not_sent"] == 50


def test_disconnects_are_not_failures(fake):
    url, _ = fake
    cfg = LoadConfig(base_url=url, num_requests=4, concurrency=4, stream_ratio=0.5, max_duration=10)
    run = _run(cfg, ["slow"] * 4, disconnect_after=0.2)
    s = loadgen.summarize(run)
    assert s["disconnected"] == 4 and s["failed"] == 0 and s["completed"] == 0
    assert all(0.2 <= r.latency < 1.0 for r in run.results)


# ------------------------------------------------------------------------------- live dynserve
@pytest.fixture(scope="module")
def live(checkpoint_factory, tmp_path_factory):
    ckpt = str(checkpoint_factory("mixtral"))
    port = free_port()
    log = tmp_path_factory.mktemp("loadtests_server") / "server.log"
    args = [
        "--served-model-name",
        "tiny-moe",
        "--num-kv-blocks",
        "96",
        "--max-num-seqs",
        "4",
        "--log-level",
        "warning",
    ]
    server = ServerProcess(dynserve_command(ckpt, port, args), port, log, startup_timeout=240)
    try:
        server.start()
    except (RuntimeError, TimeoutError) as e:
        pytest.fail(f"dynserve did not start: {e}\n{server.log_tail()}")
    yield server
    assert server.stop() == 0, server.log_tail()  # graceful exit on SIGTERM


def test_loadgen_cli_against_dynserve(live, tmp_path):
    out = tmp_path / "result.json"
    rc = loadgen.main(
        [
            "--base-url",
            live.base_url + "/v1",
            "--num-requests",
            "8",
            "--concurrency",
            "4",
            "--input-len",
            "12",
            "--output-len",
            "10",
            "--max-duration",
            "60",
            "--result-file",
            str(out),
        ]
    )
    assert rc == 0
    s = json.loads(out.read_text())
    assert s["model"] == "tiny-moe" and s["completed"] == 8 and s["failed"] == 0
    assert s["total_output_tokens"] == 8 * 10  # ignore_eos: every request generates exactly max_tokens
    assert s["avg_experts_per_token"] == pytest.approx(2.0)  # the checkpoint's top-2
    assert s["mean_ttft_ms"] > 0 and s["mean_itl_ms"] > 0 and s["p99_e2el_ms"] >= s["median_e2el_ms"] > 0
    for key in (
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "duration",
        "median_ttft_ms",
        "p99_tpot_ms",
        "p90_itl_ms",
        "mean_e2el_ms",
    ):
        assert s[key] > 0


def test_chat_mixed_streaming_against_dynserve(live):
    cfg = LoadConfig(
        base_url=live.base_url,
        endpoint="/v1/chat/completions",
        num_requests=8,
        request_rate=20.0,
        concurrency=4,
        stream_ratio=0.5,
        input_len=10,
        output_len=6,
        range_ratio=0.5,
        max_duration=60,
    )
    specs = loadgen.build_requests(cfg)
    s = loadgen.summarize(asyncio.run(loadgen.run_requests(cfg, specs)))
    assert s["completed"] == 8 and s["failed"] == 0
    assert 0 < s["num_streaming"] < 8
    assert s["total_output_tokens"] == sum(sp.max_tokens for sp in specs)


def test_routing_sweep_against_dynserve(live):
    base = LoadConfig(
        base_url=live.base_url, num_requests=6, concurrency=3, input_len=12, output_len=8, max_duration=60
    )
    rows = asyncio.run(routing_sweep.run_sweep(base, routing_sweep.sweep_settings([0.2, 0.95])))
    by = {r["setting"]: r for r in rows}
    assert list(by) == ["top_k", "top_p=0.2", "top_p=0.95"]
    assert all(r["completed"] == 6 and r["failed"] == 0 for r in rows)
    assert by["top_k"]["avg_experts_per_token"] == pytest.approx(2.0)
    assert 1.0 <= by["top_p=0.2"]["avg_experts_per_token"] < 2.0 < by["top_p=0.95"]["avg_experts_per_token"] <= 4.0
    assert len({r["total_output_tokens"] for r in rows}) == 1  # the same load for every setting
    table = routing_sweep.format_table(rows)
    assert "top_p=0.95" in table and "experts/tok" in table


def test_soak_with_disconnects_returns_to_rest(live):
    before = scrape(live.base_url)
    load = LoadConfig(
        base_url=live.base_url,
        num_requests=5000,
        concurrency=4,
        stream_ratio=0.5,
        disconnect_prob=0.3,
        disconnect_max_delay=0.4,
        input_len=16,
        output_len=24,
        range_ratio=0.5,
        seed=11,
    )
    cfg = soak.SoakConfig(
        load=load,
        duration=8.0,
        settle_timeout=20.0,
        max_rss_growth_mb=200.0,
        warmup_requests=4,
        server_pid=live.pid,
        sample_interval=0.5,
    )
    r = asyncio.run(soak.run_soak(cfg))
    assert r["ok"], soak.format_report(r)
    checks = r["checks"]
    assert checks["kv_pool_full"]["free_blocks"] == checks["kv_pool_full"]["blocks"] == 96
    assert checks["no_running_requests"]["value"] == 0 and "rss_growth_bounded" in checks
    s = r["load"]
    assert s["completed"] > 10 and s["disconnected"] > 0 and s["failed"] == 0
    assert r["server_aborted_requests"] > 0  # the disconnects reached the engine as aborts
    after = scrape(live.base_url)
    assert after["dynserve_generation_tokens_total"] > before["dynserve_generation_tokens_total"]


def test_overload_table_and_plot(tmp_path):
    from loadtests import overload

    def mode(name: str, b: float, waiting: list[float]) -> dict:
        s = dict(request_throughput=2.0, output_throughput=120.0, median_ttft_ms=50.0, p99_ttft_ms=900.0)
        s.update(median_itl_ms=20.0, p99_itl_ms=80.0, avg_experts_per_token=1.5)
        samples = [{"t": 0.5 * i, "waiting": w, "running": 4.0, "budget": b} for i, w in enumerate(waiting)]
        return dict(mode=name, overload=s, unloaded={"p99_ttft_ms": 40.0}, samples=samples)

    results = [mode("static", 1.0, [0, 3, 9]), mode("auto", 0.6, [0, 2, 1])]
    lines = overload.table(results).splitlines()
    assert lines[2] == "| static | 2.00 | 120.0 | 50 / 900 (40) | 20 / 80 | 1.50 | 9 | 1.00 |"
    assert lines[3].endswith("| 2 | 0.60 |")
    png = overload.plot(results, tmp_path / "o.png")
    if png is not None:  # matplotlib installed
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_test_checkpoint_builds_and_serves_text(tmp_path, monkeypatch):
    """`python -m loadtests.checkpoints NAME --out DIR` writes a checkpoint dynserve loads, with the
    demo tokenizer (text prompts, text out) and the named expert layout (here shrunk for speed)."""
    from dynserve import LLM, SamplingParams
    from loadtests import checkpoints

    small = dict(checkpoints.SHAPES["olmoe-64x8"], hidden_size=32, intermediate_size=16, num_hidden_layers=2)
    monkeypatch.setitem(checkpoints.SHAPES, "olmoe-64x8", small)
    assert checkpoints.main(["olmoe-64x8", "--out", str(tmp_path / "ck")]) == 0
    llm = LLM(str(tmp_path / "ck"))
    out = llm.generate(["def main():"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].text
    assert out.expert_usage.avg_experts_per_token == 8.0  # top-8 of 64 experts


def test_token_id_prompts_time_tokens_by_their_ids(fake):
    """A model without a tokenizer streams no text; with token-id prompts the generator asks for
    `return_token_ids` and times the chunks that carry new ids (else TTFT and ITL would be empty)."""
    url, state = fake
    state.bodies.clear()
    cfg = LoadConfig(base_url=url, num_requests=2, concurrency=2, max_duration=20, prompt_format="token-ids")
    s = loadgen.summarize(_run(cfg))
    assert all(b["return_token_ids"] is True and isinstance(b["prompt"], list) for b in state.bodies)
    assert s["completed"] == 2 and s["total_output_tokens"] == 2 * FAKE_TOKENS
    assert FAKE_TTFT * 1000 <= s["median_ttft_ms"] < FAKE_TTFT * 1000 + 150
    assert FAKE_ITL * 1000 * 0.9 <= s["median_itl_ms"] < FAKE_ITL * 1000 + 40
