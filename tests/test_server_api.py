"""The HTTP app in-process (fastapi TestClient over the ASGI app, real engine on a tiny checkpoint):
OpenAI error bodies and validation (400 with the field path in `param`), auth, unknown model,
SSE wire format, logprobs formats, tokenize/detokenize, /health, and /metrics deltas."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from dynserve.config import EngineConfig
from dynserve.engine.async_engine import AsyncEngine
from dynserve.engine.outputs import CompletionOutput, RequestOutput
from dynserve.engine.stats import EngineStats
from dynserve.server.app import ServerSettings, build_app
from dynserve.server.responses import ChatCompletionStreamResponse, CompletionStreamResponse

MODEL = "tiny-moe"
KEY = "sk-test-123"


@pytest.fixture(scope="module")
def engine(checkpoint_factory):
    cfg = EngineConfig.create(str(checkpoint_factory("mixtral")), num_kv_blocks=96, max_num_seqs=8)
    eng = AsyncEngine.from_config(cfg)
    yield eng
    eng.shutdown_sync(timeout=0)


@pytest.fixture(scope="module")
def client(engine):
    app = build_app(engine, ServerSettings(served_model_name=MODEL, api_key=""))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def auth_client(engine):
    app = build_app(engine, ServerSettings(served_model_name=MODEL, api_key=KEY))
    return TestClient(app, raise_server_exceptions=False)


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    return err


def _events(r) -> list:
    """Parse an SSE body strictly: every event is `data: <json>` or the final `data: [DONE]`."""
    assert r.headers["content-type"].startswith("text/event-stream")
    text = r.text
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


def _scrape(c) -> dict[str, float]:
    r = c.get("/metrics")
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


# ------------------------------------------------------------------------------- validation
COMPLETION_BAD = [
    ({"prompt": "x", "top_k": 1.5}, "top_k"),
    ({"prompt": "x", "top_k": 2.0}, "top_k"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "temperature": "1"}, "temperature"),
    ({"prompt": "x", "temperature": True}, "temperature"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 129}, "n"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty"),
    ({"prompt": "x", "min_p": 1.5}, "min_p"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "seed": "7"}, "seed"),
    ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": "x", "stop": ""}, "stop"),
    ({"prompt": "x", "stop_token_ids": [1.5]}, "stop_token_ids[0]"),
    ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ({"prompt": "x", "suffix": "tail"}, "suffix"),
    ({"prompt": "x", "echo": True, "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "logit_bias": {"5": 10}}, "logit_bias"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"prompt": "x", "min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": [10**7]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "routing": {"policy": "bogus"}}, "routing.policy"),
    ({"prompt": "x", "routing": {"p": 0}}, "routing.p"),
    ({"prompt": "x", "routing": {"p": 1.5}}, "routing.p"),
    ({"prompt": "x", "routing": {"threshold": -0.1}}, "routing.threshold"),
    ({"prompt": "x", "routing": {"k": 1.0}}, "routing.k"),
    ({"prompt": "x", "routing": {"k": 0}}, "routing.k"),
    ({"prompt": "x", "routing": {"min_experts": -1}}, "routing.min_experts"),
    ({"prompt": "x", "routing": {"min_experts": 3, "max_experts": 2}}, "routing.max_experts"),
    ({"prompt": "x", "routing": {"bogus": 1}}, "routing.bogus"),
    ({"prompt": "x", "routing": "top_p"}, "routing"),
]


@pytest.mark.parametrize("body,param", COMPLETION_BAD)
def test_completion_validation_is_400_naming_the_field(client, body, param):
    err = _error(client.post("/v1/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err


CHAT_BAD = [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content",
    ),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 600}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "routing": {"max_experts": 0}}, "routing.max_experts"),
]


@pytest.mark.parametrize("body,param", CHAT_BAD)
def test_chat_validation_is_400_naming_the_field(client, body, param):
    err = _error(client.post("/v1/chat/completions", json=body), 400)
    assert err["param"] == param, err


def test_context_length_error_wording(client):
    err = _error(client.post("/v1/completions", json={"prompt": [5] * 500, "max_tokens": 20}), 400)
    assert err["code"] == "context_length_exceeded"
    assert err["message"].startswith(
        "This model's maximum context length is 512 tokens. However, you requested 520 tokens "
        "(500 in the messages, 20 in the completion)."
    )


@pytest.mark.parametrize(
    "content,headers",
    [
        (b"{not json", {"content-type": "application/json"}),
        (b"\xff\xfe\x00garbage", {"content-type": "application/json"}),
        (b"", {"content-type": "application/json"}),
        (b"[1, 2]", {"content-type": "application/json"}),
        (b'"just a string"', {"content-type": "application/json"}),
    ],
)
def test_malformed_bodies_are_400(client, content, headers):
    for path in ("/v1/completions", "/v1/chat/completions"):
        err = _error(client.post(path, content=content, headers=headers), 400)
        assert err["type"] == "invalid_request_error"


def test_json_without_content_type_is_accepted(client):
    r = client.post("/v1/completions", content=b'{"prompt": "x = 1", "max_tokens": 2}')
    assert r.status_code == 200, r.text
    # a form content type (curl -d without -H) is not parsed, and the error says what to do
    err = _error(
        client.post(
            "/v1/completions", content=b'{"prompt": "x"}', headers={"content-type": "application/x-www-form-urlencoded"}
        ),
        400,
    )
    assert "Content-Type: application/json" in err["message"]


def test_unknown_model_is_404(client):
    for path, body in (
        ("/v1/completions", {"model": "gpt-9", "prompt": "x"}),
        ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
    ):
        err = _error(client.post(path, json=body), 404)
        assert err == {
            "message": "The model `gpt-9` does not exist.",
            "type": "not_found_error",
            "param": "model",
            "code": "model_not_found",
        }
    _error(client.get("/v1/models/gpt-9"), 404)
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL


def test_unknown_route_and_method_use_openai_errors(client):
    assert _error(client.get("/v1/nothing"), 404)["type"] == "not_found_error"
    _error(client.get("/v1/completions"), 405)


GUARDED = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"prompt": "{"}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ("POST", "/tokenize", {"prompt": "x"}),
    ("POST", "/detokenize", {"tokens": [5]}),
    ("GET", "/v1/nothing", None),
]
DOCS = ["/docs", "/redoc", "/openapi.json"]
PROBES = ["/health", "/metrics", "/version"]


def test_api_key_guards_every_route_that_does_work(auth_client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path, body in GUARDED:
            err = _error(auth_client.request(method, path, json=body, headers=headers), 401)
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key", path
        for path in DOCS:  # the docs describe the API: they need the key unless --public-docs
            _error(auth_client.get(path, headers=headers), 401)
    ok = auth_client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL
    r = auth_client.post("/tokenize", json={"prompt": "x = 1"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["count"] >= 1
    assert auth_client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    for path in PROBES:  # probes and scrapers need no key
        assert auth_client.get(path).status_code == 200, path


def test_public_docs_opens_the_docs_only(engine):
    c = TestClient(build_app(engine, ServerSettings(served_model_name=MODEL, api_key=KEY, public_docs=True)))
    for path in DOCS:
        assert c.get(path).status_code == 200, path
    assert "/v1/completions" in c.get("/openapi.json").json()["paths"]
    for method, path, body in GUARDED:
        _error(c.request(method, path, json=body), 401)


# ------------------------------------------------------------------------------- lone surrogates
def _raw(body: str) -> bytes:
    """A JSON body written by hand: `\\ud800` stays a JSON escape (no client library sends it otherwise)."""
    return body.encode()


SURROGATE_BODIES = [
    ("/v1/completions", r'{"prompt": "a\ud800b"}'),
    ("/v1/completions", r'{"prompt": ["ok", "\udc00"]}'),
    ("/v1/completions", r'{"prompt": "x", "model": "\ud800"}'),
    ("/v1/completions", r'{"prompt": "x", "stop": ["\ud83d"]}'),
    ("/v1/completions", r'{"prompt": "x", "user": "\udfff"}'),
    ("/v1/completions", r'{"prompt": "x", "routing": {"policy": "\ud800"}}'),
    ("/v1/completions", r'{"prompt": "x", "\ud800": 1}'),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "hi \ud800"}]}'),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}'),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "x", "name": "\ud800"}]}'),
    ("/v1/chat/completions", r'{"messages": [{"role": "\ud800", "content": "x"}]}'),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "x"}], "stop": "\ud800"}'),
    ("/tokenize", r'{"prompt": "\ud800"}'),
    ("/tokenize", r'{"messages": [{"role": "user", "content": "\ud800"}]}'),
    ("/detokenize", r'{"tokens": [5], "model": "\ud800"}'),
]


@pytest.mark.parametrize("path,body", SURROGATE_BODIES)
def test_lone_surrogate_anywhere_is_a_400(client, path, body):
    err = _error(client.post(path, content=_raw(body), headers={"content-type": "application/json"}), 400)
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json"
    assert "surrogate" in err["message"]


def test_valid_surrogate_pair_and_invalid_utf8(client):
    # an escaped pair is one valid character (U+1F600) and is served
    r = client.post("/tokenize", content=_raw(r'{"prompt": "\ud83d\ude00"}'))
    emoji = client.post("/tokenize", json={"prompt": "\U0001f600"}).json()
    assert r.status_code == 200 and r.json()["tokens"] == emoji["tokens"]
    err = _error(client.post("/v1/completions", content=b'{"prompt": "\xed\xa0\x80"}'), 400)  # UTF-8 of U+D800
    assert err["code"] == "invalid_json"


def test_error_bodies_always_encode():
    from dynserve.server.app import ApiError

    err = ApiError(404, "The model `\ud800` does not exist.", "not_found_error", param="m\udc00")
    body = json.loads(err.response().body)
    assert body["error"]["message"] == "The model `\\ud800` does not exist." and body["error"]["param"] == "m\\udc00"


# ------------------------------------------------------------------------------- info routes
def test_models_health_version(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == MODEL and card["owned_by"] == "dynserve" and card["object"] == "model"
    assert card["max_model_len"] == 512
    assert client.get("/health").status_code == 200
    import dynserve

    assert client.get("/version").json() == {"version": dynserve.__version__}


def test_tokenize_detokenize_roundtrip(client, engine):
    r = client.post("/tokenize", json={"prompt": "def hello(name):"})
    body = r.json()
    assert body["tokens"] == engine.tokenizer.encode("def hello(name):")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 512
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "def hello(name):"}
    msgs = [{"role": "user", "content": "hi"}]
    chat = client.post("/tokenize", json={"messages": msgs}).json()
    text = engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert chat["tokens"] == engine.tokenizer.encode(text, add_special_tokens=False)
    _error(client.post("/tokenize", json={}), 400)
    _error(client.post("/tokenize", json={"prompt": "x", "messages": msgs}), 400)
    assert _error(client.post("/detokenize", json={"tokens": [10**7]}), 400)["param"] == "tokens"
    assert _error(client.post("/detokenize", json={"tokens": ["a"]}), 400)["param"] == "tokens[0]"


# ------------------------------------------------------------------------------- generation
def test_completion_json_shape_and_echo_and_batch(client):
    r = client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": ["x = 1", "import os"],
            "n": 2,
            "max_tokens": 4,
            "temperature": 0,
            "echo": True,
            "ignore_eos": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL and body["id"].startswith("cmpl-")
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2, 3]
    for c in body["choices"]:
        assert c["text"].startswith("x = 1" if c["index"] < 2 else "import os")
        assert c["finish_reason"] == "length"
    u = body["usage"]
    assert u["completion_tokens"] == 16 and u["total_tokens"] == u["prompt_tokens"] + 16
    assert u["expert_activations"] > 0 and 0 < u["avg_experts_per_token"] <= 4


def test_token_id_prompts(client, engine):
    ids = engine.tokenizer.encode("import os")
    a = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 5, "temperature": 0}).json()
    b = client.post("/v1/completions", json={"prompt": [ids], "max_tokens": 5, "temperature": 0}).json()
    c = client.post("/v1/completions", json={"prompt": "import os", "max_tokens": 5, "temperature": 0}).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"] == c["choices"][0]["text"]
    assert a["usage"]["prompt_tokens"] == len(ids)


def test_chat_stream_wire_format(client):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "n": 2,
    }
    chunks = _events(client.post("/v1/chat/completions", json=body))
    assert all("usage" not in ch for ch in chunks)  # no usage chunk (or key) unless asked for
    assert len({(ch["id"], ch["created"], ch["model"]) for ch in chunks}) == 1
    for ch in chunks:
        ChatCompletionStreamResponse.model_validate(ch)
        assert ch["object"] == "chat.completion.chunk" and len(ch["choices"]) == 1
    for i in range(2):
        mine = [ch["choices"][0] for ch in chunks if ch["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [c["finish_reason"] for c in mine[:-1]] == [None] * (len(mine) - 1)
        assert mine[-1]["finish_reason"] in ("stop", "length")
    # the streamed text equals the non-streamed text
    full = client.post("/v1/chat/completions", json={**body, "stream": False, "n": 1}).json()
    streamed = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"][0]["index"] == 0)
    assert streamed == full["choices"][0]["message"]["content"]


def test_stream_usage_chunk_only_when_asked(client):
    body = {
        "prompt": "x = 1",
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    chunks = _events(client.post("/v1/completions", json=body))
    *rest, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
    assert last["usage"]["expert_activations"] > 0 and last["usage"]["avg_experts_per_token"] > 0
    assert all(ch["choices"] and ch["usage"] is None for ch in rest)
    for ch in chunks:
        CompletionStreamResponse.model_validate(ch)
    assert rest[-1]["choices"][0]["finish_reason"] == "length"
    chunks = _events(client.post("/v1/completions", json={**body, "stream_options": {"include_usage": False}}))
    assert all(ch["choices"] for ch in chunks)


def test_logprobs_formats(client):
    r = client.post(
        "/v1/completions",
        json={"prompt": "x = 1", "max_tokens": 4, "logprobs": 2, "temperature": 0, "ignore_eos": True},
    ).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    for chosen, tops in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert chosen <= 0 and 2 <= len(tops) <= 3
        assert chosen >= max(tops.values()) - 1e-4  # greedy picks the most likely token
    r = client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "logprobs": True,
            "top_logprobs": 3,
            "temperature": 0,
            "ignore_eos": True,
        },
    ).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] == 4
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        if item["token"].startswith("bytes:"):  # part of a UTF-8 character: raw bytes, written as \xNN
            assert item["token"] == "bytes:" + "".join(f"\\x{b:02x}" for b in item["bytes"])
        else:
            assert item["bytes"] == list(item["token"].encode())
        tops = [t["logprob"] for t in item["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert item["logprob"] >= tops[0] - 1e-4


def test_metrics_move_by_the_traffic(client, engine):
    before = _scrape(client)
    r = client.post("/v1/completions", json={"prompt": "import os", "max_tokens": 7, "ignore_eos": True}).json()
    after = _scrape(client)

    def d(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    u = r["usage"]
    assert d("dynserve_generation_tokens_total") == u["completion_tokens"] == 7
    assert d("dynserve_prompt_tokens_total") == u["prompt_tokens"]
    assert d("dynserve_expert_activations_total") == u["expert_activations"]
    assert d("dynserve_request_success_total{finished_reason=length}") == 1
    assert d("dynserve_e2e_request_latency_seconds_count") == 1
    assert d("dynserve_time_to_first_token_seconds_count") == 1
    assert d("dynserve_request_queue_time_seconds_count") == 1
    assert d("dynserve_inter_token_latency_seconds_count") == 6
    assert d("vllm:prefix_cache_queries_total{model_name=tiny-moe}") == d("dynserve_prefix_cache_queries_total")
    # experts-per-token histogram: one series per MoE layer, buckets le=0..E, sum/count consistent
    stats = engine.get_stats()
    for layer in range(stats.num_moe_layers):
        buckets = [
            after[f"dynserve_experts_per_token_bucket{{layer={layer},le={float(k)}}}"]
            for k in range(stats.num_experts + 1)
        ]
        assert buckets == sorted(buckets)
        assert after[f"dynserve_experts_per_token_count{{layer={layer}}}"] == buckets[-1] > 0
    total = sum(after[f"dynserve_experts_per_token_sum{{layer={layer}}}"] for layer in range(stats.num_moe_layers))
    assert total == after["dynserve_expert_activations_total"]
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
    ):
        assert f"{name}{{model_name={MODEL}}}" in after
    assert 0.0 <= after["dynserve_kv_cache_usage_ratio"] <= 1.0


def test_backpressure_is_503_with_retry_after_while_health_ok(client, engine):
    old = engine.max_queued_requests
    engine.max_queued_requests = 0  # nothing may wait: every new request is refused
    try:
        err = _error(r := client.post("/v1/completions", json={"prompt": "x"}), 503)
        assert int(r.headers["retry-after"]) >= 1 and err["type"] == "server_error"
        err = _error(
            client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": True}),
            503,
        )
        assert client.get("/health").status_code == 200
    finally:
        engine.max_queued_requests = old
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


class _DeadEngine:
    """An engine whose step() raises: the AsyncEngine loop thread dies on the first request."""

    def __init__(self, real) -> None:
        self.config, self.tokenizer, self.added = real.config, real.tokenizer, []
        self.num_steps = 0

    def add_request(self, request_id, *a, **k):
        self.added.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.added)

    def step(self):
        raise RuntimeError("simulated device failure")

    def abort_request(self, ids):
        pass

    def get_stats(self):
        return EngineStats()


def test_dead_engine_health_503_and_errors(engine):
    dead = AsyncEngine(_DeadEngine(engine.engine))
    c = TestClient(build_app(dead, ServerSettings(served_model_name=MODEL, api_key="")), raise_server_exceptions=False)
    assert c.get("/health").status_code == 200
    err = _error(c.post("/v1/completions", json={"prompt": "x"}), 500)
    assert err["type"] == "server_error"
    assert _error(c.get("/health"), 503)["type"] == "server_error"
    assert _error(c.post("/v1/completions", json={"prompt": "x"}), 500)["code"] == "engine_dead"


class _ScriptedEngine(_DeadEngine):
    """Emits one token per request, then either an engine-side abort or a crash."""

    def __init__(self, real, then: str) -> None:
        super().__init__(real)
        self.then, self.steps = then, 0

    def step(self):
        self.steps += 1
        if self.steps == 1:
            return [
                RequestOutput(rid, None, [1], [CompletionOutput(0, "a", [5], text_delta="a", token_ids_delta=[5])])
                for rid in self.added
            ]
        if self.then == "crash":
            raise RuntimeError("simulated crash mid-stream")
        outs = [
            RequestOutput(rid, None, [1], [CompletionOutput(0, "a", [5], finish_reason="abort")], finished=True)
            for rid in self.added
        ]
        self.added = []
        return outs


@pytest.mark.parametrize("then,code", [("abort", "request_aborted"), ("crash", "engine_dead")])
def test_error_after_stream_began_is_an_sse_error_event(engine, then, code):
    scripted = AsyncEngine(_ScriptedEngine(engine.engine, then))
    c = TestClient(
        build_app(scripted, ServerSettings(served_model_name=MODEL, api_key="")), raise_server_exceptions=False
    )
    try:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": True})
        assert r.status_code == 200
        events = _events(r)
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert events[1]["choices"][0]["delta"] == {"content": "a"}
        assert set(events[2]) == {"error"} and events[2]["error"]["code"] == code
        assert len(events) == 3  # never a finish_reason "abort"
    finally:
        scripted.shutdown_sync(timeout=0)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_stream_n2_each_choice_finishes_exactly_once(client, engine, route):
    # a third of the vocabulary stops generation, so the two sampled choices end at different steps
    stops = list(range(10, engine.tokenizer.vocab_size, 3))
    body = {
        "model": MODEL,
        "max_tokens": 16,
        "temperature": 1.0,
        "seed": 7,
        "n": 2,
        "stream": True,
        "stop_token_ids": stops,
    }
    body.update(
        {"prompt": "import os"} if "chat" not in route else {"messages": [{"role": "user", "content": "hello"}]}
    )
    chunks = _events(client.post(route, json=body))
    ends = [(pos, ch["choices"][0]["index"]) for pos, ch in enumerate(chunks) if ch["choices"][0]["finish_reason"]]
    assert sorted(i for _, i in ends) == [0, 1]  # each choice finishes once, never repeated
    assert ends[0][0] != ends[1][0]


# ------------------------------------------------------------------------------- bounded inputs
def test_body_over_the_limit_is_413_before_parsing(engine):
    c = TestClient(build_app(engine, ServerSettings(served_model_name=MODEL, api_key="", max_request_bytes=4096)))
    head = b'{"prompt": "'
    at_limit = head + b"x" * (4096 - len(head) - 2) + b'"}'  # exactly 4096 bytes: accepted
    r = c.post("/tokenize", content=at_limit)
    assert len(at_limit) == 4096 and r.status_code == 200 and r.json()["count"] > 0, r.text
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        err = _error(c.post(path, content=at_limit + b" "), 413)
        assert err == {
            "message": "The request body (4097 bytes) is larger than this server accepts (4096 bytes).",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }


def test_prompts_per_request_cap(engine):
    c = TestClient(build_app(engine, ServerSettings(served_model_name=MODEL, api_key="", max_prompts_per_request=2)))
    ok = c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
    for prompt in (["a", "b", "c"], [[5], [6], [7]]):
        err = _error(c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}), 400)
        assert err["param"] == "prompt" and "at most 2 prompts" in err["message"]
    # one prompt of many token ids is one prompt
    assert c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 1}).status_code == 200


def test_more_prompts_than_the_queue_holds_is_400_not_a_retry(client, engine):
    old = engine.max_queued_requests
    engine.max_queued_requests = 2
    try:
        err = _error(client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 1}), 400)
        assert err["param"] == "prompt" and "more than the server queues at once (2)" in err["message"]
        assert client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1}).status_code == 200
    finally:
        engine.max_queued_requests = old


def test_text_far_longer_than_the_context_is_rejected_without_tokenizing(client, engine):
    tok = engine.tokenizer
    # ~1 MiB of text: tokenising it would take about a second here; the byte count alone rules it out
    text = "def hello(name):\n    return 'hello ' + name\n" * 24_000
    assert tok.min_num_tokens(text) >= 512
    for path, body in (
        ("/v1/completions", {"prompt": text}),
        ("/v1/completions", {"prompt": ["x = 1", text]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}),
    ):
        t0 = time.perf_counter()
        err = _error(client.post(path, json=body), 400)
        elapsed = time.perf_counter() - t0
        assert err["code"] == "context_length_exceeded" and err["param"] == ("messages" if "chat" in path else "prompt")
        assert err["message"].startswith("This model's maximum context length is 512 tokens. However, your prompt is")
        assert elapsed < 0.5, elapsed
    # just over the context after tokenising: the exact count, in the engine's words
    err = _error(client.post("/v1/completions", json={"prompt": "import os\n" * 300}), 400)
    assert err["code"] == "context_length_exceeded" and "However, you requested" in err["message"]
