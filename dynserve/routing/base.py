"""The routing contract: router logits -> RoutingPolicy -> Assignment (ragged expert pairs).

Owns: `Assignment` (what every MoE dispatch consumes), `RoutingBatch` (the per-token routing
configuration of one forward pass, so requests with different policies share a batch), and
`CheckpointRule` (a checkpoint's own top-k rule, which `top_k` reproduces bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

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
    which is what costs compute and what usage accounting reports. `selection` (optional) holds
    every pick in routing order, zero-computation experts as ids num_experts.. (for reporting).
    """

    num_tokens: int
    num_experts: int
    token_ids: torch.Tensor  # [P] int64, non-decreasing
    expert_ids: torch.Tensor  # [P] int64 in [0, num_experts)
    weights: torch.Tensor  # [P] float32
    token_offsets: torch.Tensor  # [T+1] int64
    identity_weight: torch.Tensor | None = None  # [T] float32
    num_selected: torch.Tensor | None = None  # [T] int64; None = experts_per_token()
    # every expert the router picked, zero-computation ones included (ids >= num_experts), when that
    # differs from the pairs (LongCat-Flash): what routed-experts reporting returns for replay
    selection: Assignment | None = None
    # [E] int64 pairs per FFN expert, where the routing kernel counted them anyway (the CPU's fused MoE
    # block); None: usage accounting counts from expert_ids
    expert_counts: torch.Tensor | None = None

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
        tok = torch.arange(T * k, device=device).div_(max(k, 1), rounding_mode="floor")  # [T*k]: 0,..,0, 1,.., T-1
        offsets = torch.arange(T + 1, device=device, dtype=torch.int64) * k  # [T+1]
        return cls(T, num_experts, tok, topk_ids.reshape(-1).long(), topk_weights.reshape(-1).float(), offsets)

    def to_dense(self) -> torch.Tensor:
        """[T, E] float weights (0 where not selected); for tests and references."""
        dense = torch.zeros(self.num_tokens, self.num_experts, dtype=torch.float32, device=self.weights.device)
        dense.index_put_((self.token_ids, self.expert_ids), self.weights, accumulate=True)
        return dense


@dataclass(frozen=True)
class CheckpointRule:
    """A checkpoint's own routing rule, which the `top_k` policy reproduces bit for bit.

    scoring "softmax" (Mixtral, Qwen-MoE, OLMoE): softmax over `num_experts`, top `top_k`,
    optional renormalisation. Softmax with `n_group` > 1 or a `routed_scaling_factor` (DeepSeek-V2,
    transformers' `deepseek_v2` router, `topk_method` "group_limited_greedy" / "greedy"): experts
    are chosen within the best `topk_group` of `n_group` equal groups, each group ranked by its best
    probability; weights are the probabilities times `routed_scaling_factor`. scoring "sigmoid"
    (DeepSeek-V3, GLM-4.5, transformers' `deepseek_v3` / `glm4_moe` routers): scores =
    sigmoid(logits) in float32; experts are chosen on scores + the layer's per-expert bias
    (`e_score_correction_bias`, passed to `route` as `score_bias`) within the best `topk_group` of
    `n_group` equal groups (each group ranked by the sum of its two best biased scores); weights
    are the unbiased scores, renormalised if `renormalize` (`norm_topk_prob`), times
    `routed_scaling_factor`. `selection_bias` says the layer carries such a bias tensor (a
    parameter of the MoE layer, not of the rule; sigmoid routers only). gpt-oss (transformers'
    `GptOssTopKRouter`: softmax over the top-k biased logits) is scoring "softmax" with
    `renormalize`: the same experts, and the same weights up to float32 rounding.
    """

    num_experts: int
    top_k: int
    renormalize: bool = False
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    selection_bias: bool = False

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"CheckpointRule.scoring must be 'softmax' or 'sigmoid', got {self.scoring!r}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(f"num_experts ({self.num_experts}) must split into n_group ({self.n_group}) equal groups")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be in [1, n_group={self.n_group}]")
        if self.scoring == "softmax" and self.selection_bias:
            raise NotImplementedError("a selection bias applies to sigmoid routers only")

    @property
    def grouped(self) -> bool:
        """True when the group limit removes experts (topk_group < n_group)."""
        return self.topk_group < self.n_group

    @property
    def group_limited(self) -> bool:
        """True when the rule routes by `route_grouped` (sigmoid scores, groups or routed scaling),
        False for a plain softmax top-k rule (`route_probs`)."""
        return self.scoring == "sigmoid" or self.n_group != 1 or self.routed_scaling_factor != 1.0

    @property
    def allowed_experts(self) -> int:
        """Experts a token may pick after the group limit: topk_group * num_experts / n_group."""
        return self.topk_group * (self.num_experts // self.n_group)


@dataclass
class RoutingBatch:
    """Routing configuration for every token of one forward pass.

    `configs` holds the distinct RoutingConfigs present; `config_index` [T] maps each token to
    one. When every token shares one config, `config_index` may be None.
    """

    configs: list[RoutingConfig] = field(default_factory=lambda: [RoutingConfig()])
    config_index: torch.Tensor | None = None  # [T] int64
    # batch-aware expert selection (`--max-active-experts N`): at most N distinct experts per MoE layer
    # per step, except tokens' top-1 picks (see policies.limit_active_experts); None: off
    max_active_experts: int | None = None

    def __post_init__(self) -> None:
        self._steers = any(c.steers for c in self.configs)
        self._steering: dict[tuple, torch.Tensor] = {}  # device tables of this step, by their rows

    @property
    def uniform(self) -> bool:
        return len(self.configs) == 1

    def steering(self, layer: int, num_experts: int, device: torch.device | str) -> torch.Tensor | None:
        """What MoE layer `layer` adds to each token's router logits: [T, E] float32 (or [1, E] for a
        uniform batch), each token's config's `expert_bias`, -inf at its excluded experts; None when no
        config steers this layer (then nothing is built: the unsteered path costs nothing). One small
        host-to-device copy per distinct table per step."""
        if not self._steers:
            return None
        rows = tuple(c.steering_row(layer, num_experts) for c in self.configs)
        if all(r is None for r in rows):
            return None
        table = self._steering.get(rows)
        if table is None:
            zeros = (0.0,) * num_experts
            table = torch.tensor([r if r is not None else zeros for r in rows], dtype=torch.float32, device=device)
            if self.config_index is not None:  # [C, E] -> [T, E]
                table = table[self.config_index.to(device=table.device)]
            self._steering[rows] = table
        return table

    @classmethod
    def single(cls, config: RoutingConfig) -> RoutingBatch:
        return cls([config], None)

    @classmethod
    def from_per_sequence(
        cls, configs: list[RoutingConfig], tokens_per_seq: list[int], device: torch.device | str = "cpu"
    ) -> RoutingBatch:
        """One config per sequence, repeated over that sequence's tokens in this step; `config_index`
        is built on the host and copied to `device` once (not once per MoE layer)."""
        unique: dict[RoutingConfig, int] = {}
        idx = [unique.setdefault(c, len(unique)) for c in configs]
        if len(unique) == 1:
            return cls(list(unique), None)
        index = [i for i, n in zip(idx, tokens_per_seq, strict=True) for _ in range(n)]  # [T]
        return cls(list(unique), torch.tensor(index, dtype=torch.int64, device=device))


@dataclass
class RouterRecord:
    """One MoE layer's router output in one forward pass, recorded for offline re-routing
    (`dynserve calibrate-routing`): `route(logits, batch, rule, score_bias, layer=moe_layer)` gives
    the layer's Assignment under any RoutingConfig without running the model again."""

    moe_layer: int
    logits: torch.Tensor  # [T, E] as the layer's `route` receives them
    rule: CheckpointRule
    score_bias: torch.Tensor | None = None  # [E] sigmoid routers' selection bias


class RouteSelector(Protocol):
    """A native implementation of the general routing pass (`policies.route(..., select=...)`): the
    kernels package provides one for CPU tensors (`dynserve_kernels.route_selector`). `rows` holds per
    config (policy code, k, p, threshold, min, max, renormalize, entropy thresholds, entropy k)."""

    def takes(self, scores: torch.Tensor) -> bool: ...

    def __call__(
        self,
        scores: torch.Tensor,
        choice: torch.Tensor | None,
        rows: tuple[tuple, ...],
        config_index: torch.Tensor | None,
        **group: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...
