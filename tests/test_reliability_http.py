"""One request can never take the engine down (issue 12), over HTTP: the extremes of every numeric
request field (tiny, subnormal, huge, NaN, infinities, out-of-range integers) get a 4xx with OpenAI's
error body or a correct 200 whose tokens are inside the vocabulary, and the engine keeps serving.
Explicit regression cases first, then a deterministic (derandomised) property-based fuzz that mixes
several extreme fields in one request, so CI catches the class of bug in every test order."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynserve.config import EngineConfig
from dynserve.engine.async_engine import AsyncEngine
from dynserve.server.app import ServerSettings, build_app

MODEL = "tiny-moe"
# raw JSON number literals: Python's json also reads NaN / Infinity, which some clients send
EXTREMES = [
    "1e-300", "5e-324", "1e-46", "1e-39", "0", "-0.0", "1", "2", "1e30", "-1e30",
    "9223372036854775808", "-9223372036854775809", "18446744073709551616", "NaN", "Infinity", "-Infinity",
]  # fmt: skip
SAMPLING_FIELDS = [
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "max_tokens", "min_tokens", "n", "seed", "logprobs",
]  # fmt: skip
ROUTING_FIELDS = ["p", "threshold", "k", "min_experts", "max_experts"]


@pytest.fixture(scope="module")
def served(checkpoint_factory):
    cfg = EngineConfig.create(str(checkpoint_factory("mixtral")), max_model_len=48, num_kv_blocks=64, max_num_seqs=16)
    engine = AsyncEngine.from_config(cfg)
    client = TestClient(build_app(engine, ServerSettings(served_model_name=MODEL, api_key="")))
    yield engine, client
    engine.shutdown_sync(timeout=0)


def _body(fields: dict[str, str], chat: bool = False) -> str:
    """A request body with `fields` as raw JSON literals (routing.* fields go into `routing`)."""
    parts = ['"model": "tiny-moe"', '"max_tokens": 3'] if "max_tokens" not in fields else ['"model": "tiny-moe"']
    parts.append('"messages": [{"role": "user", "content": "hi"}]' if chat else '"prompt": "def f(x):"')
    routing = {k.split(".", 1)[1]: v for k, v in fields.items() if k.startswith("routing.")}
    parts += [f'"{k}": {v}' for k, v in fields.items() if not k.startswith("routing.")]
    if routing:
        inner = ", ".join(f'"{k}": {v}' for k, v in routing.items())
        parts.append(f'"routing": {{"policy": "top_p", {inner}}}')
    return "{" + ", ".join(parts) + "}"


def _check(client: TestClient, vocab: int, fields: dict[str, str], chat: bool = False) -> int:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = client.post(path, content=_body(fields, chat), headers={"content-type": "application/json"})
    assert r.status_code < 500, (fields, r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        return r.status_code
    body = r.json()
    if fields.get("max_tokens") != "0":  # 0 asks for the prompt alone
        assert body["usage"]["completion_tokens"] >= 1, body
    for choice in body["choices"]:
        assert choice["finish_reason"] in ("stop", "length")
        lp = choice.get("logprobs")
        if lp and "tokens" in lp:  # completions logprobs name the sampled tokens
            assert len(lp["tokens"]) == len(lp["token_logprobs"])
    return r.status_code


def _still_serving(engine: AsyncEngine, client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    r = client.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert engine.is_healthy


@pytest.mark.parametrize("field", SAMPLING_FIELDS + [f"routing.{f}" for f in ROUTING_FIELDS])
def test_every_extreme_value_of_a_numeric_field(served, field):
    engine, client = served
    vocab = engine.config.model.vocab_size
    statuses = {value: _check(client, vocab, {field: value}) for value in EXTREMES}
    if field in ("temperature", "top_p", "repetition_penalty", "routing.p"):
        assert statuses["1e-300"] == 200  # tiny but valid: served, with in-vocabulary tokens
    assert statuses["NaN"] == statuses["Infinity"] == 400
    _still_serving(engine, client)


def test_the_inputs_that_killed_the_engine(served):
    """Issue 12's reproducers, chat and completions, then normal service."""
    engine, client = served
    vocab = engine.config.model.vocab_size
    for fields in (
        {"top_p": "1e-300"},
        {"top_p": "1e-300", "max_tokens": "1"},
        {"top_p": "1e-46", "temperature": "2"},
        {"repetition_penalty": "5e-324"},
        {"repetition_penalty": "1e-39", "temperature": "0"},
        {"repetition_penalty": "1e30", "top_p": "0.5"},
    ):
        for chat in (False, True):
            assert _check(client, vocab, fields, chat) == 200
    r = client.post(
        "/v1/completions",
        json={"prompt": "def f(x):", "max_tokens": 1, "top_p": 1e-300, "logprobs": 1},
    )
    assert r.status_code == 200
    tok = r.json()["choices"][0]["logprobs"]["tokens"][0]
    assert tok  # a real token's text, not an empty id == vocab size
    _still_serving(engine, client)


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(
    fields=st.dictionaries(
        st.sampled_from(SAMPLING_FIELDS + [f"routing.{f}" for f in ROUTING_FIELDS]),
        st.sampled_from(EXTREMES),
        min_size=1,
        max_size=4,
    ),
    chat=st.booleans(),
)
def test_fuzzed_combinations_never_5xx(served, fields, chat):
    engine, client = served
    _check(client, engine.config.model.vocab_size, fields, chat)
    assert engine.is_healthy


def test_engine_serves_after_the_fuzz(served):
    engine, client = served
    _still_serving(engine, client)
    stats = engine.engine.get_stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total
    assert json.loads(json.dumps(client.get("/health").json())) == {"status": "ok"}


def test_stop_strings_and_stop_token_ids_are_bounded(served):
    """Every step checks each stop string and stop id of every running sequence: one request may not
    bring thousands of them (400 naming the field); the largest allowed request is served."""
    engine, client = served
    base = {"prompt": "def f(x):", "max_tokens": 3}
    for extra, param in (
        ({"stop": [f"s{i}" for i in range(65)]}, "stop"),
        ({"stop": "x" * 1025}, "stop"),
        ({"stop": ["ok", "y" * 1025]}, "stop"),
        ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ):
        r = client.post("/v1/completions", json={**base, **extra})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
    r = client.post(
        "/v1/completions",
        json={**base, "stop": [f"z{i}" * 100 for i in range(64)], "stop_token_ids": list(range(300, 1324))},
    )
    assert r.status_code == 200, r.text
    _still_serving(engine, client)
