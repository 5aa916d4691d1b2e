"""Routed experts per request (`return_routed_experts`), through the HTTP app in-process (TestClient over
the ASGI app, real engine on a tiny Mixtral checkpoint routed top_p, so rows are ragged): completions
and chat, streamed and not, consistent with usage, null rows for prefix-cached positions, the base64
CSR form, start_len, validation; and the row bookkeeping (`RoutedExpertsBuilder`) on its own."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from dynserve.config import EngineConfig, RoutingConfig
from dynserve.engine.async_engine import AsyncEngine
from dynserve.routing.base import Assignment
from dynserve.routing.routed import RoutedExpertsBuilder, RoutedStep, expert_token_counts
from dynserve.server.app import ServerSettings, build_app
from dynserve.server.routed_experts import decode_csr

NUM_EXPERTS = 4  # tests/checkpoints.py: tiny Mixtral, 2 MoE layers of 4 experts


@pytest.fixture(scope="module")
def engine(checkpoint_factory):
    cfg = EngineConfig.create(
        str(checkpoint_factory("mixtral")),
        num_kv_blocks=96,
        max_num_seqs=8,
        routing=RoutingConfig(policy="top_p", p=0.6),
    )
    eng = AsyncEngine.from_config(cfg)
    yield eng
    eng.shutdown_sync(timeout=0)


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(build_app(engine, ServerSettings(api_key="")), raise_server_exceptions=False)


def _events(r) -> list[dict]:
    assert r.status_code == 200, r.text
    blocks = r.text.split("\n\n")[:-1]
    assert blocks[-1] == "data: [DONE]"
    return [json.loads(b[len("data: ") :]) for b in blocks[:-1]]


def _activations(rows: list) -> int:
    return sum(len(ids) for row in rows if row is not None for ids in row)


def _check_rows(rows: list, num_tokens: int) -> None:
    assert len(rows) == num_tokens
    for row in rows:
        if row is not None:
            assert len(row) == 2  # one entry per MoE layer
            for ids in row:
                assert len(set(ids)) == len(ids) and all(0 <= e < NUM_EXPERTS for e in ids)


PROMPT = "the quick brown fox jumps over the lazy dog"


def test_completion_rows_are_ragged_and_match_usage(client):
    body = {"prompt": PROMPT + " once", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = client.post("/v1/completions", json={**body, "return_routed_experts": True})
    assert r.status_code == 200, r.text
    out = r.json()
    prompt_rows, gen_rows = out["prompt_routed_experts"], out["choices"][0]["routed_experts"]
    _check_rows(prompt_rows, out["usage"]["prompt_tokens"])
    _check_rows(gen_rows, 6)
    assert gen_rows[-1] is None  # the last token was never fed through the model
    assert None not in prompt_rows and None not in gen_rows[:-1]
    # ragged: top_p routes different tokens to different numbers of experts
    assert len({len(ids) for row in prompt_rows + gen_rows[:-1] for ids in row}) > 1
    assert _activations(prompt_rows) + _activations(gen_rows) == out["usage"]["expert_activations"]
    # nothing extra without the flag
    plain = client.post("/v1/completions", json=body).json()
    assert "prompt_routed_experts" not in plain and "routed_experts" not in plain["choices"][0]
    assert plain["choices"][0]["text"] == out["choices"][0]["text"]


def test_cached_prompt_positions_are_null(client):
    body = {"prompt": PROMPT * 3, "max_tokens": 2, "temperature": 0, "return_routed_experts": True}
    first = client.post("/v1/completions", json=body).json()
    second = client.post("/v1/completions", json=body).json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0
    rows = second["prompt_routed_experts"]
    assert rows[:cached] == [None] * cached and None not in rows[cached:]
    assert rows[cached:] == first["prompt_routed_experts"][cached:]  # same routing where recomputed
    gen = second["choices"][0]["routed_experts"]
    assert _activations(rows) + _activations(gen) == second["usage"]["expert_activations"]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_rows_concatenate_to_the_full_response(client, route):
    body = {"max_tokens": 5, "temperature": 0, "ignore_eos": True, "return_routed_experts": True}
    if route == "/v1/completions":
        body["prompt"] = PROMPT + " streamed"
    else:
        body["messages"] = [{"role": "user", "content": PROMPT + " chat"}]
    full = client.post(route, json=body).json()
    chunks = _events(client.post(route, json={**body, "stream": True}))
    streamed = [row for ch in chunks for c in ch["choices"] if "routed_experts" in c for row in c["routed_experts"]]
    assert streamed == full["choices"][0]["routed_experts"]
    prompt_chunks = [ch["prompt_routed_experts"] for ch in chunks if "prompt_routed_experts" in ch]
    assert len(prompt_chunks) == 1  # sent once; the second request found the prompt in the prefix cache
    (streamed_prompt,) = prompt_chunks
    assert len(streamed_prompt) == len(full["prompt_routed_experts"]) and streamed_prompt[-1] is not None
    assert all(a is None or a == b for a, b in zip(streamed_prompt, full["prompt_routed_experts"], strict=True))
    _check_rows(streamed, 5)


def test_base64_csr_round_trip_and_start_len(client):
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        "return_routed_experts": True,
    }
    plain = client.post("/v1/chat/completions", json=body).json()
    b64 = client.post(
        "/v1/chat/completions", json={**body, "routed_experts_format": "base64", "routed_experts_start_len": 3}
    ).json()
    csr = b64["choices"][0]["routed_experts"]
    assert csr["format"] == "csr" and csr["dtypes"]["expert_ids"] == "int32" and csr["num_layers"] == 2
    ids, weights = decode_csr(csr)
    assert ids == plain["choices"][0]["routed_experts"]
    for row_ids, row_w in zip(ids, weights, strict=True):
        if row_ids is not None:
            for e, w in zip(row_ids, row_w, strict=True):
                assert len(e) == len(w) and all(0.0 < x <= 1.0 for x in w)
    prompt_ids, _ = decode_csr(b64["prompt_routed_experts"])
    n_cached = b64["usage"]["prompt_tokens_details"]["cached_tokens"]
    tail = plain["prompt_routed_experts"][3:]
    assert len(prompt_ids) == len(tail) == b64["usage"]["prompt_tokens"] - 3
    assert prompt_ids[max(0, n_cached - 3) :] == tail[max(0, n_cached - 3) :]


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"return_routed_experts": "yes"}, "return_routed_experts"),
        ({"return_routed_experts": True, "routed_experts_start_len": -1}, "routed_experts_start_len"),
        ({"return_routed_experts": True, "routed_experts_start_len": 1.5}, "routed_experts_start_len"),
        ({"return_routed_experts": True, "routed_experts_format": "xml"}, "routed_experts_format"),
        ({"routed_experts_format": "base64"}, "routed_experts_format"),
    ],
)
def test_routed_experts_validation_is_400(client, extra, param):
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_builder_keeps_each_position_once_and_fills_gaps():
    a = Assignment.from_mask(torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool), torch.rand(3, 3))
    step = RoutedStep.gather([a, Assignment.from_topk(torch.tensor([[2], [1], [0]]), torch.rand(3, 1), 3)], 3)
    assert step.rows(0, 3).tolist() == [[[0, 2], [2]], [[], [1]], [[0, 1, 2], [0]]]
    assert expert_token_counts([a], 3).tolist() == [[2, 1, 2]]
    b = RoutedExpertsBuilder(2, first_position=1)
    b.add(0, step.rows(0, 3))  # position 0 is before first_position: left out
    b.add(1, step.rows(0, 3))  # a recompute of positions 1, 2 adds only position 3
    assert b.rows(0, 6).tolist() == [None, [[], [1]], [[0, 1, 2], [0]], [[0, 1, 2], [0]], None, None]


def test_rows_survive_preemption_once_each(checkpoint_factory):
    """Sequences preempted and recomputed report every position once, and still match usage."""
    from dynserve import LLM, SamplingParams

    llm = LLM(
        str(checkpoint_factory("mixtral")),
        block_size=4,
        num_kv_blocks=20,
        enable_prefix_caching=False,
        routing=RoutingConfig(policy="top_p", p=0.6),
    )
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 200, (int(n),), generator=g).tolist() for n in (20, 24, 28, 30)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, return_routed_experts=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert llm.get_stats().num_preemptions > 0
    for out, p in zip(outs, prompts, strict=True):
        prompt_rows, gen_rows = out.prompt_routed_experts.tolist(), out.outputs[0].routed_experts.tolist()
        assert len(prompt_rows) == len(p) and len(gen_rows) == 24
        assert None not in prompt_rows and gen_rows.count(None) == 1 and gen_rows[-1] is None
        total = out.prompt_routed_experts.num_pairs() + out.outputs[0].routed_experts.num_pairs()
        assert total == out.expert_usage.expert_activations


def test_streamed_base64_chunks_decode_to_the_rows(client):
    body = {"prompt": PROMPT + " base64 stream", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    body |= {"return_routed_experts": True}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["routed_experts"]
    chunks = _events(client.post("/v1/completions", json={**body, "stream": True, "routed_experts_format": "base64"}))
    rows = [row for ch in chunks for c in ch["choices"] for row in decode_csr(c["routed_experts"])[0]]
    assert rows == full
    assert all(decode_csr(ch["prompt_routed_experts"])[0] for ch in chunks if "prompt_routed_experts" in ch)
