"""Routing policies (top_k / top_p / threshold, mixed batches), native dynamic routing helpers, and
expert usage accounting."""

from __future__ import annotations

import math

import pytest
import torch

from dynserve.config import RoutingConfig
from dynserve.routing import (
    Assignment,
    CheckpointRule,
    ExpertUsageAccumulator,
    RoutingBatch,
    checkpoint_top_k,
    experts_per_token_histogram,
    relu_route,
    route,
    route_probs,
    route_with_zero_experts,
    sequence_layer_counts,
)

PROBS = [0.5, 0.3, 0.15, 0.05]


def probs_tensor(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def pairs(a: Assignment) -> list[list[tuple[int, float]]]:
    """Per token: its (expert, weight) pairs in Assignment order."""
    out = []
    for t in range(a.num_tokens):
        lo, hi = int(a.token_offsets[t]), int(a.token_offsets[t + 1])
        out.append([(int(e), float(w)) for e, w in zip(a.expert_ids[lo:hi], a.weights[lo:hi], strict=True)])
    return out


def check_invariants(a: Assignment, positive: bool = True) -> None:
    T, E = a.num_tokens, a.num_experts
    off = a.token_offsets
    assert off.shape == (T + 1,) and off.dtype == torch.int64
    assert int(off[0]) == 0 and int(off[-1]) == a.num_pairs
    assert bool((off[1:] >= off[:-1]).all())
    counts = off[1:] - off[:-1]
    assert torch.equal(a.token_ids, torch.repeat_interleave(torch.arange(T), counts))
    assert torch.equal(a.experts_per_token(), counts)
    assert a.expert_ids.shape == a.weights.shape == a.token_ids.shape
    if a.num_pairs:
        assert int(a.expert_ids.min()) >= 0 and int(a.expert_ids.max()) < E
        if positive:
            assert bool((a.weights > 0).all())
    for t in range(T):  # no expert twice for one token
        ids = a.expert_ids[off[t] : off[t + 1]].tolist()
        assert len(set(ids)) == len(ids)


def one(probs: list[float], renormalize: bool = False, **cfg) -> list[tuple[int, float]]:
    rule = CheckpointRule(num_experts=len(probs), top_k=2, renormalize=renormalize)
    a = route_probs(probs_tensor([probs]), RoutingBatch.single(RoutingConfig(**cfg)), rule)
    check_invariants(a)
    return pairs(a)[0]


# ---------------------------------------------------------------- top_k


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("k", [None, 1, 3])
def test_top_k_bit_for_bit_with_checkpoint_rule(renormalize, k):
    torch.manual_seed(0)
    logits = torch.randn(37, 8, dtype=torch.bfloat16) * 3
    rule = CheckpointRule(num_experts=8, top_k=2, renormalize=renormalize)
    got = route(logits, RoutingBatch.single(RoutingConfig(policy="top_k", k=k)), rule)
    want = checkpoint_top_k(logits, rule, k)
    for name in ("token_ids", "expert_ids", "weights", "token_offsets"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.num_tokens == 37 and got.num_experts == 8


def test_top_k_request_renormalize_overrides_checkpoint():
    torch.manual_seed(1)
    logits = torch.randn(5, 6)
    rule = CheckpointRule(num_experts=6, top_k=2, renormalize=False)
    a = route(logits, RoutingBatch.single(RoutingConfig(renormalize=True)), rule)
    torch.testing.assert_close(a.to_dense().sum(dim=1), torch.ones(5))
    b = route(logits, RoutingBatch.single(RoutingConfig()), rule)
    assert bool((b.to_dense().sum(dim=1) < 1).all())
    assert torch.equal(a.expert_ids, b.expert_ids)


# ---------------------------------------------------------------- top_p


@pytest.mark.parametrize("p,n", [(0.4, 1), (0.6, 2), (0.85, 3), (0.97, 4)])
def test_top_p_known_counts_and_raw_weights(p, n):
    got = one(PROBS, policy="top_p", p=p, renormalize=False)
    assert [e for e, _ in got] == [0, 1, 2, 3][:n]
    assert [w for _, w in got] == pytest.approx(PROBS[:n])


def test_top_p_renormalized_weights():
    got = one(PROBS, policy="top_p", p=0.6, renormalize=True)
    assert [e for e, _ in got] == [0, 1]
    assert [w for _, w in got] == pytest.approx([0.5 / 0.8, 0.3 / 0.8])
    # renormalize=None follows the checkpoint rule
    assert [w for _, w in one(PROBS, renormalize=True, policy="top_p", p=0.85)] == pytest.approx(
        [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]
    )
    assert [w for _, w in one(PROBS, renormalize=False, policy="top_p", p=0.85)] == pytest.approx(PROBS[:3])


def test_top_p_expert_order_follows_probability_not_id():
    got = one([0.1, 0.6, 0.05, 0.25], policy="top_p", p=0.8)
    assert [e for e, _ in got] == [1, 3]


def test_top_p_boundary_exactly_p_is_reached():
    # powers of two: every cumulative sum is exact in float32
    probs = [0.5, 0.25, 0.125, 0.125]
    assert len(one(probs, policy="top_p", p=0.5)) == 1  # top-1 alone reaches 0.5
    assert len(one(probs, policy="top_p", p=0.5000001)) == 2
    assert len(one(probs, policy="top_p", p=0.75)) == 2  # 0.5 + 0.25 reaches 0.75: no third
    assert len(one(probs, policy="top_p", p=0.76)) == 3
    assert len(one(probs, policy="top_p", p=0.875)) == 3


def test_top_p_always_keeps_top1_even_with_min_experts_zero():
    assert len(one(PROBS, policy="top_p", p=0.01, min_experts=0)) == 1


@pytest.mark.parametrize("p", [0.999, 1.0])
def test_top_p_near_one_can_select_all_experts(p):
    E = 8
    logits = torch.zeros(3, E)
    logits[1] = torch.linspace(0, 1, E)
    rule = CheckpointRule(num_experts=E, top_k=2)
    a = route(logits, RoutingBatch.single(RoutingConfig(policy="top_p", p=p, max_experts=E)), rule)
    check_invariants(a)
    assert a.experts_per_token().tolist() == [E, E, E]
    assert sorted(pairs(a)[0]) == [(e, pytest.approx(1 / E)) for e in range(E)]


# ---------------------------------------------------------------- threshold and clamping


def test_threshold_known_answers():
    assert [e for e, _ in one(PROBS, policy="threshold", threshold=0.15)] == [0, 1, 2]  # >= keeps equal
    assert [e for e, _ in one(PROBS, policy="threshold", threshold=0.2)] == [0, 1]
    assert [w for _, w in one(PROBS, policy="threshold", threshold=0.2)] == pytest.approx([0.5, 0.3])
    assert [w for _, w in one(PROBS, policy="threshold", threshold=0.2, renormalize=True)] == pytest.approx(
        [0.625, 0.375]
    )
    assert one(PROBS, policy="threshold", threshold=0.6, min_experts=0) == []
    assert [e for e, _ in one(PROBS, policy="threshold", threshold=0.6, min_experts=1)] == [0]
    assert [e for e, _ in one(PROBS, policy="threshold", threshold=0.0)] == [0, 1, 2, 3]


def test_min_max_clamping():
    assert len(one(PROBS, policy="top_p", p=0.99, max_experts=2)) == 2
    assert len(one(PROBS, policy="top_p", p=0.1, min_experts=3)) == 3
    assert len(one(PROBS, policy="threshold", threshold=0.01, max_experts=3)) == 3
    assert len(one(PROBS, policy="threshold", threshold=0.9, min_experts=2)) == 2
    assert len(one(PROBS, policy="top_k", k=4, max_experts=2)) == 2
    assert len(one(PROBS, policy="top_k", k=1, min_experts=3)) == 3
    assert len(one(PROBS, policy="top_p", p=0.1, min_experts=3, max_experts=3)) == 3
    # min_experts above E is capped at E
    assert len(one(PROBS, policy="threshold", threshold=0.9, min_experts=9)) == 4


def test_min_experts_zero_gives_empty_tokens():
    probs = probs_tensor([PROBS, [0.9, 0.05, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]])
    rule = CheckpointRule(num_experts=4, top_k=2)
    a = route_probs(probs, RoutingBatch.single(RoutingConfig(policy="threshold", threshold=0.4, min_experts=0)), rule)
    check_invariants(a)
    assert a.experts_per_token().tolist() == [1, 1, 0]
    assert a.token_offsets.tolist() == [0, 1, 2, 2]
    assert a.token_ids.tolist() == [0, 1]
    assert a.to_dense()[2].tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------- mixed batches


MIXED = [
    RoutingConfig(policy="top_k", renormalize=True),
    RoutingConfig(policy="top_p", p=0.6, max_experts=5),
    RoutingConfig(policy="threshold", threshold=0.15, min_experts=0),
    RoutingConfig(policy="top_k", k=3),
]


@pytest.mark.parametrize("rule_renorm", [False, True])
@pytest.mark.parametrize("E,top_k", [(8, 2), (60, 6)])
def test_mixed_batch_equals_each_config_routed_alone(rule_renorm, E, top_k):
    torch.manual_seed(2)
    T = 40
    logits = torch.randn(T, E) * 2
    rule = CheckpointRule(num_experts=E, top_k=top_k, renormalize=rule_renorm)
    index = torch.randint(0, len(MIXED), (T,))
    index[: len(MIXED)] = torch.arange(len(MIXED))  # every config present
    mixed = route(logits, RoutingBatch(list(MIXED), index), rule)
    check_invariants(mixed, positive=True)
    got = pairs(mixed)
    for c, cfg in enumerate(MIXED):
        rows = (index == c).nonzero().flatten()
        alone = pairs(route(logits[rows], RoutingBatch.single(cfg), rule))
        for i, t in enumerate(rows.tolist()):
            assert got[t] == alone[i], (cfg, t)  # exact: same experts, same order, same float weights


def test_mixed_batch_counts_by_hand():
    probs = probs_tensor([PROBS, PROBS, PROBS, [0.05, 0.15, 0.3, 0.5]])
    configs = [
        RoutingConfig(policy="top_p", p=0.6),  # 2 experts
        RoutingConfig(policy="threshold", threshold=0.6, min_experts=0),  # 0 experts
        RoutingConfig(policy="top_k", k=3),  # 3 experts
    ]
    batch = RoutingBatch(configs, torch.tensor([0, 1, 2, 0]))
    a = route_probs(probs, batch, CheckpointRule(num_experts=4, top_k=2))
    check_invariants(a)
    assert a.experts_per_token().tolist() == [2, 0, 3, 2]
    assert pairs(a)[3] == [(3, pytest.approx(0.5)), (2, pytest.approx(0.3))]
    assert pairs(a)[2] == [(0, pytest.approx(0.5)), (1, pytest.approx(0.3)), (2, pytest.approx(0.15))]
    # usage: two sequences [tokens 0..1], [tokens 2..3], two identical MoE layers
    counts = [a.experts_per_token(), a.experts_per_token()]
    per_seq = sequence_layer_counts(counts, torch.tensor([0, 2, 4]))
    assert per_seq.tolist() == [[2, 2], [5, 5]]
    assert experts_per_token_histogram(counts, 4).tolist() == [[1, 0, 2, 1, 0]] * 2


def test_batch_from_per_sequence_routes_each_sequence_by_its_config():
    torch.manual_seed(3)
    logits = torch.randn(6, 4)
    cfgs = [RoutingConfig(policy="top_p", p=0.999, max_experts=4), RoutingConfig(policy="top_k", k=1)]
    batch = RoutingBatch.from_per_sequence(cfgs, [2, 4])
    a = route(logits, batch, CheckpointRule(num_experts=4, top_k=2))
    assert a.experts_per_token().tolist() == [4, 4, 1, 1, 1, 1]


@pytest.mark.parametrize("cfg", MIXED)
def test_random_routing_invariants_and_empty_batch(cfg):
    torch.manual_seed(4)
    rule = CheckpointRule(num_experts=16, top_k=4, renormalize=True)
    a = route(torch.randn(64, 16) * 2, RoutingBatch.single(cfg), rule)
    check_invariants(a)
    dense = a.to_dense()
    if cfg.renormalize is not False:
        nonempty = a.experts_per_token() > 0
        torch.testing.assert_close(dense.sum(1)[nonempty], torch.ones(int(nonempty.sum())))
    empty = route(torch.zeros(0, 16), RoutingBatch.single(cfg), rule)
    assert empty.num_tokens == 0 and empty.num_pairs == 0 and empty.token_offsets.tolist() == [0]


# ---------------------------------------------------------------- native dynamic routing


def test_relu_route_known_input():
    out = torch.tensor([[0.5, -1.0, 0.0, 2.0], [-0.1, -0.2, -0.3, -0.4], [1.0, 1.0, 1.0, 1.0]])
    a = relu_route(out)
    check_invariants(a)
    assert a.experts_per_token().tolist() == [2, 0, 4]
    assert pairs(a) == [[(0, 0.5), (3, 2.0)], [], [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0)]]


def test_zero_experts_longcat_style_identity():
    # 3 FFN experts + 2 identity experts; raw probabilities, top-2, scaled, no renormalisation
    probs = probs_tensor(
        [
            [0.4, 0.1, 0.05, 0.3, 0.15],  # FFN 0 + identity 3
            [0.05, 0.1, 0.05, 0.5, 0.3],  # identity 3 + identity 4: no FFN work
            [0.1, 0.35, 0.45, 0.05, 0.05],  # FFN 2 + FFN 1
        ]
    )
    a = route_with_zero_experts(probs, 3, "identity", top_k=2, scoring="none", scaling_factor=2.0)
    check_invariants(a)
    assert a.num_experts == 3
    assert a.experts_per_token().tolist() == [1, 0, 2]
    assert pairs(a) == [[(0, pytest.approx(0.8))], [], [(2, pytest.approx(0.9)), (1, pytest.approx(0.7))]]
    torch.testing.assert_close(a.identity_weight, torch.tensor([0.6, 1.6, 0.0]))
    assert a.num_selected.tolist() == [2, 2, 2]


def test_zero_experts_null_kind_and_bias_and_renormalize():
    probs = probs_tensor([[0.4, 0.1, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]])
    # experts 2 ("zero") and 3 ("identity"); the bias pushes expert 1 above 3 for selection only
    bias = torch.tensor([0.0, 0.25, 0.0, 0.0])
    a = route_with_zero_experts(
        probs, 2, ["zero", "identity"], top_k=2, scoring="none", selection_bias=bias, renormalize=True
    )
    check_invariants(a)
    # token 0: scores+bias = [.4,.35,.3,.2] -> experts 0, 1 (weights unbiased .4, .1, renormalised)
    # token 1: scores+bias = [.1,.45,.3,.4] -> experts 1, 3 (identity): .2/.6, .4/.6
    assert pairs(a) == [[(0, pytest.approx(0.8)), (1, pytest.approx(0.2))], [(1, pytest.approx(1 / 3))]]
    torch.testing.assert_close(a.identity_weight, torch.tensor([0.0, 2 / 3]))
    # a "zero" pick contributes nothing and is left out of the renormalisation
    b = route_with_zero_experts(probs[1:], 2, ["zero", "identity"], top_k=3, scoring="none", renormalize=True)
    assert pairs(b) == [[(1, pytest.approx(0.2 / 0.6))]]
    torch.testing.assert_close(b.identity_weight, torch.tensor([0.4 / 0.6]))
    # only null experts: no identity weight at all
    c = route_with_zero_experts(torch.randn(4, 6), 4, "zero", top_k=2)
    assert c.identity_weight is None
    assert bool((c.experts_per_token() <= 2).all())


def test_zero_experts_softmax_scoring_matches_probabilities():
    torch.manual_seed(5)
    logits = torch.randn(7, 6)
    a = route_with_zero_experts(logits, 4, ["identity", "zero"], top_k=3)
    b = route_with_zero_experts(torch.softmax(logits, -1), 4, ["identity", "zero"], top_k=3, scoring="none")
    assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.token_offsets, b.token_offsets)
    torch.testing.assert_close(a.weights, b.weights)
    with pytest.raises(ValueError):
        route_with_zero_experts(logits, 4, ["identity"], top_k=2)


# ---------------------------------------------------------------- usage accounting


def test_sequence_layer_counts_match_naive_loop():
    torch.manual_seed(6)
    L, E = 3, 8
    qsl = torch.tensor([0, 3, 3, 4, 11])  # includes an empty sequence
    counts = [torch.randint(0, E + 1, (11,)) for _ in range(L)]
    got = sequence_layer_counts(counts, qsl)
    assert got.dtype == torch.int64 and got.shape == (4, L)
    for b in range(4):
        for layer in range(L):
            assert int(got[b, layer]) == int(counts[layer][qsl[b] : qsl[b + 1]].sum())
    hist = experts_per_token_histogram(counts, E)
    assert hist.shape == (L, E + 1)
    for layer in range(L):
        for j in range(E + 1):
            assert int(hist[layer, j]) == int((counts[layer] == j).sum())
    assert sequence_layer_counts([], qsl).shape == (4, 0)


def test_usage_accumulator_totals():
    acc = ExpertUsageAccumulator(num_moe_layers=2, num_experts=4)
    s1 = acc.add_step([torch.tensor([1, 2, 0]), torch.tensor([4, 4, 1])], torch.tensor([0, 1, 3]))
    s2 = acc.add_step([torch.tensor([3]), torch.tensor([2])], torch.tensor([0, 1]))
    assert s1.tolist() == [[1, 4], [2, 5]] and s2.tolist() == [[3, 2]]
    assert acc.activations_per_layer().tolist() == [6, 11]
    assert acc.tokens_per_layer().tolist() == [4, 4]
    assert acc.histogram[1].tolist() == [0, 1, 1, 0, 2]
    avg = acc.activations_per_layer().sum().item() / acc.tokens_per_layer().sum().item()
    assert math.isclose(avg, 17 / 8)


def test_nan_router_logits_give_valid_pairs_with_zero_weight():
    """A token whose router logits are NaN (or +inf) keeps valid expert ids and weight 0, whatever
    the policy, so no NaN reaches the expert GEMMs and the others' routing is unchanged."""
    import math

    from dynserve.config import RoutingConfig as RC
    from dynserve.routing.base import CheckpointRule, RoutingBatch
    from dynserve.routing.policies import route

    E = 8
    logits = torch.randn(4, E, generator=torch.Generator().manual_seed(0))
    logits[1] = math.nan
    logits[2, 3] = math.inf
    rule = CheckpointRule(num_experts=E, top_k=2, renormalize=True)
    for cfg in (RC(), RC(policy="top_p", p=0.5), RC(policy="threshold", threshold=0.1, min_experts=1)):
        a = route(logits, RoutingBatch.single(cfg), rule)
        assert torch.isfinite(a.weights).all(), cfg
        assert ((a.expert_ids >= 0) & (a.expert_ids < E)).all()
        clean = route(logits[[0, 3]], RoutingBatch.single(cfg), rule)
        ok = (a.token_ids == 0) | (a.token_ids == 3)
        assert torch.equal(a.expert_ids[ok], clean.expert_ids)
