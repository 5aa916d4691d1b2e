"""Roofline arithmetic of the decode benchmark: bytes and FLOPs per step from a loaded model."""

from __future__ import annotations

import pytest

from dynserve import LLM
from dynserve.bench.roofline import ModelCost, report


@pytest.fixture(scope="module")
def model(mixtral_dir):
    llm = LLM(str(mixtral_dir), num_kv_blocks=16)
    yield llm.engine.runner.model
    llm.engine.close()


def test_cost_counts_one_expert_per_pick_and_one_embedding_row(model):
    cfg = model.config
    cost = ModelCost.of(model)
    H, inter, E = cfg.hidden_size, cfg.hf["intermediate_size"], cfg.num_experts
    assert (cost.num_moe_layers, cost.num_experts) == (cfg.num_layers, E)
    assert cost.expert_params == 3 * H * inter and cost.expert_bytes == 4 * 3 * H * inter
    total = sum(p.numel() for p in model.parameters())
    embed = cfg.vocab_size * H
    # every parameter is either dense, one of the E experts of a layer, or the embedding table
    assert cost.dense_params + cost.num_moe_layers * E * cost.expert_params + embed == total
    # batch 1 with k experts reads k experts per layer; a huge batch reads all of them
    assert cost.step_bytes(1, 2) == cost.dense_bytes + cfg.num_layers * 2 * cost.expert_bytes
    assert cost.step_bytes(10_000, 2) == pytest.approx(cost.dense_bytes + cfg.num_layers * E * cost.expert_bytes)
    # fewer experts per token: fewer FLOPs
    assert cost.token_flops(1, 10) < cost.token_flops(2, 10)


def test_report_ratios(model):
    cost = ModelCost.of(model)
    nbytes = cost.step_bytes(1, 2)
    # a step that takes exactly twice the streaming time: half the bandwidth, half the step outside
    step = 2 * nbytes / 10e9
    r = report(cost, step_s=step, batch=1, experts_per_token=2, context=8, bandwidth_gb_s=10, peak_gflops=1)
    assert r["bandwidth_ratio"] == pytest.approx(0.5) and r["outside_weight_reads_share"] == pytest.approx(0.5)
    assert r["achieved_gb_s"] == pytest.approx(5.0)
