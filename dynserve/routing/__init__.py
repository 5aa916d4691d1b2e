"""routing/: routing policies and the Assignment they produce; expert usage accounting."""

from __future__ import annotations

from dynserve.routing.base import Assignment, CheckpointRule, RouterRecord, RoutingBatch
from dynserve.routing.policies import (
    ZERO_EXPERT_KINDS,
    checkpoint_top_k,
    relu_route,
    route,
    route_grouped,
    route_probs,
    route_sigmoid,
    route_with_zero_experts,
    router_probs,
)
from dynserve.routing.usage import (
    ExpertUsageAccumulator,
    experts_per_token_histogram,
    sequence_layer_counts,
    stack_counts,
)

__all__ = [
    "Assignment",
    "CheckpointRule",
    "ExpertUsageAccumulator",
    "RouterRecord",
    "RoutingBatch",
    "ZERO_EXPERT_KINDS",
    "checkpoint_top_k",
    "experts_per_token_histogram",
    "relu_route",
    "route",
    "route_grouped",
    "route_probs",
    "route_sigmoid",
    "route_with_zero_experts",
    "router_probs",
    "sequence_layer_counts",
    "stack_counts",
]
