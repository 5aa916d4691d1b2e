"""Sigmoid group-limited routers (DeepSeek-V3, GLM-4.5): the checkpoint's rule against transformers'
own router modules, and what the adaptive policies (top_k with k, top_p, threshold, min/max) do on it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dynserve.config import RoutingConfig
from dynserve.routing import Assignment, CheckpointRule, RoutingBatch, route

E, N_GROUP, TOPK_GROUP, TOP_K, HIDDEN = 16, 4, 2, 4, 32
SCALE = 2.5


def rule(renormalize: bool = True, **kw) -> CheckpointRule:
    args = dict(
        num_experts=E,
        top_k=TOP_K,
        renormalize=renormalize,
        scoring="sigmoid",
        n_group=N_GROUP,
        topk_group=TOPK_GROUP,
        routed_scaling_factor=SCALE,
        selection_bias=True,
    )
    args.update(kw)
    return CheckpointRule(**args)


def pairs(a: Assignment) -> list[list[tuple[int, float]]]:
    off = a.token_offsets.tolist()
    return [
        list(zip(a.expert_ids[off[t] : off[t + 1]].tolist(), a.weights[off[t] : off[t + 1]].tolist(), strict=True))
        for t in range(a.num_tokens)
    ]


def groups_of(ids: list[int]) -> set[int]:
    return {e // (E // N_GROUP) for e in ids}


def random_router(seed: int, T: int = 96) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states [T, H], router weight [E, H], selection bias [E] (non-zero), without ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, HIDDEN, generator=g)
    w = torch.randn(E, HIDDEN, generator=g) * 0.3
    bias = torch.randn(E, generator=g) * 0.2
    choice = torch.sigmoid(F.linear(x, w)) + bias  # [T, E]
    srt = choice.sort(dim=-1).values
    assert bool((srt[:, 1:] > srt[:, :-1]).all()), "tie in the biased scores"
    return x, w, bias


def logits_of(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), w.float())  # [T, E], as transformers' routers compute them


# ---------------------------------------------------------------- the checkpoint's own rule


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_default_top_k_equals_transformers_router_bit_for_bit(family, norm_topk_prob):
    import transformers

    if family == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as Router

        config = transformers.DeepseekV3Config
    else:
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter as Router

        config = transformers.Glm4MoeConfig
    cfg = config(
        hidden_size=HIDDEN,
        n_routed_experts=E,
        num_experts_per_tok=TOP_K,
        n_group=N_GROUP,
        topk_group=TOPK_GROUP,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=SCALE,
    )
    x, w, bias = random_router(seed=1 if norm_topk_prob else 2)
    ref = Router(cfg)
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.e_score_correction_bias.copy_(bias)
        _, ref_w, ref_ids = ref(x)  # [T, k] each

    got = route(logits_of(x, w), RoutingBatch.single(RoutingConfig()), rule(norm_topk_prob), bias)
    assert got.experts_per_token().tolist() == [TOP_K] * len(x)
    assert torch.equal(got.expert_ids.view(-1, TOP_K), ref_ids)  # same experts, same order
    assert torch.equal(got.weights.view(-1, TOP_K), ref_w)  # bit for bit

    # the test exercises both the bias and the group limit: without either, picks change
    no_bias = route(logits_of(x, w), RoutingBatch.single(RoutingConfig()), rule(norm_topk_prob))
    assert not torch.equal(no_bias.expert_ids, got.expert_ids)
    free = torch.topk(torch.sigmoid(logits_of(x, w)) + bias, TOP_K).indices  # no group limit
    assert any(len(groups_of(r)) > TOPK_GROUP for r in free.tolist())
    assert all(len(groups_of(r)) <= TOPK_GROUP for r in ref_ids.tolist())


def test_known_answer_group_limit_bias_and_policies():
    # groups {0, 1} and {2, 3}; the bias lifts expert 3, whose group wins (1.8 vs 1.5), so the
    # best unbiased expert (0) is never picked
    s = torch.tensor([[0.9, 0.6, 0.8, 0.7]])
    logits = torch.log(s / (1 - s))
    bias = torch.tensor([0.0, 0.0, 0.0, 0.3])
    r = CheckpointRule(4, 2, True, "sigmoid", n_group=2, topk_group=1, routed_scaling_factor=2.0, selection_bias=True)

    def one(**cfg) -> list[tuple[int, float]]:
        return pairs(route(logits, RoutingBatch.single(RoutingConfig(**cfg)), r, bias))[0]

    def approx(ws: list[tuple[int, float]]) -> list:
        return [(e, pytest.approx(w, rel=1e-6)) for e, w in ws]

    assert sorted(one()) == approx([(2, 2 * 0.8 / 1.5), (3, 2 * 0.7 / 1.5)])
    assert one(policy="top_k", k=1) == approx([(3, 2.0)])  # best by biased score, renormalised
    assert one(policy="top_k", k=1, renormalize=False) == approx([(3, 2 * 0.7)])
    # probabilities over the allowed group: q3 = 0.7/1.5 = 0.467, q2 = 0.8/1.5 = 0.533 (ranked 3, 2)
    assert one(policy="top_p", p=0.4) == approx([(3, 2.0)])
    assert one(policy="top_p", p=0.5) == approx([(3, 2 * 0.7 / 1.5), (2, 2 * 0.8 / 1.5)])
    # threshold counts the experts with q >= t (one: expert 2) and keeps that many best-ranked (expert 3)
    assert one(policy="threshold", threshold=0.5) == approx([(3, 2.0)])
    assert one(policy="threshold", threshold=0.6, min_experts=0) == []
    assert one(policy="top_k", k=4) == approx([(3, 2 * 0.7 / 1.5), (2, 2 * 0.8 / 1.5)])  # k clamped to the group


# ---------------------------------------------------------------- adaptive policies

MIXED = [
    RoutingConfig(),
    RoutingConfig(policy="top_p", p=0.3),
    RoutingConfig(policy="top_p", p=0.9, renormalize=False, max_experts=6),
    RoutingConfig(policy="threshold", threshold=0.12, min_experts=0),
    RoutingConfig(policy="top_k", k=2),
    RoutingConfig(policy="top_k", k=100),
    RoutingConfig(policy="top_k", renormalize=False),
]


def test_mixed_batch_equals_each_config_routed_alone():
    x, w, bias = random_router(seed=3, T=70)
    logits = logits_of(x, w)
    index = torch.arange(len(x)) % len(MIXED)
    mixed = pairs(route(logits, RoutingBatch(list(MIXED), index), rule(), bias))
    for c, cfg in enumerate(MIXED):
        rows = (index == c).nonzero().flatten()
        alone = pairs(route(logits[rows], RoutingBatch.single(cfg), rule(), bias))
        for i, t in enumerate(rows.tolist()):
            assert mixed[t] == alone[i], (cfg, t)  # exact: same experts, same order, same float weights


def test_top_p_spends_fewer_experts_than_top_k_and_stays_in_allowed_groups():
    x, w, bias = random_router(seed=4, T=200)
    logits = logits_of(x, w)
    top_p = route(logits, RoutingBatch.single(RoutingConfig(policy="top_p", p=0.2)), rule(), bias)
    n = top_p.experts_per_token().float()
    assert n.min() >= 1 and n.mean() < TOP_K
    assert torch.isfinite(top_p.weights).all() and (top_p.weights > 0).all()
    # renormalised: each token's weights sum to routed_scaling_factor
    sums = top_p.to_dense().sum(dim=1)
    torch.testing.assert_close(sums, torch.full_like(sums, SCALE))
    # the group limit still applies: picks lie in the two groups with the best top-2 biased sums
    choice = (torch.sigmoid(logits) + bias).view(-1, N_GROUP, E // N_GROUP)  # [T, G, E/G]
    best_groups = choice.topk(2, dim=-1).values.sum(-1).topk(TOPK_GROUP).indices  # [T, topk_group]
    for t, ps in enumerate(pairs(top_p)):
        assert groups_of([e for e, _ in ps]) <= set(best_groups[t].tolist())
    # a larger p never spends fewer experts
    wider = route(logits, RoutingBatch.single(RoutingConfig(policy="top_p", p=0.7)), rule(), bias)
    assert bool((wider.experts_per_token() >= top_p.experts_per_token()).all())


def test_k_above_the_allowed_experts_is_clamped_to_the_kept_groups():
    x, w, bias = random_router(seed=5, T=40)
    allowed = TOPK_GROUP * E // N_GROUP  # 8
    a = route(logits_of(x, w), RoutingBatch.single(RoutingConfig(policy="top_k", k=100)), rule(), bias)
    assert a.experts_per_token().tolist() == [allowed] * len(x)
    default = route(logits_of(x, w), RoutingBatch.single(RoutingConfig()), rule(), bias)
    for t, ps in enumerate(pairs(a)):
        ids = [e for e, _ in ps]
        assert len(set(ids)) == allowed and len(groups_of(ids)) == TOPK_GROUP
        assert set(default.expert_ids.view(-1, TOP_K)[t].tolist()) <= set(ids)
    # top_p at p = 1 and a zero threshold also stop at the allowed experts
    for cfg in (RoutingConfig(policy="top_p", p=1.0), RoutingConfig(policy="threshold", threshold=0.0)):
        b = route(logits_of(x, w), RoutingBatch.single(cfg), rule(), bias)
        assert b.experts_per_token().tolist() == [allowed] * len(x)


def test_nan_logits_and_empty_batch_are_safe():
    logits = torch.randn(5, E)
    logits[1] = float("nan")
    logits[2, 3] = float("inf")
    bias = torch.randn(E) * 0.1
    index = torch.arange(5) % 3
    batch = RoutingBatch([RoutingConfig(), RoutingConfig(policy="top_p", p=0.5), RoutingConfig(policy="top_k", k=3)])
    batch.config_index = index
    for b in (batch, RoutingBatch.single(RoutingConfig())):
        a = route(logits, b, rule(), bias)
        assert torch.isfinite(a.weights).all()
        assert int(a.expert_ids.min()) >= 0 and int(a.expert_ids.max()) < E
    empty = route(torch.zeros(0, E), RoutingBatch.single(RoutingConfig(policy="top_p")), rule(), bias)
    assert empty.num_tokens == 0 and empty.num_pairs == 0 and empty.token_offsets.tolist() == [0]


def test_rule_validation_and_softmax_rules_unchanged():
    with pytest.raises(ValueError, match="n_group"):
        CheckpointRule(num_experts=10, top_k=2, scoring="sigmoid", n_group=4)
    with pytest.raises(ValueError, match="topk_group"):
        CheckpointRule(num_experts=16, top_k=2, scoring="sigmoid", n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="scoring"):
        CheckpointRule(num_experts=4, top_k=2, scoring="relu")
    r = CheckpointRule(num_experts=4, top_k=2)
    assert (r.n_group, r.topk_group, r.routed_scaling_factor, r.selection_bias) == (1, 1, 1.0, False)
    with pytest.raises(ValueError, match="sigmoid"):
        route(torch.zeros(1, 4), RoutingBatch.single(RoutingConfig()), r, torch.zeros(4))
    assert math.isclose(rule().allowed_experts, 8)
