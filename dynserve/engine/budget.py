"""Load-adaptive expert budget: under overload, admit requests with fewer experts per token.

Owns `ExpertBudgetController` (the budget factor
b in [floor, 1] from the load, with hysteresis) and `apply_budget` (a request's routing with b
applied).

The load signal is the one a user reads on the dashboard: requests waiting for a slot (and, with a
target inter-token latency, the decode step time). A step is "over" when requests wait
(`num_waiting > waiting_high`) or the recent decode step time exceeds the ITL target; "under" when
nobody waits and the step time is below `under_itl_fraction` of the target. After `hold_steps`
consecutive over steps b drops by `step_down`; after `hold_steps` consecutive under steps it rises
by `step_up`; anything else holds b. So a steady light load keeps b = 1.0 (outputs equal static
routing), and a steady overload walks b down to the floor and holds it there, without oscillating.

b applies when a sequence is first scheduled (admission): it keeps that routing for life, so its
KV blocks, prefix-cache keys (they hash the routing) and usage all describe one routing. A
preempted sequence is recomputed under the routing it was admitted with.
"""

from __future__ import annotations

import math
from dataclasses import replace

from dynserve.config import BudgetConfig, RoutingConfig


class ExpertBudgetController:
    """b in [floor, 1], updated once per engine step from the load (see the module docstring)."""

    def __init__(self, config: BudgetConfig) -> None:
        self.config = config
        self.budget = 1.0
        self._over = 0  # consecutive over steps
        self._under = 0  # consecutive under steps
        self._itl_ema: float | None = None  # seconds, decode steps only

    def update(self, num_waiting: int, decode_step_s: float | None = None) -> float:
        """Feed one step's load: requests waiting after scheduling and, for a step that decoded, its
        wall time. Returns the new b."""
        c = self.config
        if not c.enabled:
            return 1.0
        if decode_step_s is not None and math.isfinite(decode_step_s):
            self._itl_ema = decode_step_s if self._itl_ema is None else 0.8 * self._itl_ema + 0.2 * decode_step_s
        target = c.target_itl_ms / 1000.0 if c.target_itl_ms is not None else None
        slow = target is not None and self._itl_ema is not None and self._itl_ema > target
        fast = target is None or self._itl_ema is None or self._itl_ema < c.under_itl_fraction * target
        over = num_waiting > c.waiting_high or slow
        under = num_waiting == 0 and fast
        self._over = self._over + 1 if over else 0
        self._under = self._under + 1 if under else 0
        if self._over >= c.hold_steps and self.budget > c.floor:
            self.budget = max(c.floor, round(self.budget - c.step_down, 6))
            self._over = 0
        elif self._under >= c.hold_steps and self.budget < 1.0:
            self.budget = min(1.0, round(self.budget + c.step_up, 6))
            self._under = 0
        return self.budget


def apply_budget(routing: RoutingConfig, b: float, checkpoint_k: int) -> RoutingConfig:
    """`routing` with budget factor b applied (b >= 1, or a request with `budget: "fixed"`: unchanged).

    top_k: k -> max(1, round(k x b)) (k = the request's k or the checkpoint's); top_p: p -> p x b;
    threshold and relative: threshold -> min(1, threshold / b); entropy: every k -> round(k x b),
    at least 1 where it was >= 1. Per-layer lists are scaled value by value; min_experts and
    max_experts are kept (a request that allows 0 experts keeps allowing it, none other reaches 0)."""
    if b >= 1.0 or routing.budget == "fixed":
        return routing

    def each(v: object, fn):  # noqa: ANN001, ANN202
        return tuple(fn(x) for x in v) if isinstance(v, tuple) else fn(v)

    if routing.policy == "top_k":
        k = routing.k if routing.k is not None else checkpoint_k
        return replace(routing, k=each(k, lambda x: max(1, round(x * b))))
    if routing.policy == "top_p":
        return replace(routing, p=each(routing.p, lambda x: max(x * b, 1e-6)))
    if routing.policy in ("threshold", "relative"):
        return replace(routing, threshold=each(routing.threshold, lambda x: min(1.0, x / b)))
    if routing.policy == "entropy":
        return replace(routing, entropy_k=tuple(k if k == 0 else max(1, round(k * b)) for k in routing.entropy_k))
    return routing
