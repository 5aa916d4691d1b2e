"""Expert usage accounting, the one place it lives: per-step counts from the MoE layers ->
per-sequence sums (`SequenceUsage`, reported as `ExpertUsage`) and engine-wide totals
(`ExpertUsageAccumulator`: the experts-per-token histogram and per-expert token counts behind the
metrics). The runner reduces each step, the engine credits sequences, outputs and metrics read.

What is counted: during a forward pass every MoE layer appends `Assignment.experts_per_token()`
([T] int64) to `ForwardBatch.expert_counts`, i.e. for each token position *computed in this step*
(prefill chunk tokens and decode tokens; prefix-cached positions are not computed, so not counted)
the number of routed FFN experts it used in that layer. Zero-computation experts (zero / identity)
and shared experts are not counted. A step's counts therefore form an [L, T] table (L = MoE
layers), which this module reduces without a Python loop over tokens or sequences.
A request's usage counts each token position once: positions recomputed after a preemption are
skipped (so usage does not depend on server load); the engine-wide histogram counts every token
the MoE layers computed, recomputations included (that is the work done).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ExpertUsage:
    """Experts a request used. expert_activations = sum over its computed token positions and MoE
    layers of FFN experts used; avg_experts_per_token = that / (tokens x MoE layers);
    per_layer[l] = activations in MoE layer l."""

    expert_activations: int = 0
    avg_experts_per_token: float = 0.0
    per_layer: list[int] = field(default_factory=list)
    num_tokens: int = 0  # token positions routed (per layer)
    # the smallest load-adaptive expert budget factor applied to the request's sequences (1.0: never
    # reduced; see dynserve/engine/budget.py)
    expert_budget_min: float = 1.0

    @classmethod
    def from_counts(cls, per_layer: list[int], num_tokens: int) -> ExpertUsage:
        total = int(sum(per_layer))
        denom = num_tokens * len(per_layer)
        return cls(total, total / denom if denom else 0.0, list(per_layer), num_tokens)

    @classmethod
    def merge(cls, usages: list[ExpertUsage]) -> ExpertUsage:
        if not usages:
            return cls()
        n_layers = max(len(u.per_layer) for u in usages)
        per_layer = [sum(u.per_layer[i] if i < len(u.per_layer) else 0 for u in usages) for i in range(n_layers)]
        merged = cls.from_counts(per_layer, sum(u.num_tokens for u in usages))
        merged.expert_budget_min = min(u.expert_budget_min for u in usages)
        return merged


@dataclass
class SequenceUsage:
    """Running expert usage of one sequence; each token position counts once."""

    per_layer: list[int] = field(default_factory=list)  # [L] activations so far
    num_tokens: int = 0  # positions counted
    counted_upto: int = 0  # positions below this are counted (a recompute after preemption skips them)

    @classmethod
    def zeros(cls, num_moe_layers: int) -> SequenceUsage:
        return cls([0] * num_moe_layers)

    def already_counted(self, start: int, n: int) -> int:
        """How many of positions start .. start+n-1 (about to be computed) were counted before."""
        return max(0, min(n, self.counted_upto - start))

    def add(self, start: int, n: int, per_layer: list[int]) -> None:
        """Credit positions start .. start+n-1, whose not-yet-counted ones used `per_layer` experts."""
        self.num_tokens += n - self.already_counted(start, n)
        self.counted_upto = max(self.counted_upto, start + n)
        for layer, c in enumerate(per_layer):
            self.per_layer[layer] += c

    def report(self) -> ExpertUsage:
        return ExpertUsage.from_counts(self.per_layer, self.num_tokens)


def stack_counts(expert_counts: list[torch.Tensor], num_tokens: int | None = None) -> torch.Tensor:
    """[L, T] int64 from the per-layer [T] counts (L may be 0: then `num_tokens` gives T)."""
    if not expert_counts:
        return torch.zeros(0, num_tokens or 0, dtype=torch.int64)
    return torch.stack([c if c.dtype is torch.int64 else c.to(torch.int64) for c in expert_counts])  # [L, T]


def sequence_layer_counts(
    expert_counts: list[torch.Tensor] | torch.Tensor, query_start_loc: torch.Tensor, skip: list[int] | None = None
) -> torch.Tensor:
    """[B, L] int64: expert activations of each sequence of a step in each MoE layer.

    `query_start_loc` [B+1] (cumulative query lengths, as in ForwardBatch) splits the T tokens
    into sequences; entry [b, l] = sum over sequence b's tokens of FFN experts used in layer l,
    leaving out its first `skip[b]` tokens (positions counted before). Computed with one
    cumulative sum over tokens and a difference at the sequence boundaries.
    """
    B = max(int(query_start_loc.numel()) - 1, 0)
    counts = expert_counts if isinstance(expert_counts, torch.Tensor) else stack_counts(expert_counts)  # [L, T]
    if counts.shape[0] == 0:
        return torch.zeros(B, 0, dtype=torch.int64, device=query_start_loc.device)
    L = counts.shape[0]
    if counts.shape[1] == B and not (skip is not None and any(skip)) and _one_token_each(query_start_loc):
        return counts.T.contiguous()  # [B, L]: a decode step, one token per sequence
    csum = torch.zeros(L, counts.shape[1] + 1, dtype=torch.int64, device=counts.device)  # [L, T+1]
    csum[:, 1:] = torch.cumsum(counts, dim=1)
    qsl = query_start_loc.to(counts.device, torch.int64)  # [B+1]
    starts = qsl[:-1]  # [B]
    if skip is not None and any(skip):
        starts = starts + torch.tensor(skip, dtype=torch.int64, device=counts.device)
    return (csum[:, qsl[1:]] - csum[:, starts]).T.contiguous()  # [B, L]


def _one_token_each(query_start_loc: torch.Tensor) -> bool:
    """Whether every sequence of the step has exactly one token (query_start_loc = 0, 1, ..., B): a
    decode step. Host tensors only (a device tensor would need a sync to tell: then False)."""
    if query_start_loc.is_cuda:
        return False
    n = int(query_start_loc.numel())
    return torch.equal(query_start_loc.to(torch.int64), torch.arange(n, dtype=torch.int64))


def experts_per_token_histogram(expert_counts: list[torch.Tensor] | torch.Tensor, num_experts: int) -> torch.Tensor:
    """[L, E+1] int64: entry [l, j] = number of token positions that used exactly j FFN experts in
    MoE layer l (j in 0..E; counts must lie in that range). One bincount over all layers.
    `expert_counts`: the per-layer [T] counts, or already stacked [L, T]."""
    counts = expert_counts if isinstance(expert_counts, torch.Tensor) else stack_counts(expert_counts)  # [L, T]
    L = counts.shape[0]
    if L == 0:
        return torch.zeros(0, num_experts + 1, dtype=torch.int64)
    width = num_experts + 1
    layer_base = torch.arange(L, device=counts.device, dtype=torch.int64)[:, None] * width  # [L, 1]
    flat = (counts + layer_base).reshape(-1)  # [L*T]
    return torch.bincount(flat, minlength=L * width).reshape(L, width)  # [L, E+1]


class ExpertUsageAccumulator:
    """Owns running usage totals across engine steps, kept on the counts' device (no host sync per
    step): the experts-per-token histogram [L, E+1] and, when asked for (high cardinality), the
    token positions routed to each expert [L, E]. The per-sequence [B, L] sums of each step are
    returned by `add_step` for the engine to credit (`SequenceUsage.add`).
    """

    def __init__(self, num_moe_layers: int, num_experts: int, record_expert_tokens: bool = False) -> None:
        self.num_moe_layers = num_moe_layers
        self.num_experts = num_experts
        self.record_expert_tokens = record_expert_tokens
        self.reset()

    def reset(self) -> None:
        L, E = self.num_moe_layers, self.num_experts
        self.histogram = torch.zeros(L, E + 1, dtype=torch.int64)  # [L, E+1]
        self.expert_tokens = torch.zeros(L, E, dtype=torch.int64) if self.record_expert_tokens else None  # [L, E]
        self.num_steps = 0

    def add_step(
        self,
        expert_counts: list[torch.Tensor],
        query_start_loc: torch.Tensor,
        skip: list[int] | None = None,
        expert_token_counts: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Add one step's per-layer counts (and per-expert token counts, [E] per layer); return
        its per-sequence sums [B, L] int64, leaving out each sequence's first `skip[b]` tokens."""
        stacked = stack_counts(expert_counts)  # [L, T], once for both sums below
        hist = experts_per_token_histogram(stacked, self.num_experts)  # [L, E+1]
        if hist.shape[0]:
            if self.histogram.device != hist.device or self.histogram.shape != hist.shape:
                if self.histogram.shape != hist.shape:
                    raise ValueError(f"expected {self.num_moe_layers} MoE layers, got {hist.shape[0]}")
                self.histogram = self.histogram.to(hist.device)
            self.histogram += hist
        if self.expert_tokens is not None and expert_token_counts:
            step = torch.stack(expert_token_counts)  # [L, E]
            self.expert_tokens = self.expert_tokens.to(step.device) + step
        self.num_steps += 1
        return sequence_layer_counts(stacked, query_start_loc, skip)

    def total_activations(self) -> int:
        return int(self.activations_per_layer().sum())

    def activations_per_layer(self) -> torch.Tensor:
        """[L] int64: total FFN expert activations per MoE layer since the last reset."""
        j = torch.arange(self.num_experts + 1, device=self.histogram.device, dtype=torch.int64)  # [E+1]
        return (self.histogram * j).sum(dim=1)

    def tokens_per_layer(self) -> torch.Tensor:
        """[L] int64: token positions routed per MoE layer since the last reset."""
        return self.histogram.sum(dim=1)


__all__ = [
    "ExpertUsage",
    "ExpertUsageAccumulator",
    "SequenceUsage",
    "experts_per_token_histogram",
    "sequence_layer_counts",
    "stack_counts",
]
