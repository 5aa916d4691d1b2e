"""Routing policies: router logits [T, E] + RoutingBatch -> Assignment.

Engine-core version: the checkpoint's top-k rule only. (Adaptive policies extend `route`.)
"""

from __future__ import annotations

import torch

from dynserve.routing.base import Assignment, CheckpointRule, RoutingBatch


def checkpoint_top_k(router_logits: torch.Tensor, rule: CheckpointRule, k: int | None = None) -> Assignment:
    """The checkpoint's own rule: softmax in float32, top-k, optional renormalisation."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    k = min(k or rule.top_k, rule.num_experts)
    topk_w, topk_ids = torch.topk(probs, k, dim=-1)  # [T, k]
    if rule.renormalize:
        topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
    return Assignment.from_topk(topk_ids, topk_w, rule.num_experts)


def route(router_logits: torch.Tensor, batch: RoutingBatch, rule: CheckpointRule) -> Assignment:
    """Route every token of a batch by its own RoutingConfig."""
    cfg = batch.configs[0]
    return checkpoint_top_k(router_logits, rule, cfg.k)
