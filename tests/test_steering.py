"""Per-request expert steering (`routing.exclude_experts`, `routing.expert_bias`): the routing rule on
its own (every policy, sigmoid group-limited routers, mixed batches), the config's normalisation and
checks, and through the HTTP app (excluded experts never appear, bias changes the picks, the prefix
cache keys on steering, 400s naming the field)."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from dynserve.config import EngineConfig, RoutingConfig
from dynserve.engine.async_engine import AsyncEngine
from dynserve.routing import CheckpointRule, RoutingBatch, route
from dynserve.server.app import ServerSettings, build_app

E = 8
SOFTMAX = CheckpointRule(num_experts=E, top_k=2)
SIGMOID = CheckpointRule(num_experts=E, top_k=2, scoring="sigmoid", n_group=4, topk_group=2, selection_bias=True)


def _pairs(a, t: int) -> list[int]:
    lo, hi = a.token_offsets[t : t + 2].tolist()
    return a.expert_ids[lo:hi].tolist()


@pytest.mark.parametrize(
    "cfg",
    [
        RoutingConfig(policy="top_k"),
        RoutingConfig(policy="top_k", k=7),  # more than the experts left: excluded ones are dropped
        RoutingConfig(policy="top_p", p=0.9),
        RoutingConfig(policy="threshold", threshold=0.0, min_experts=0),
    ],
)
@pytest.mark.parametrize("rule", [SOFTMAX, SIGMOID], ids=["softmax", "sigmoid-grouped"])
def test_excluded_experts_never_appear(cfg, rule):
    torch.manual_seed(0)
    logits = torch.randn(32, E)
    bias = torch.randn(E) if rule.selection_bias else None
    steered = RoutingConfig(**{**cfg.to_dict(), "exclude_experts": {0: [0, 3], 1: [5]}})
    for layer, banned in ((0, {0, 3}), (1, {5}), (2, set())):
        a = route(logits, RoutingBatch.single(steered), rule, bias, layer=layer)
        used = set(a.expert_ids.tolist())
        assert not used & banned
        assert a.token_offsets[-1] == a.num_pairs and (a.experts_per_token() >= 0).all()
        if not banned:  # a layer it does not steer routes as before
            b = route(logits, RoutingBatch.single(cfg), rule, bias, layer=layer)
            assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.weights, b.weights)


def test_mixed_batch_rows_route_as_alone():
    torch.manual_seed(1)
    logits = torch.randn(6, E)
    plain = RoutingConfig(policy="top_p", p=0.7)
    masked = RoutingConfig(policy="top_p", p=0.7, exclude_experts=[1, 2])
    biased = RoutingConfig(policy="top_k", expert_bias=[4.0] + [0.0] * (E - 1))
    configs = [plain, masked, biased, plain, masked, biased]
    batch = RoutingBatch.from_per_sequence(configs, [1] * 6)
    mixed = route(logits, batch, SOFTMAX)
    for t, cfg in enumerate(configs):
        alone = route(logits[t : t + 1], RoutingBatch.single(cfg), SOFTMAX)
        assert _pairs(mixed, t) == _pairs(alone, 0)
    assert all(0 in _pairs(mixed, t) for t in (2, 5))  # the bias pulls expert 0 in


def test_config_normalises_and_checks():
    a = RoutingConfig(exclude_experts={"1": [3, 1, 3]}, expert_bias=[0.5, -1])
    assert a.exclude_experts == ((1, (1, 3)),) and a.excluded_in(1) == (1, 3) and a.excluded_in(0) == ()
    assert a == RoutingConfig(exclude_experts={1: [1, 3]}, expert_bias=(0.5, -1.0)) and hash(a)
    assert a.to_dict()["exclude_experts"] == {"1": [1, 3]}
    assert RoutingConfig.from_dict(a.to_dict()) == a
    assert "exclude_experts" in repr(a)  # the prefix cache's key (repr) carries the steering
    with pytest.raises(ValueError, match="routing.expert_bias"):
        RoutingConfig(expert_bias=[float("nan")])
    with pytest.raises(ValueError, match="routing.exclude_experts"):
        RoutingConfig(exclude_experts=[-1])
    with pytest.raises(ValueError, match="out of range"):
        RoutingConfig(exclude_experts=[9]).check_model(num_experts=8, num_moe_layers=2)
    with pytest.raises(ValueError, match="one number per expert"):
        RoutingConfig(expert_bias=[1.0]).check_model(num_experts=8, num_moe_layers=2)
    with pytest.raises(ValueError, match="min_experts = 0"):
        RoutingConfig(exclude_experts={0: list(range(8))}).check_model(num_experts=8, num_moe_layers=2)
    RoutingConfig(exclude_experts={0: list(range(8))}, min_experts=0).check_model(num_experts=8, num_moe_layers=2)


# ------------------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def client(checkpoint_factory):
    cfg = EngineConfig.create(
        str(checkpoint_factory("mixtral")), num_kv_blocks=96, routing=RoutingConfig(policy="top_p", p=0.6)
    )
    eng = AsyncEngine.from_config(cfg)
    yield TestClient(build_app(eng, ServerSettings(api_key="")), raise_server_exceptions=False)
    eng.shutdown_sync(timeout=0)


def _experts(body: dict) -> list[set[int]]:
    """Per MoE layer, the experts any computed position used."""
    rows = body["prompt_routed_experts"] + body["choices"][0]["routed_experts"]
    return [{e for r in rows if r is not None for e in r[layer]} for layer in range(2)]


BASE = {"prompt": "steer the experts of this prompt", "max_tokens": 4, "temperature": 0, "return_routed_experts": True}


def test_http_exclude_and_bias_steer_the_routing(client):
    plain = client.post("/v1/completions", json=BASE).json()
    assert _experts(plain) == [{0, 1, 2, 3}, {0, 1, 2, 3}]
    r = client.post("/v1/completions", json={**BASE, "routing": {"exclude_experts": [0, 2]}})
    assert r.status_code == 200, r.text
    assert _experts(r.json()) == [{1, 3}, {1, 3}]
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # the prefix cache keys on it
    again = client.post("/v1/completions", json={**BASE, "routing": {"exclude_experts": [0, 2]}}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the same steering hits it
    per_layer = client.post("/v1/completions", json={**BASE, "routing": {"exclude_experts": {"1": [0, 1, 2]}}}).json()
    assert _experts(per_layer) == [{0, 1, 2, 3}, {3}]
    bias = {"policy": "top_k", "k": 1, "expert_bias": {"0": [0.0, 0.0, 50.0, 0.0]}}
    biased = client.post("/v1/completions", json={**BASE, "routing": bias}).json()
    assert _experts(biased)[0] == {2}
    # every expert of a layer excluded: allowed with min_experts 0 (those tokens use none there)
    none = {"policy": "threshold", "min_experts": 0, "exclude_experts": {"0": [0, 1, 2, 3]}}
    r = client.post("/v1/completions", json={**BASE, "routing": none})
    assert r.status_code == 200, r.text
    assert _experts(r.json())[0] == set()


@pytest.mark.parametrize(
    "routing,param",
    [
        ({"exclude_experts": [4]}, "routing.exclude_experts"),
        ({"exclude_experts": [-1]}, "routing.exclude_experts"),
        ({"exclude_experts": {"2": [0]}}, "routing.exclude_experts"),
        ({"exclude_experts": {"x": [0]}}, "routing.exclude_experts"),
        ({"exclude_experts": [0, 1, 2, 3]}, "routing.exclude_experts"),
        ({"exclude_experts": "0"}, "routing.exclude_experts"),
        ({"expert_bias": [1.0, 2.0]}, "routing.expert_bias"),
        ({"expert_bias": [1e12, 0, 0, 0]}, "routing.expert_bias"),
        ({"expert_bias": [True, 0, 0, 0]}, "routing.expert_bias"),
    ],
)
def test_http_steering_validation_is_400(client, routing, param):
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "routing": routing})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
