"""The model contract: what ModelRunner hands a model each step, and what a model returns.

Owns: `ForwardBatch` (flattened tokens of every scheduled sequence with paged-KV metadata),
and `CausalLM` (the interface every architecture class implements).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from dynserve_kernels.metadata import AttentionMetadata
from torch import nn

from dynserve.routing.base import Assignment, RouterRecord, RoutingBatch


@dataclass(kw_only=True)
class ForwardBatch(AttentionMetadata):
    """One engine step, flattened over sequences: the paged-KV layout the attention kernels read
    (`AttentionMetadata`: query_start_loc, seq_lens, block_tables, ...) plus the step's tokens,
    routing and the expert counts the MoE layers report. B sequences, T tokens in total."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset, where new K/V go
    logits_indices: torch.Tensor  # [S] rows of the hidden states to compute logits for
    routing: RoutingBatch = field(default_factory=RoutingBatch)
    # filled by MoE layers during forward: per MoE layer, FFN experts used by each token
    expert_counts: list[torch.Tensor] = field(default_factory=list)  # L_moe x [T] int64
    # filled when per-(layer, expert) token counts are recorded: per MoE layer [E] int64
    expert_token_counts: list[torch.Tensor] | None = None
    # filled when router outputs are recorded (calibration): one RouterRecord per MoE layer that
    # routes by RoutingConfig
    router_records: list[RouterRecord] | None = None
    # filled by MoE layers during forward: each MoE layer's Assignment, in layer order (the runner derives
    # expert load and, when a request asks, routed experts from them after the forward)
    assignments: list[Assignment] = field(default_factory=list)

    @property
    def moe_layer_index(self) -> int:
        """The index (among MoE layers) of the MoE layer routing now: the layers report in order."""
        return len(self.assignments)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class CausalLM(nn.Module):
    """Interface of every architecture class (one file per family under model/).

    Built from a ModelConfig; weights arrive through `load_weights` with Hugging Face names.
    KV cache: one tensor per attention layer, [2, num_blocks, block_size, num_kv_heads, head_dim].
    """

    num_moe_layers: int = 0

    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """Returns final-normed hidden states [T, H]; appends per-layer expert counts to batch."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, H] -> [S, V] float32 logits."""
        raise NotImplementedError

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take HF-named tensors; stack experts; raise KeyError naming any missing tensor."""
        raise NotImplementedError
