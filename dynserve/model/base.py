"""The model contract: what ModelRunner hands a model each step, and what a model returns.

Owns: `ForwardBatch` (flattened tokens of every scheduled sequence with paged-KV metadata),
and `CausalLM` (the interface every architecture class implements).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dynserve.routing.base import RoutingBatch


@dataclass
class ForwardBatch:
    """One engine step, flattened over sequences. B sequences, T tokens in total.

    Sequence b's new tokens are input_ids[query_start_loc[b]:query_start_loc[b+1]]; they sit at
    positions seq_lens[b]-query_len_b .. seq_lens[b]-1 of that sequence, so the first
    seq_lens[b]-query_len_b positions (cached prefix, earlier chunks) are read from the KV cache.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset, where new K/V go
    query_start_loc: torch.Tensor  # [B+1] int64 (cumulative query lengths)
    seq_lens: torch.Tensor  # [B] int64 context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int64 (padded with 0)
    max_query_len: int
    max_seq_len: int
    block_size: int
    logits_indices: torch.Tensor  # [S] rows of the hidden states to compute logits for
    routing: RoutingBatch = field(default_factory=RoutingBatch)
    # query_start_loc / seq_lens as Python lists (host copies: loops must not sync a device)
    query_start_loc_host: list[int] = field(default_factory=list)
    seq_lens_host: list[int] = field(default_factory=list)
    # filled by MoE layers during forward: per MoE layer, FFN experts used by each token
    expert_counts: list[torch.Tensor] = field(default_factory=list)  # L_moe x [T] int64
    # filled when per-(layer, expert) token counts are recorded: per MoE layer [E] int64
    expert_token_counts: list[torch.Tensor] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.numel())

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
