"""The routing contract: router logits -> RoutingPolicy -> Assignment (ragged expert pairs).

Owns: `Assignment` (what every MoE dispatch consumes), `RoutingBatch` (the per-token routing
configuration of one forward pass, so requests with different policies share a batch), and
`CheckpointRule` (a checkpoint's own top-k rule, which `top_k` reproduces bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dynserve.config import RoutingConfig


@dataclass
class Assignment:
    """Ragged (token, expert, weight) pairs of one MoE layer, token-major (CSR) order.

    Token t owns pairs [token_offsets[t], token_offsets[t+1]); a token may own zero pairs.
    Only routed FFN experts (ids 0..num_experts-1) appear as pairs: zero-computation experts
    never do. `identity_weight` (optional, [T]) is the summed weight of copy/identity experts,
    which add `w * x` to the output with no FLOPs. `num_selected` counts, per token, every expert
    the router picked (FFN + zero-computation); `experts_per_token` counts only FFN experts,
    which is what costs compute and what usage accounting reports.
    """

    num_tokens: int
    num_experts: int
    token_ids: torch.Tensor  # [P] int64, non-decreasing
    expert_ids: torch.Tensor  # [P] int64 in [0, num_experts)
    weights: torch.Tensor  # [P] float32
    token_offsets: torch.Tensor  # [T+1] int64
    identity_weight: torch.Tensor | None = None  # [T] float32
    num_selected: torch.Tensor | None = None  # [T] int64; None = experts_per_token()

    @property
    def num_pairs(self) -> int:
        return int(self.token_ids.numel())

    def experts_per_token(self) -> torch.Tensor:
        """[T] int64: FFN experts used by each token."""
        return self.token_offsets[1:] - self.token_offsets[:-1]

    @classmethod
    def from_mask(
        cls, mask: torch.Tensor, weights: torch.Tensor, identity_weight: torch.Tensor | None = None
    ) -> Assignment:
        """From a boolean selection `mask` [T, E] and dense `weights` [T, E]."""
        T, E = mask.shape
        tok, exp = mask.nonzero(as_tuple=True)  # row-major => token-major order
        counts = mask.sum(dim=1)  # [T]
        offsets = torch.zeros(T + 1, dtype=torch.int64, device=mask.device)
        offsets[1:] = torch.cumsum(counts, dim=0)
        return cls(T, E, tok, exp, weights[tok, exp].float(), offsets, identity_weight)

    @classmethod
    def from_topk(cls, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> Assignment:
        """From fixed top-k `topk_ids` [T, k] and `topk_weights` [T, k] (every token k pairs)."""
        T, k = topk_ids.shape
        device = topk_ids.device
        tok = torch.arange(T, device=device).repeat_interleave(k)  # [T*k]
        offsets = torch.arange(T + 1, device=device, dtype=torch.int64) * k  # [T+1]
        return cls(T, num_experts, tok, topk_ids.reshape(-1).long(), topk_weights.reshape(-1).float(), offsets)

    def to_dense(self) -> torch.Tensor:
        """[T, E] float weights (0 where not selected); for tests and references."""
        dense = torch.zeros(self.num_tokens, self.num_experts, dtype=torch.float32, device=self.weights.device)
        dense.index_put_((self.token_ids, self.expert_ids), self.weights, accumulate=True)
        return dense


@dataclass(frozen=True)
class CheckpointRule:
    """A checkpoint's own routing: softmax over `num_experts`, top `top_k`, optional renorm."""

    num_experts: int
    top_k: int
    renormalize: bool = False
    scoring: str = "softmax"


@dataclass
class RoutingBatch:
    """Routing configuration for every token of one forward pass.

    `configs` holds the distinct RoutingConfigs present; `config_index` [T] maps each token to
    one. When every token shares one config, `config_index` may be None.
    """

    configs: list[RoutingConfig] = field(default_factory=lambda: [RoutingConfig()])
    config_index: torch.Tensor | None = None  # [T] int64

    @property
    def uniform(self) -> bool:
        return len(self.configs) == 1

    @classmethod
    def single(cls, config: RoutingConfig) -> RoutingBatch:
        return cls([config], None)

    @classmethod
    def from_per_sequence(cls, configs: list[RoutingConfig], tokens_per_seq: list[int]) -> RoutingBatch:
        """One config per sequence, repeated over that sequence's tokens in this step."""
        unique: dict[RoutingConfig, int] = {}
        idx = [unique.setdefault(c, len(unique)) for c in configs]
        if len(unique) == 1:
            return cls(list(unique), None)
        index = torch.repeat_interleave(torch.tensor(idx, dtype=torch.int64), torch.tensor(tokens_per_seq))
        return cls(list(unique), index)
