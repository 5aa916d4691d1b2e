"""Expert usage accounting: per-step counts from the MoE layers -> per-sequence sums and histograms.

What is counted: during a forward pass every MoE layer appends `Assignment.experts_per_token()`
([T] int64) to `ForwardBatch.expert_counts`, i.e. for each token position *computed in this step*
(prefill chunk tokens and decode tokens; prefix-cached positions are not computed, so not counted)
the number of routed FFN experts it used in that layer. Zero-computation experts (zero / identity)
and shared experts are not counted. A step's counts therefore form an [L, T] table (L = MoE
layers), which this module reduces without a Python loop over tokens or sequences.
"""

from __future__ import annotations

import torch


def stack_counts(expert_counts: list[torch.Tensor], num_tokens: int | None = None) -> torch.Tensor:
    """[L, T] int64 from the per-layer [T] counts (L may be 0: then `num_tokens` gives T)."""
    if not expert_counts:
        return torch.zeros(0, num_tokens or 0, dtype=torch.int64)
    return torch.stack([c.to(torch.int64) for c in expert_counts])  # [L, T]


def sequence_layer_counts(expert_counts: list[torch.Tensor], query_start_loc: torch.Tensor) -> torch.Tensor:
    """[B, L] int64: expert activations of each sequence of a step in each MoE layer.

    `query_start_loc` [B+1] (cumulative query lengths, as in ForwardBatch) splits the T tokens
    into sequences; entry [b, l] = sum over sequence b's tokens of FFN experts used in layer l.
    Computed with one cumulative sum over tokens and a difference at the sequence boundaries.
    """
    B = max(int(query_start_loc.numel()) - 1, 0)
    if not expert_counts:
        return torch.zeros(B, 0, dtype=torch.int64, device=query_start_loc.device)
    counts = stack_counts(expert_counts)  # [L, T]
    L = counts.shape[0]
    csum = torch.zeros(L, counts.shape[1] + 1, dtype=torch.int64, device=counts.device)  # [L, T+1]
    csum[:, 1:] = torch.cumsum(counts, dim=1)
    at = csum[:, query_start_loc.to(counts.device, torch.int64)]  # [L, B+1]
    return (at[:, 1:] - at[:, :-1]).T.contiguous()  # [B, L]


def experts_per_token_histogram(expert_counts: list[torch.Tensor], num_experts: int) -> torch.Tensor:
    """[L, E+1] int64: entry [l, j] = number of token positions that used exactly j FFN experts in
    MoE layer l (j in 0..E; counts must lie in that range). One bincount over all layers."""
    counts = stack_counts(expert_counts)  # [L, T]
    L = counts.shape[0]
    if L == 0:
        return torch.zeros(0, num_experts + 1, dtype=torch.int64)
    width = num_experts + 1
    layer_base = torch.arange(L, device=counts.device, dtype=torch.int64)[:, None] * width  # [L, 1]
    flat = (counts + layer_base).reshape(-1)  # [L*T]
    return torch.bincount(flat, minlength=L * width).reshape(L, width)  # [L, E+1]


class ExpertUsageAccumulator:
    """Owns running usage totals across engine steps, kept on the counts' device (no host sync per
    step): the experts-per-token histogram [L, E+1] and total activations per layer [L]. The
    per-sequence [B, L] sums of each step are returned by `add_step` for the engine to credit.
    """

    def __init__(self, num_moe_layers: int, num_experts: int) -> None:
        self.num_moe_layers = num_moe_layers
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.histogram = torch.zeros(self.num_moe_layers, self.num_experts + 1, dtype=torch.int64)  # [L, E+1]
        self.num_steps = 0

    def add_step(self, expert_counts: list[torch.Tensor], query_start_loc: torch.Tensor) -> torch.Tensor:
        """Add one step's per-layer counts; return its per-sequence sums [B, L] int64."""
        hist = experts_per_token_histogram(expert_counts, self.num_experts)  # [L, E+1]
        if hist.shape[0]:
            if self.histogram.device != hist.device or self.histogram.shape != hist.shape:
                if self.histogram.shape != hist.shape:
                    raise ValueError(f"expected {self.num_moe_layers} MoE layers, got {hist.shape[0]}")
                self.histogram = self.histogram.to(hist.device)
            self.histogram += hist
        self.num_steps += 1
        return sequence_layer_counts(expert_counts, query_start_loc)

    def activations_per_layer(self) -> torch.Tensor:
        """[L] int64: total FFN expert activations per MoE layer since the last reset."""
        j = torch.arange(self.num_experts + 1, device=self.histogram.device, dtype=torch.int64)  # [E+1]
        return (self.histogram * j).sum(dim=1)

    def tokens_per_layer(self) -> torch.Tensor:
        """[L] int64: token positions routed per MoE layer since the last reset."""
        return self.histogram.sum(dim=1)


__all__ = [
    "ExpertUsageAccumulator",
    "experts_per_token_histogram",
    "sequence_layer_counts",
    "stack_counts",
]
