"""Load-adaptive expert budget (`--expert-budget auto`): the controller's hysteresis, how a budget
scales each policy, and the engine under overload (later admissions spend fewer experts, `fixed`
requests never do, the prefix cache never mixes routings, light load changes nothing)."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from dynserve import LLM, SamplingParams
from dynserve.config import BudgetConfig, EngineConfig, RoutingConfig
from dynserve.engine.async_engine import AsyncEngine
from dynserve.engine.budget import ExpertBudgetController, apply_budget
from dynserve.server.app import ServerSettings, build_app


def run(ctrl: ExpertBudgetController, waiting: list[int], step_s: float | None = None) -> list[float]:
    return [ctrl.update(w, step_s) for w in waiting]


def test_light_load_keeps_the_full_budget_and_off_never_moves():
    ctrl = ExpertBudgetController(BudgetConfig("auto"))
    assert set(run(ctrl, [0] * 200)) == {1.0}
    off = ExpertBudgetController(BudgetConfig("off"))
    assert set(run(off, [50] * 200)) == {1.0}


def test_overload_walks_down_to_the_floor_holds_then_recovers():
    ctrl = ExpertBudgetController(BudgetConfig("auto", floor=0.5))
    down = run(ctrl, [5] * 100)
    assert down == sorted(down, reverse=True) and down[-1] == 0.5 and down.count(0.5) > 50  # no oscillation
    assert down[:3] == [1.0, 1.0, 1.0]  # hysteresis: hold_steps over-steps before the first change
    up = run(ctrl, [0] * 100)
    assert up == sorted(up) and up[-1] == 1.0


def test_alternating_load_does_not_oscillate():
    ctrl = ExpertBudgetController(BudgetConfig("auto"))
    assert set(run(ctrl, [3, 0] * 100)) == {1.0}


def test_itl_target_counts_as_overload():
    ctrl = ExpertBudgetController(BudgetConfig("auto", floor=0.6, target_itl_ms=10.0))
    assert run(ctrl, [0] * 100, step_s=0.050)[-1] == 0.6  # 50 ms decode steps, target 10 ms
    assert run(ctrl, [0] * 200, step_s=0.005)[-1] == 1.0  # well under the target: back to full


def test_bad_budget_config_is_refused():
    for kw in (dict(mode="on"), dict(floor=0.0), dict(floor=1.5), dict(target_itl_ms=float("nan"))):
        with pytest.raises(ValueError):
            BudgetConfig(**{"mode": "auto", **kw})


@pytest.mark.parametrize(
    "routing,b,field,want",
    [
        (RoutingConfig(), 0.5, "k", 1),  # the checkpoint's k = 2 -> 1
        (RoutingConfig(k=4), 0.6, "k", 2),  # round(2.4)
        (RoutingConfig(k=1), 0.5, "k", 1),  # never below one expert
        (RoutingConfig(k=[1, 4]), 0.5, "k", (1, 2)),  # per layer, value by value
        (RoutingConfig(policy="top_p", p=0.6), 0.5, "p", 0.3),
        (RoutingConfig(policy="threshold", threshold=0.2), 0.5, "threshold", 0.4),
        (RoutingConfig(policy="relative", threshold=0.7), 0.5, "threshold", 1.0),  # capped at 1
        (RoutingConfig(policy="entropy", entropy_k=[0, 2, 4]), 0.5, "entropy_k", (0, 1, 2)),
    ],
)
def test_apply_budget_per_policy(routing, b, field, want):
    got = getattr(apply_budget(routing, b, checkpoint_k=2), field)
    assert got == (pytest.approx(want) if isinstance(want, float) else want)


def test_full_budget_or_fixed_leaves_routing_as_asked():
    r = RoutingConfig(policy="top_p", p=0.6)
    assert apply_budget(r, 1.0, 2) is r
    fixed = RoutingConfig(policy="top_p", p=0.6, budget="fixed")
    assert apply_budget(fixed, 0.5, 2) is fixed


PROMPT = list(range(5, 45))  # 40 tokens: two full 16-token blocks for the prefix cache


@pytest.fixture(scope="module")
def llm_auto(checkpoint_factory):
    return LLM(str(checkpoint_factory("mixtral")), num_kv_blocks=64, max_num_seqs=1, expert_budget="auto")


def test_overload_reduces_later_admissions_but_not_fixed_requests(llm_auto):
    greedy = dict(max_tokens=8, temperature=0, ignore_eos=True)
    params = [SamplingParams(**greedy) for _ in range(5)]
    params.append(SamplingParams(**greedy, routing=RoutingConfig(budget="fixed")))
    outs = llm_auto.generate(prompt_token_ids=[PROMPT] * 6, sampling_params=params)
    usage = [o.expert_usage for o in outs]
    # one slot, six requests: the queue waits, b falls; the first runs at full budget (top-2)
    assert usage[0].expert_budget_min == 1.0 and usage[0].avg_experts_per_token == 2.0
    reduced = [u for u in usage[:5] if u.expert_budget_min < 1.0]
    assert reduced and all(u.avg_experts_per_token < 2.0 for u in reduced if u.expert_budget_min <= 0.7)
    assert usage[4].avg_experts_per_token == 1.0  # admitted last among the autos: k = round(2 b) = 1
    # the fixed request, admitted last, spends the checkpoint's experts and reports no reduction
    assert usage[5].expert_budget_min == 1.0 and usage[5].avg_experts_per_token == 2.0
    # prefix cache: the fixed request (top-2) reuses the first request's top-2 blocks; the first request
    # at k = 1 found none (blocks computed under top-2 are never served to a k = 1 request)
    assert outs[5].num_cached_tokens >= 32
    first_k1 = next(i for i, u in enumerate(usage) if u.avg_experts_per_token == 1.0)
    assert outs[first_k1].num_cached_tokens == 0
    assert llm_auto.engine.get_stats().expert_budget < 1.0


def test_light_load_gives_the_same_tokens_as_static_routing(checkpoint_factory, llm_auto):
    static = LLM(str(checkpoint_factory("mixtral")), num_kv_blocks=64, max_num_seqs=1)
    for _ in range(40):  # let the budget recover first
        llm_auto.engine.budget.update(0)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for prompt in ([7, 8, 9], [100, 200, 300, 350]):
        a = llm_auto.generate(prompt_token_ids=[prompt], sampling_params=sp)[0]
        b = static.generate(prompt_token_ids=[prompt], sampling_params=sp)[0]
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.expert_usage.expert_budget_min == 1.0


@pytest.fixture(scope="module")
def client(checkpoint_factory):
    cfg = EngineConfig.create(
        str(checkpoint_factory("mixtral")), num_kv_blocks=64, max_num_seqs=2, expert_budget="auto"
    )
    engine = AsyncEngine.from_config(cfg)
    app = build_app(engine, ServerSettings(served_model_name="m", api_key=""))
    yield TestClient(app, raise_server_exceptions=False)
    engine.shutdown_sync(timeout=0)


def test_http_budget_field_usage_and_gauge(client):
    body = {"prompt": "x = 1", "max_tokens": 3, "temperature": 0}
    r = client.post("/v1/completions", json={**body, "routing": {"budget": "fixed"}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["expert_budget_min"] == 1.0
    r = client.post("/v1/completions", json={**body, "routing": {"budget": "sometimes"}})
    assert r.status_code == 400 and "budget" in r.json()["error"]["param"]
    assert "dynserve_expert_budget 1.0" in client.get("/metrics").text
