"""Expert load: how evenly a step's tokens spread over the experts, on by default and bounded.

Owns:
  - `ExpertLoadTracker`: per-step [L, E] token counts kept in a ring of the last `window_steps` engine
    steps on the counts' device (no host sync per step), giving per MoE layer the balance mean/max
    tokens per expert over the window (vLLM EPLB's "balancedness": 1.0 = perfectly even), and the
    histogram [L, E+1] of distinct experts a step touched per layer (what decides how many expert
    weights a decode step reads).
  - `ExpertDistributionRecorder`: start / stop / dump of per-layer per-expert token counts over a
    recording, optionally per request id; thread-safe (the HTTP endpoints call it from the event loop
    while the engine thread adds steps).
  - `sequence_expert_counts`: a step's [B, L, E] counts per sequence (only while recording).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from dynserve.routing.base import Assignment

DEFAULT_WINDOW_STEPS = 128
MAX_RECORDED_REQUESTS = 4096  # per-request counts kept by one recording (bounded memory)


class ExpertLoadTracker:
    """Owns the sliding window of per-expert token counts and the distinct-experts histogram."""

    def __init__(self, num_moe_layers: int, num_experts: int, window_steps: int = DEFAULT_WINDOW_STEPS) -> None:
        if window_steps < 1:
            raise ValueError(f"window_steps must be >= 1, got {window_steps}")
        self.num_moe_layers = num_moe_layers
        self.num_experts = num_experts
        self.window_steps = window_steps
        self._ring: torch.Tensor | None = None  # [W, L, E] int64, on the counts' device
        self._touched: torch.Tensor | None = None  # [L, E+1] int64
        self._next = 0

    def add_step(self, counts: torch.Tensor) -> None:
        """Add one step's token counts per layer and expert `counts` [L, E] (device ops only)."""
        if counts.numel() == 0:
            return
        if self._ring is None or self._ring.device != counts.device:
            L, E = counts.shape
            self._ring = torch.zeros(self.window_steps, L, E, dtype=torch.int64, device=counts.device)
            self._touched = torch.zeros(L, E + 1, dtype=torch.int64, device=counts.device)
        assert self._touched is not None
        self._ring[self._next % self.window_steps].copy_(counts)
        self._next += 1
        distinct = (counts > 0).sum(dim=1, keepdim=True)  # [L, 1]
        self._touched.scatter_add_(1, distinct, torch.ones_like(distinct))

    def balance(self) -> list[float | None]:
        """Per MoE layer, mean / max tokens per expert over the window (None: no token yet)."""
        if self._ring is None:
            return [None] * self.num_moe_layers
        window = self._ring.sum(dim=0).float()  # [L, E]
        top = window.max(dim=1).values  # [L]
        ratio = (window.mean(dim=1) / top.clamp_min(1.0)).tolist()  # [L]
        return [r if t > 0 else None for r, t in zip(ratio, top.tolist(), strict=True)]

    def touched_histogram(self) -> list[list[int]]:
        """[L][E+1]: steps in which a layer's tokens touched exactly j distinct experts, j = 0..E."""
        if self._touched is None:
            return [[0] * (self.num_experts + 1) for _ in range(self.num_moe_layers)]
        return self._touched.tolist()


def sequence_expert_counts(
    assignments: list[Assignment], query_start_loc: list[int], skip: list[int], num_experts: int
) -> torch.Tensor:
    """[B, L, E] int64 on the host: token positions of each sequence routed to each expert per MoE layer,
    leaving out each sequence's first `skip[b]` tokens (positions counted before)."""
    B, L = len(query_start_loc) - 1, len(assignments)
    if L == 0 or B <= 0:
        return torch.zeros(max(B, 0), L, num_experts, dtype=torch.int64)
    device = assignments[0].expert_ids.device
    owner = [B] * query_start_loc[-1]  # [T] sequence of each token; B collects the tokens left out
    for b in range(B):
        start, end = query_start_loc[b] + skip[b], query_start_loc[b + 1]
        owner[start:end] = [b] * max(0, end - start)
    owner_t = torch.tensor(owner, dtype=torch.int64, device=device)  # [T]
    out = torch.zeros(L, B + 1, num_experts, dtype=torch.int64, device=device)  # [L, B+1, E]
    for layer, a in enumerate(assignments):
        flat = owner_t[a.token_ids] * num_experts + a.expert_ids  # [P]
        out[layer].view(-1).index_add_(0, flat, torch.ones_like(flat))
    return out[:, :B].permute(1, 0, 2).cpu()  # [B, L, E]


class ExpertDistributionRecorder:
    """Per-layer per-expert token counts between `start()` and `stop()`, and per request id when asked
    (`dump(per_request=True)`): every computed token position counts (recomputations after preemption
    included) in the totals; per request, each position once (as its usage). Thread-safe."""

    def __init__(self, num_moe_layers: int, num_experts: int) -> None:
        self.num_moe_layers = num_moe_layers
        self.num_experts = num_experts
        self._lock = threading.Lock()
        self._recording = False
        self._reset()

    def _reset(self) -> None:
        self._counts = torch.zeros(self.num_moe_layers, self.num_experts, dtype=torch.int64)  # [L, E]
        self._per_request: dict[str, torch.Tensor] = {}  # request id -> [L, E]
        self._dropped_requests = 0
        self._num_tokens = 0
        self._num_steps = 0
        self._started: float | None = None
        self._stopped: float | None = None

    @property
    def recording(self) -> bool:
        return self._recording

    def start(self) -> None:
        """Start a new recording (what an earlier one recorded is dropped)."""
        with self._lock:
            self._reset()
            self._started = time.time()
            self._recording = True

    def stop(self) -> None:
        with self._lock:
            if self._recording:
                self._recording = False
                self._stopped = time.time()

    def add_step(self, counts: torch.Tensor, num_tokens: int, per_request: list[tuple[str, torch.Tensor]]) -> None:
        """One step: `counts` [L, E] (host), its token positions, and (request id, [L, E]) per sequence."""
        with self._lock:
            if not self._recording:
                return
            self._counts += counts
            self._num_tokens += num_tokens
            self._num_steps += 1
            for rid, c in per_request:
                mine = self._per_request.get(rid)
                if mine is not None:
                    mine += c
                elif len(self._per_request) < MAX_RECORDED_REQUESTS:
                    self._per_request[rid] = c.clone()
                else:
                    self._dropped_requests += 1

    def dump(self, per_request: bool = False) -> dict[str, Any]:
        """The recording as JSON-ready data (see the README's "Expert load" section)."""
        with self._lock:
            out: dict[str, Any] = {
                "recording": self._recording,
                "start_time": self._started,
                "stop_time": self._stopped,
                "num_steps": self._num_steps,
                "num_moe_layers": self.num_moe_layers,
                "num_experts": self.num_experts,
                "num_tokens": self._num_tokens,
                "expert_tokens": self._counts.tolist(),
            }
            if per_request:
                out["per_request"] = {rid: c.tolist() for rid, c in self._per_request.items()}
                out["per_request_dropped"] = self._dropped_requests
            return out


__all__ = [
    "DEFAULT_WINDOW_STEPS",
    "ExpertDistributionRecorder",
    "ExpertLoadTracker",
    "sequence_expert_counts",
]
