"""Batch-aware expert selection (`--max-active-experts N`): a step's MoE layer touches at most N
distinct experts besides tokens' top-1 picks; moved pairs go to the token's best expert in the set."""

from __future__ import annotations

import pytest
import torch

from dynserve import LLM, SamplingParams
from dynserve.config import RoutingConfig
from dynserve.routing import CheckpointRule, RoutingBatch, route


def pairs_of(a, t):
    lo, hi = int(a.token_offsets[t]), int(a.token_offsets[t + 1])
    return list(zip(a.expert_ids[lo:hi].tolist(), a.weights[lo:hi].tolist(), strict=True))


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("N", [1, 2, 3, 5])
def test_at_most_n_experts_besides_top1_and_moves_to_the_best_in_set(N, renormalize):
    torch.manual_seed(N)
    T, E = 40, 8
    logits = torch.randn(T, E) * 2
    rule = CheckpointRule(num_experts=E, top_k=3, renormalize=renormalize)
    free = route(logits, RoutingBatch.single(RoutingConfig()), rule)
    batch = RoutingBatch.single(RoutingConfig())
    batch.max_active_experts = N
    a = route(logits, batch, rule)
    probs = torch.softmax(logits, dim=-1)
    counts = torch.bincount(free.expert_ids, minlength=E)
    in_set = set(torch.topk(counts, N).indices.tolist())
    top1 = {pairs_of(free, t)[0][0] for t in range(T)}
    assert set(a.expert_ids.tolist()) <= in_set | top1
    for t in range(T):
        before, after = pairs_of(free, t), pairs_of(a, t)
        assert after[0] == before[0] or renormalize  # the top-1 pick never moves
        assert after[0][0] == before[0][0]
        ids = [e for e, _ in after]
        assert len(ids) == len(set(ids)) <= 3  # no expert twice, never more pairs than before
        stayed = [e for e, _ in before[1:] if e in in_set]
        moved = [e for e in ids[1:] if e not in stayed]
        # moved pairs took the most probable in-set experts the token did not use already
        options = sorted((e for e in in_set if e not in {before[0][0], *stayed}), key=lambda e: -probs[t, e])
        assert moved == options[: len(moved)]
        if renormalize:
            assert sum(w for _, w in after) == pytest.approx(1.0, rel=1e-5)
        else:
            for e, w in after:
                assert w == pytest.approx(float(probs[t, e]), rel=1e-5)


def test_fixed_requests_keep_their_pairs_and_excluded_experts_are_never_destinations():
    torch.manual_seed(0)
    T, E = 30, 8
    logits = torch.randn(T, E)
    rule = CheckpointRule(num_experts=E, top_k=2)
    configs = [RoutingConfig(exclude_experts=[0, 1, 2]), RoutingConfig(budget="fixed")]
    index = torch.arange(T) % 2
    batch = RoutingBatch(configs, index)
    free = route(logits, batch, rule)
    batch = RoutingBatch(configs, index)
    batch.max_active_experts = 2
    a = route(logits, batch, rule)
    for t in range(T):
        if t % 2:  # fixed
            assert pairs_of(a, t) == pairs_of(free, t)
        else:
            assert not {e for e, _ in pairs_of(a, t)} & {0, 1, 2}


def test_engine_flag_cuts_distinct_experts_and_keeps_serving(checkpoint_factory):
    llm = LLM(str(checkpoint_factory("mixtral")), num_kv_blocks=128, max_num_seqs=8, max_active_experts=1)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=[[5 + i, 6, 7, 8 + i] for i in range(8)], sampling_params=sp)
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    with pytest.raises(ValueError, match="max_active_experts"):
        LLM(str(checkpoint_factory("mixtral")), max_active_experts=0)


def test_lockstep_quality_bench_sees_fewer_distinct_experts(checkpoint_factory):
    from dynserve.bench.active_experts import lockstep_perplexity
    from dynserve.config import EngineConfig

    ids = [(7 * i) % 300 + 5 for i in range(64)]
    out = {}
    for n in (None, 1):
        cfg = EngineConfig.create(str(checkpoint_factory("mixtral")), max_active_experts=n)
        out[n] = lockstep_perplexity(cfg, ids, batch=4, window=12)
    (ppl_off, distinct_off), (ppl_1, distinct_1) = out[None], out[1]
    assert 1.0 < ppl_off < 1e4 and 1.0 < ppl_1 < 1e4
    assert distinct_1 < distinct_off <= 4  # the tiny model has 4 experts
