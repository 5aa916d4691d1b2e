"""The relative and entropy routing policies and per-layer routing values: known answers, parity with
an independent per-token reference (plain Python over sorted probabilities), mixed batches, grouped
routers, the engine and the HTTP API."""

from __future__ import annotations

import math

import pytest
import torch
from dynserve_kernels import cpu_native
from starlette.testclient import TestClient

from dynserve import LLM, SamplingParams
from dynserve.config import EngineConfig, RoutingConfig
from dynserve.engine.async_engine import AsyncEngine
from dynserve.routing import Assignment, CheckpointRule, RoutingBatch, route, route_probs
from dynserve.routing.policies import route_grouped
from dynserve.server.app import ServerSettings, build_app

PROBS = [0.5, 0.3, 0.15, 0.05]


def pairs(a: Assignment) -> list[list[tuple[int, float]]]:
    out = []
    for t in range(a.num_tokens):
        lo, hi = int(a.token_offsets[t]), int(a.token_offsets[t + 1])
        out.append([(int(e), float(w)) for e, w in zip(a.expert_ids[lo:hi], a.weights[lo:hi], strict=True)])
    return out


def one(probs: list[float], **cfg) -> list[tuple[int, float]]:
    rule = CheckpointRule(num_experts=len(probs), top_k=2)
    a = route_probs(torch.tensor([probs]), RoutingBatch.single(RoutingConfig(**cfg)), rule)
    return pairs(a)[0]


def entropy(ps: list[float]) -> float:
    return -sum(p * math.log(p) for p in ps if p > 0)


def reference(probs: list[float], cfg: RoutingConfig, rule: CheckpointRule, layer: int = 0) -> list[tuple[int, float]]:
    """One token by the README's rules, in plain Python (float64 except where float32 is the rule)."""
    order = sorted(range(len(probs)), key=lambda e: -probs[e])
    E = len(probs)
    hi = min(cfg.max_experts or E, E)
    lo = min(cfg.min_experts, hi)
    if cfg.policy == "relative":
        t = cfg.at_layer("threshold", layer)
        n = sum(1 for e in order if probs[e] >= t * probs[order[0]])
    elif cfg.policy == "entropy":
        h = entropy(probs)
        n = cfg.entropy_k[sum(1 for x in cfg.entropy_thresholds if x <= h)]
    elif cfg.policy == "top_p":
        p, before, n = cfg.at_layer("p", layer), 0.0, 0
        for e in order:
            if before >= p:
                break
            n, before = n + 1, before + probs[e]
    else:
        n = cfg.at_layer("k", layer) or rule.top_k
    n = min(max(n, lo), hi)
    kept = order[:n]
    renorm = rule.renormalize if cfg.renormalize is None else cfg.renormalize
    total = sum(probs[e] for e in kept) if renorm else 1.0
    return [(e, probs[e] / total) for e in kept]


def assert_pairs_close(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [e for e, _ in got] == [e for e, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------- known answers


@pytest.mark.parametrize("t,n", [(1.0, 1), (0.6, 2), (0.5, 2), (0.3, 3), (0.1, 4), (0.0, 4)])
def test_relative_keeps_experts_within_a_fraction_of_the_top(t, n):
    # top 0.5: t=0.6 keeps p >= 0.3 (2 experts), t=0.3 keeps p >= 0.15 (3), t=0.1 keeps p >= 0.05 (4)
    got = one(PROBS, policy="relative", threshold=t)
    assert got == [(e, pytest.approx(PROBS[e])) for e in range(n)]


def test_entropy_picks_k_by_the_router_entropy():
    h = entropy(PROBS)  # 1.142 nats
    assert len(one(PROBS, policy="entropy", entropy_thresholds=[h + 0.01], entropy_k=[3, 1])) == 3  # H < h1
    assert len(one(PROBS, policy="entropy", entropy_thresholds=[h - 0.01], entropy_k=[3, 1])) == 1  # H >= h1
    assert len(one(PROBS, policy="entropy", entropy_thresholds=[0.5, h - 0.01, 2.0], entropy_k=[1, 2, 4, 3])) == 4
    # a confident router (low entropy) gets 1 expert, a flat one 4, by the default thresholds 0.6 / 1.2
    assert len(one([0.97, 0.01, 0.01, 0.01], policy="entropy")) == 1
    assert len(one([0.25] * 4, policy="entropy")) == 4
    # k = 0 is clamped up to min_experts; with min_experts 0 the token uses no expert
    assert one([0.97, 0.01, 0.01, 0.01], policy="entropy", entropy_k=[0, 2, 4]) == [(0, pytest.approx(0.97))]
    assert one([0.97, 0.01, 0.01, 0.01], policy="entropy", entropy_k=[0, 2, 4], min_experts=0) == []


# ---------------------------------------------------------------- parity with the reference

CONFIGS = [
    RoutingConfig(policy="relative", threshold=0.3),
    RoutingConfig(policy="relative", threshold=0.05, max_experts=3, renormalize=True),
    RoutingConfig(policy="entropy"),
    RoutingConfig(policy="entropy", entropy_thresholds=[0.3, 0.9, 1.5, 1.9], entropy_k=[1, 2, 3, 5, 8], min_experts=2),
    RoutingConfig(policy="top_p", p=[0.2, 0.7, 0.95]),
    RoutingConfig(policy="relative", threshold=[0.9, 0.2, 0.5], renormalize=True),
    RoutingConfig(policy="top_k", k=[1, 3, 2]),
]


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("E", [8, 13])
def test_policies_match_the_reference_alone_and_in_a_mixed_batch(E, layer):
    torch.manual_seed(E + layer)
    T = 60
    logits = torch.randn(T, E) * torch.rand(T, 1) * 4  # confident and flat routers
    rule = CheckpointRule(num_experts=E, top_k=2, renormalize=False)
    probs = torch.softmax(logits.float(), dim=-1)
    index = torch.randint(0, len(CONFIGS), (T,))
    index[: len(CONFIGS)] = torch.arange(len(CONFIGS))
    mixed = pairs(route(logits, RoutingBatch(list(CONFIGS), index), rule, layer=layer))
    for t in range(T):
        cfg = CONFIGS[int(index[t])]
        want = reference(probs[t].tolist(), cfg, rule, layer)
        alone = pairs(route(logits[t : t + 1], RoutingBatch.single(cfg), rule, layer=layer))[0]
        assert_pairs_close(alone, want)
        assert mixed[t] == alone  # a request's routing does not depend on its batch
    counts = {c.policy for c in CONFIGS}
    assert counts >= {"relative", "entropy"}


def test_per_layer_values_change_experts_per_layer():
    torch.manual_seed(0)
    logits = torch.randn(32, 8)
    rule = CheckpointRule(num_experts=8, top_k=2)
    cfg = RoutingConfig(policy="top_k", k=[1, 4, 8])
    assert [int(route(logits, RoutingBatch.single(cfg), rule, layer=i).num_pairs) for i in range(3)] == [32, 128, 256]
    top_p = RoutingConfig(policy="top_p", p=[0.1, 0.9])
    n0, n1 = (route(logits, RoutingBatch.single(top_p), rule, layer=i).num_pairs for i in range(2))
    assert n0 == 32 < n1


def test_grouped_router_relative_and_entropy_stay_in_the_allowed_groups():
    torch.manual_seed(5)
    E, T = 16, 48
    rule = CheckpointRule(
        num_experts=E, top_k=4, renormalize=True, scoring="sigmoid", n_group=4, topk_group=2,
        routed_scaling_factor=2.5, selection_bias=True,
    )  # fmt: skip
    logits = torch.randn(T, E) * 2
    bias = torch.randn(E) * 0.1
    for cfg in (RoutingConfig(policy="relative", threshold=0.6), RoutingConfig(policy="entropy")):
        a = route_grouped(logits, RoutingBatch.single(cfg), rule, bias)
        top = route_grouped(logits, RoutingBatch.single(RoutingConfig()), rule, bias)
        for got, ref in zip(pairs(a), pairs(top), strict=True):
            groups = {e // 4 for e, _ in ref}
            assert {e // 4 for e, _ in got} <= groups  # the group limit is never lifted
            assert 1 <= len(got) <= 8
            assert sum(w for _, w in got) == pytest.approx(2.5, rel=1e-4)  # renormalised x routed scaling
    # q over the allowed experts: relative 1.0 keeps exactly the best expert
    a = route_grouped(logits, RoutingBatch.single(RoutingConfig(policy="relative", threshold=1.0)), rule, bias)
    assert a.experts_per_token().tolist() == [1] * T


# ---------------------------------------------------------------- validation, engine and HTTP


@pytest.mark.parametrize(
    "bad,field",
    [
        (dict(policy="entropy", entropy_k=[1, 2]), "entropy_k"),
        (dict(entropy_thresholds=[1.0, 0.5], entropy_k=[1, 2, 3]), "entropy_thresholds"),
        (dict(entropy_thresholds=[float("inf")], entropy_k=[1, 2]), "entropy_thresholds"),
        (dict(entropy_k=[1, -1, 2]), "entropy_k"),
        (dict(p=[]), "p"),
        (dict(p=[0.5, 1.5]), "p"),
        (dict(threshold=[0.5, float("nan")]), "threshold"),
        (dict(k=[2, 0]), "k"),
    ],
)
def test_bad_values_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"routing.{field}"):
        RoutingConfig(**bad)


@pytest.fixture(scope="module")
def llm(checkpoint_factory):
    return LLM(str(checkpoint_factory("mixtral")), num_kv_blocks=64, max_num_seqs=4)


def test_engine_per_layer_routing_and_wrong_length(llm):
    n_layers = llm.engine.runner.num_moe_layers
    assert n_layers >= 2
    k = [1] + [2] * (n_layers - 1)
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, routing=RoutingConfig(policy="top_k", k=k))
    out = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=sp)[0]
    usage = out.expert_usage
    assert usage.per_layer[0] * 2 == usage.per_layer[1] == 2 * usage.num_tokens
    bad = SamplingParams(max_tokens=2, routing=RoutingConfig(p=[0.5] * (n_layers + 1)))
    with pytest.raises(ValueError, match=r"routing\.p has .* one per MoE layer"):
        llm.generate(prompt_token_ids=[[5, 6]], sampling_params=bad)
    ent = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, routing=RoutingConfig(policy="entropy"))
    out = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=ent)[0]
    assert 1 <= out.expert_usage.avg_experts_per_token <= 4


@pytest.fixture(scope="module")
def client(checkpoint_factory):
    cfg = EngineConfig.create(str(checkpoint_factory("mixtral")), num_kv_blocks=64, max_num_seqs=4)
    engine = AsyncEngine.from_config(cfg)
    yield TestClient(
        build_app(engine, ServerSettings(served_model_name="m", api_key="")), raise_server_exceptions=False
    )
    engine.shutdown_sync(timeout=0)


def test_http_relative_entropy_and_per_layer(client):
    body = {"prompt": "x = 1", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    for routing in (
        {"policy": "relative", "threshold": 0.5},
        {"policy": "entropy", "entropy_thresholds": [0.5], "entropy_k": [1, 3]},
        {"policy": "top_p", "p": [0.3, 0.9]},
    ):
        r = client.post("/v1/completions", json={**body, "routing": routing})
        assert r.status_code == 200, (routing, r.text)
        assert r.json()["usage"]["expert_activations"] > 0
    for routing, field in (
        ({"policy": "top_p", "p": [0.3, 0.9, 0.5]}, "p"),  # the tiny model has 2 MoE layers
        ({"policy": "entropy", "entropy_k": [1, 2]}, "entropy_k"),
        ({"p": [0.5] * 5000}, "p"),
        ({"entropy_thresholds": [1e30, 1e300], "entropy_k": [1, 2, 3]}, None),
        ({"threshold": [5e-324, 1e-300]}, None),
    ):
        r = client.post("/v1/completions", json={**body, "routing": routing})
        if field is None:  # extreme but valid values: served
            assert r.status_code == 200, (routing, r.text)
            continue
        assert r.status_code == 400, (routing, r.text)
        err = r.json()["error"]
        assert field in (err.get("param") or "") + err["message"], err


# ---------------------------------------------------------------- native pass vs torch pass

NATIVE_CONFIGS = [
    RoutingConfig(policy="top_p", p=0.5),
    RoutingConfig(policy="top_p", p=[0.3, 0.9], renormalize=True, max_experts=5),
    RoutingConfig(policy="threshold", threshold=0.12, min_experts=0),
    RoutingConfig(policy="relative", threshold=0.4),
    RoutingConfig(policy="entropy", entropy_thresholds=[0.8, 1.6], entropy_k=[1, 3, 6], min_experts=2),
    RoutingConfig(policy="top_k", k=3),
    RoutingConfig(policy="top_k", renormalize=True),
]
GROUPED_RULES = {
    "softmax": CheckpointRule(num_experts=13, top_k=2, renormalize=True),
    "softmax_raw": CheckpointRule(num_experts=8, top_k=2),
    "v3": CheckpointRule(
        num_experts=16,
        top_k=4,
        renormalize=True,
        scoring="sigmoid",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        selection_bias=True,
    ),  # fmt: skip
    "v2": CheckpointRule(num_experts=12, top_k=3, n_group=3, topk_group=2, routed_scaling_factor=1.5),
}


@pytest.mark.skipif(not cpu_native.available(), reason="native CPU kernels unavailable")
@pytest.mark.parametrize("rule_name", list(GROUPED_RULES))
@pytest.mark.parametrize("mixed", [False, True])
def test_native_routing_pass_equals_the_torch_pass(rule_name, mixed):
    rule = GROUPED_RULES[rule_name]
    E, T = rule.num_experts, 50
    torch.manual_seed(E)
    logits = torch.randn(T, E) * torch.rand(T, 1) * 4
    logits[2] = float("nan")  # a NaN router row (never a top_k row here: tie order differs by design)
    bias = torch.randn(E) * 0.1 if rule.selection_bias else None
    steer = RoutingConfig(policy="top_p", p=0.7, exclude_experts=[0, 1], min_experts=1)
    configs = [*NATIVE_CONFIGS, steer]
    pairs_with_top_k = [c for c in configs if c.policy != "top_k"]
    cases = [RoutingBatch([c, NATIVE_CONFIGS[5]], (torch.arange(T) % 2)) for c in pairs_with_top_k] if mixed else []
    cases += [RoutingBatch.single(c) for c in configs] if not mixed else []
    if mixed:
        cases.append(RoutingBatch(list(configs), torch.arange(T) % len(configs)))
    for batch in cases:
        for layer in (0, 1):
            native = route(logits, batch, rule, bias, layer=layer, select=cpu_native.ROUTE_SELECTOR)
            ref = route(logits, batch, rule, bias, layer=layer)  # torch ops throughout
            assert torch.equal(native.token_offsets, ref.token_offsets), (rule_name, batch.configs)
            assert torch.equal(native.token_ids, ref.token_ids)
            assert torch.equal(native.expert_ids, ref.expert_ids), (rule_name, batch.configs)
            torch.testing.assert_close(native.weights, ref.weights, rtol=2e-6, atol=1e-7)
    empty = route(
        torch.zeros(0, E), RoutingBatch.single(NATIVE_CONFIGS[0]), rule, bias, select=cpu_native.ROUTE_SELECTOR
    )
    assert empty.num_pairs == 0 and empty.token_offsets.tolist() == [0]
