"""EngineStats: a snapshot of engine gauges and cumulative counters, read by metrics at scrape time."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """Gauges (current) and counters (cumulative since start) of one engine."""

    num_running_requests: int = 0
    num_waiting_requests: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    num_kv_blocks_total: int = 0
    num_kv_blocks_free: int = 0
    prefix_cache_queries: int = 0  # tokens
    prefix_cache_hits: int = 0  # tokens
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    expert_budget: float = 1.0  # the load-adaptive expert budget factor b (1.0 when off)
    num_moe_layers: int = 0
    num_experts: int = 0
    # per MoE layer: number of token positions that used k FFN experts, k = 0..E
    expert_k_histogram: list[list[int]] = field(default_factory=list)
    expert_activations: int = 0
    # per MoE layer, per expert: token positions routed to it (only when enabled)
    expert_token_counts: list[list[int]] | None = None
    num_steps: int = 0
    # per MoE layer: mean / max tokens per expert over the last engine steps (None before any token)
    expert_load_balance: list[float | None] = field(default_factory=list)
    # per MoE layer: engine steps whose tokens touched exactly j distinct experts, j = 0..E
    experts_touched_histogram: list[list[int]] = field(default_factory=list)
    # expert parallelism: (token, expert) pairs computed by each rank, cumulative (None with 1 rank)
    expert_parallel_pairs_per_rank: list[int] | None = None
