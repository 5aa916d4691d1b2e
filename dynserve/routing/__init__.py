"""routing/: routing policies and the Assignment they produce; expert usage accounting."""

from __future__ import annotations

from dynserve.routing.base import Assignment, CheckpointRule, RoutingBatch
from dynserve.routing.policies import route

__all__ = ["Assignment", "CheckpointRule", "RoutingBatch", "route"]
