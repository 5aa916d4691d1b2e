"""Routing policies: router logits [T, E] + RoutingBatch -> Assignment.

Policies (chosen per request through RoutingConfig; requests with different policies share one
`route` call):
  - "top_k":     the checkpoint's own rule (softmax in float32, torch.topk, optional renorm).
  - "top_p":     Huang et al. 2024 ("Harder Tasks Need More Experts"): the smallest prefix of the
                 descending probabilities whose cumulative sum reaches p.
  - "threshold": every expert whose probability is >= threshold.
  - "relative":  every expert whose probability is >= threshold x the token's top probability.
  - "entropy":   k from the router entropy by thresholds, then the top k.
The number of experts is then clamped to [min_experts, max_experts] per token. `p`, `threshold`
and `k` may differ per MoE layer (`route(..., layer=i)` reads layer i's value).
Group-limited routers — sigmoid with a selection bias (DeepSeek-V3, GLM-4.5) and softmax with
groups or a routed scaling factor (DeepSeek-V2) — follow the same policies by `route_grouped`'s
rule (its docstring; the README's routing table).

Native dynamic routing for architectures that define their own rule (no RoutingConfig):
  - `relu_route`: ReLU routers (ReMoE, BlockFFN): an expert is active where the router output > 0.
  - `route_with_zero_experts`: top-k over FFN + zero-computation experts (LongCat-Flash, MoE++,
    AdaMoE null experts); only FFN experts become pairs, identity experts become `identity_weight`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from dynserve.config import RoutingConfig
from dynserve.routing.base import Assignment, CheckpointRule, RouteSelector, RoutingBatch

TOP_K, TOP_P, THRESHOLD, RELATIVE, ENTROPY = 0, 1, 2, 3, 4
_POLICY_CODE = {"top_k": TOP_K, "top_p": TOP_P, "threshold": THRESHOLD, "relative": RELATIVE, "entropy": ENTROPY}
ZERO_EXPERT_KINDS: tuple[str, ...] = ("zero", "identity")
_TINY = torch.finfo(torch.float32).tiny


def checkpoint_top_k(router_logits: torch.Tensor, rule: CheckpointRule, k: int | None = None) -> Assignment:
    """The checkpoint's own rule: softmax in float32, top-k, optional renormalisation."""
    probs = _softmax_no_nan(router_logits)  # [T, E]
    k = min(k or rule.top_k, rule.num_experts)
    topk_w, topk_ids = torch.topk(probs, k, dim=-1)  # [T, k]
    if rule.renormalize:
        topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True).clamp_min(_TINY)  # a NaN-router token: 0, not 0/0
    return Assignment.from_topk(topk_ids, topk_w, rule.num_experts)


def router_probs(router_logits: torch.Tensor, rule: CheckpointRule) -> torch.Tensor:
    """[T, E] float32 routing probabilities of a checkpoint (softmax in float32, as `checkpoint_top_k`)."""
    if rule.scoring != "softmax":
        raise NotImplementedError(
            f"router_probs is defined for softmax routers only (got scoring={rule.scoring!r}); "
            "sigmoid routers route through route_sigmoid"
        )
    return _softmax_no_nan(router_logits)  # [T, E]


def _softmax_no_nan(router_logits: torch.Tensor) -> torch.Tensor:
    """Softmax in float32 where a NaN probability (a NaN or +inf router logit) becomes 0: such a
    token keeps valid expert ids with weight 0 instead of spreading NaN into the expert GEMMs."""
    return torch.softmax(router_logits.float(), dim=-1).nan_to_num_(nan=0.0)  # [T, E]


def route(
    router_logits: torch.Tensor,
    batch: RoutingBatch,
    rule: CheckpointRule,
    score_bias: torch.Tensor | None = None,
    layer: int = 0,
    select: RouteSelector | None = None,
) -> Assignment:
    """Route every token of a batch by its own RoutingConfig (its values for MoE layer `layer`):
    plain softmax rules by `route_probs`, group-limited rules (DeepSeek-V3 / GLM-4.5 sigmoid with the
    layer's `score_bias` [E]; DeepSeek-V2 softmax with groups or routed scaling) by `route_grouped`.
    `select`: a native implementation of the general pass (the kernels' CPU one), used where it
    `takes` the scores; None: torch ops throughout (the reference). The checkpoint's own top_k on a
    uniform batch is torch either way (bit for bit with transformers' routers).

    Steering (`RoutingConfig.exclude_experts` / `expert_bias` of MoE layer `layer`): each token's bias
    is added to its router logits (float32) before the policy, its excluded experts get -inf logits (and
    -inf selection scores under a selection bias), and any excluded expert a policy still picked (a
    top-k larger than the experts left) is removed from the Assignment, so excluded experts never
    appear. Tokens with different steering share the pass (a per-token additive table)."""
    a = _route(router_logits, batch, rule, score_bias, layer, select)
    N = batch.max_active_experts
    if N is not None and N < rule.num_experts and not rule.group_limited and a.num_pairs:
        steer = batch.steering(layer, router_logits.shape[-1], router_logits.device)
        logits = router_logits if steer is None else router_logits.float() + steer
        excluded = None if steer is None else torch.isneginf(steer)
        return limit_active_experts(a, router_probs(logits, rule), batch, rule, N, excluded)
    return a


def fused_route_rows(batch: RoutingBatch, rule: CheckpointRule, layer: int = 0) -> tuple[tuple, ...] | None:
    """The routing of MoE layer `layer` as per-config parameter rows (what a `RouteSelector` takes:
    `batch.config_index` maps tokens to them) for a kernel that routes inside a fused MoE block on the
    router's float32 softmax; None where such a kernel cannot follow this batch (group-limited or
    sigmoid rules, steering, batch-aware expert selection): the caller routes by `route`. Cached per
    (configs, rule, layer): the same few configs recur every layer and step."""
    if rule.group_limited or batch.max_active_experts is not None:
        return None
    if batch.steering(layer, rule.num_experts, "cpu") is not None:
        return None
    return _fused_rows(tuple(batch.configs), rule, layer)


@functools.lru_cache(maxsize=4096)
def _fused_rows(configs: tuple[RoutingConfig, ...], rule: CheckpointRule, layer: int) -> tuple[tuple, ...]:
    return _rows_key([_resolve(c, rule, rule.num_experts, layer) for c in configs])


def _route(
    router_logits: torch.Tensor,
    batch: RoutingBatch,
    rule: CheckpointRule,
    score_bias: torch.Tensor | None,
    layer: int,
    select: RouteSelector | None,
) -> Assignment:
    if score_bias is not None and rule.scoring != "sigmoid":
        raise ValueError("score_bias applies to sigmoid routers only")
    steer = batch.steering(layer, router_logits.shape[-1], router_logits.device)  # [T|1, E] or None
    if steer is None:
        if rule.group_limited:
            return route_grouped(router_logits, batch, rule, score_bias, layer=layer, select=select)
        return route_probs(router_probs(router_logits, rule), batch, rule, layer=layer, select=select)
    logits = router_logits.float() + steer  # [T, E]
    excluded = torch.isneginf(steer)  # [T|1, E]
    if rule.group_limited:
        grouped = route_grouped(logits, batch, rule, score_bias, excluded, layer=layer, select=select)
        return drop_excluded(grouped, excluded)
    return drop_excluded(route_probs(router_probs(logits, rule), batch, rule, layer=layer, select=select), excluded)


def limit_active_experts(
    a: Assignment,
    probs: torch.Tensor,
    batch: RoutingBatch,
    rule: CheckpointRule,
    N: int,
    excluded: torch.Tensor | None = None,
) -> Assignment:
    """Batch-aware expert selection (Lynx-style): at most N distinct experts in this step's MoE layer.

    The N experts with the most pairs form the step's set. Every pair outside it that is not its
    token's first (top-1) pick moves to the token's most probable expert inside the set that it does
    not use yet, or is dropped when there is none; top-1 picks never move (so a step may touch more
    than N experts when tokens' best experts disagree) and tokens of `budget: "fixed"` requests keep
    their pairs. A moved pair's weight is the new expert's probability; tokens whose config
    renormalises (the checkpoint's rule or `renormalize`) are renormalised over their final pairs.
    probs [T, E]: the routing probabilities (softmax rules only); excluded [T|1, E]: steered-out experts,
    never a destination."""
    T, E = probs.shape
    device = probs.device
    demand = torch.zeros(E, dtype=torch.int64, device=device).index_add_(
        0, a.expert_ids, torch.ones_like(a.expert_ids)
    )  # [E] pairs per expert
    in_set = torch.zeros(E, dtype=torch.bool, device=device)
    in_set[torch.topk(demand, N).indices] = True  # [E]
    rank = torch.arange(a.num_pairs, device=device) - a.token_offsets[a.token_ids]  # [P] place within its token
    per_token = _PerToken(batch, device)
    fixed = per_token([c.budget == "fixed" for c in batch.configs], torch.bool).expand(T)  # [T]
    move = ~in_set[a.expert_ids] & (rank > 0) & ~fixed[a.token_ids]  # [P]
    if not bool(move.any()):
        return a
    used = torch.zeros(T, E, dtype=torch.bool, device=device)
    used[a.token_ids[~move], a.expert_ids[~move]] = True  # [T, E] pairs that stay
    blocked = used | ~in_set[None, :] if excluded is None else used | ~in_set[None, :] | excluded
    cand = probs.masked_fill(blocked, float("-inf"))  # [T, E] where a moved pair may go
    order = torch.argsort(cand, dim=-1, descending=True, stable=True)  # [T, E]
    moved_tok = a.token_ids[move]  # [M]
    # the j-th moved pair of a token takes the token's j-th best candidate (pairs are token-major)
    M = moved_tok.numel()
    idx = torch.arange(M, device=device)  # [M]
    starts = torch.ones(M, dtype=torch.bool, device=device)
    starts[1:] = moved_tok[1:] != moved_tok[:-1]  # [M] first moved pair of its token
    j = idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(0).values  # [M] 0, 1, ... within the token
    new_e = order[moved_tok, j]  # [M]
    ok = torch.isfinite(cand[moved_tok, new_e])  # [M] a candidate was left
    ids = a.expert_ids.clone()
    w = a.weights.clone()
    ids[move] = new_e
    w[move] = probs[moved_tok, new_e].float()
    keep = torch.ones(a.num_pairs, dtype=torch.bool, device=device)
    keep[move.nonzero().flatten()[~ok]] = False  # [P]
    renorm = per_token(
        [rule.renormalize if c.renormalize is None else c.renormalize for c in batch.configs], torch.bool
    ).expand(T)  # [T]
    tok = a.token_ids[keep]  # [P']
    ids, w = ids[keep], w[keep]
    counts = torch.zeros(T, dtype=torch.int64, device=device).index_add_(0, tok, torch.ones_like(tok))  # [T]
    offsets = torch.zeros(T + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, dim=0)
    if bool(renorm.any()):
        total = torch.zeros(T, dtype=torch.float32, device=device).index_add_(0, tok, w)  # [T]
        w = torch.where(renorm[tok], w / total[tok].clamp_min(_TINY), w)
    return Assignment(T, E, tok, ids, w, offsets, a.identity_weight)


def drop_excluded(a: Assignment, excluded: torch.Tensor) -> Assignment:
    """`a` without the pairs whose expert is excluded for their token (`excluded` [T|1, E] bool)."""
    T = a.num_tokens
    bad = excluded.expand(T, excluded.shape[-1])[a.token_ids, a.expert_ids]  # [P]
    keep = ~bad
    tok = a.token_ids[keep]  # [P']
    counts = torch.zeros(T, dtype=torch.int64, device=tok.device).index_add_(0, tok, torch.ones_like(tok))  # [T]
    offsets = torch.zeros(T + 1, dtype=torch.int64, device=tok.device)
    offsets[1:] = torch.cumsum(counts, dim=0)
    return Assignment(
        T,
        a.num_experts,
        tok,
        a.expert_ids[keep],
        a.weights[keep],
        offsets,
        a.identity_weight,
        a.num_selected,
        a.selection,
    )


# ----------------------------------------------------------------------------------------------
# per-config parameters


@dataclass(frozen=True)
class _ConfigRow:
    """One RoutingConfig resolved against a checkpoint rule (plain Python numbers)."""

    policy: int
    k: int  # top_k only: experts per token, already clamped to [lo, hi]
    p: float
    threshold: float  # threshold and relative
    lo: int  # min experts, <= E
    hi: int  # max experts, <= E
    renormalize: bool
    entropy_thresholds: tuple[float, ...]
    entropy_k: tuple[int, ...]


def _resolve(cfg: RoutingConfig, rule: CheckpointRule, num_experts: int, layer: int = 0) -> _ConfigRow:
    """`cfg` at MoE layer `layer` (a per-layer list shorter than the model was refused at admission;
    here a missing layer reads the list's last value rather than failing a whole batch)."""

    def at(name: str):  # noqa: ANN202
        v = getattr(cfg, name)
        return v[min(layer, len(v) - 1)] if isinstance(v, tuple) else v

    hi = min(cfg.max_experts if cfg.max_experts is not None else num_experts, num_experts)
    lo = min(cfg.min_experts, hi)
    k = min(max(at("k") or rule.top_k, lo), hi)
    renorm = rule.renormalize if cfg.renormalize is None else cfg.renormalize
    return _ConfigRow(
        _POLICY_CODE[cfg.policy], k, float(at("p")), float(at("threshold")), lo, hi, renorm,
        tuple(float(h) for h in cfg.entropy_thresholds), tuple(int(v) for v in cfg.entropy_k),
    )  # fmt: skip


def _top_k_fast(probs: torch.Tensor, row: _ConfigRow, num_experts: int) -> Assignment:
    """Every token the same k: exactly the ops of `checkpoint_top_k` (bit for bit)."""
    topk_w, topk_ids = torch.topk(probs, row.k, dim=-1)  # [T, k]
    if row.renormalize:
        topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True).clamp_min(_TINY)
    return Assignment.from_topk(topk_ids, topk_w, num_experts)


class _PerToken:
    """Per-config parameter rows gathered to the tokens: `per_token(values, dtype)` turns one value per
    config [C] into [T] (or [1], broadcast, when the batch is uniform)."""

    def __init__(self, batch: RoutingBatch, device: torch.device) -> None:
        self.device = device
        self.index: torch.Tensor | None = None
        if not batch.uniform:
            if batch.config_index is None:
                raise ValueError("RoutingBatch with several configs needs config_index")
            self.index = batch.config_index.to(device=device, dtype=torch.int64)  # [T]

    def __call__(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype, device=self.device)  # [C]
        return t[:1] if self.index is None else t[self.index]  # [T] or [1]


def _entropy_counts(q: torch.Tensor, rows: list[_ConfigRow], per_token: _PerToken) -> torch.Tensor:
    """[T] experts per token of the entropy policy: k = entropy_k[#(entropy_thresholds <= H)], H the
    Shannon entropy (nats) of each row of `q` [T, E] (probabilities; 0 log 0 = 0). Tokens of other
    configs get 0 (their policy's count is used instead)."""
    T = q.shape[0]
    h = -torch.where(q > 0, q * q.clamp_min(_TINY).log(), torch.zeros_like(q)).sum(dim=-1)  # [T] nats
    n = torch.zeros(T, dtype=torch.int64, device=q.device)
    for c, r in enumerate(rows):
        if r.policy != ENTROPY:
            continue
        thr = torch.tensor(r.entropy_thresholds, dtype=torch.float32, device=q.device)  # [n]
        ks = torch.tensor(r.entropy_k, dtype=torch.int64, device=q.device)  # [n+1]
        k_c = ks[torch.bucketize(h, thr, right=True)]  # [T]: H < h1 -> k0, h_i <= H < h_i+1 -> k_i
        if per_token.index is None:
            return k_c
        n = torch.where(per_token.index == c, k_c, n)
    return n


def _clamped_counts(
    counts: dict[int, torch.Tensor], rows: list[_ConfigRow], per_token: _PerToken, T: int
) -> torch.Tensor:
    """[T] experts per token: each token's policy's count, clamped to its [min_experts, max_experts]."""
    if len(counts) == 1:
        n = next(iter(counts.values()))
    else:
        policy_t = per_token([r.policy for r in rows], torch.int64)  # [T]
        n = torch.zeros(T, dtype=torch.int64, device=per_token.device)
        for code, c in counts.items():
            n = torch.where(policy_t == code, c, n)  # [T]
    lo_t = per_token([r.lo for r in rows], torch.int64)
    hi_t = per_token([r.hi for r in rows], torch.int64)
    return torch.clamp(n, min=lo_t, max=hi_t).expand(T)  # [T]


def _rows_key(rows: list[_ConfigRow]) -> tuple[tuple, ...]:
    """The resolved configs as the plain tuples a RouteSelector takes."""
    return tuple(
        (r.policy, r.k, r.p, r.threshold, r.lo, r.hi, int(r.renormalize), r.entropy_thresholds, r.entropy_k)
        for r in rows
    )


def _route_native(
    select: RouteSelector,
    scores: torch.Tensor,
    choice: torch.Tensor | None,
    rows: list[_ConfigRow],
    batch: RoutingBatch,
    top_k_picks: Callable[[torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor]],
    **group: Any,
) -> Assignment:
    """The general pass in one native call (`select`, the same rules as the torch code); then the
    tokens of top_k configs in a mixed batch take the checkpoint's own picks and arithmetic
    (`top_k_picks(tokens, k, renormalize)` -> ids, weights [n, k]), as the torch path does, so a
    request's pairs do not depend on what it is batched with."""
    T, E = scores.shape
    index = None if batch.uniform else batch.config_index
    offsets, tok, ids, w = select(scores, choice, _rows_key(rows), index, **group)
    if index is not None:
        for k, renorm in sorted({(r.k, r.renormalize) for r in rows if r.policy == TOP_K}):
            cfgs = [c for c, r in enumerate(rows) if r.policy == TOP_K and (r.k, r.renormalize) == (k, renorm)]
            tokens = torch.isin(index, torch.tensor(cfgs, dtype=index.dtype)).nonzero().flatten()  # [n]
            if tokens.numel() == 0:
                continue
            ids_k, w_k = top_k_picks(tokens, k, renorm)  # [n, k] each
            pos = (offsets[tokens][:, None] + torch.arange(k)).flatten()  # [n k] their pairs
            ids[pos] = ids_k.reshape(-1).long()
            w[pos] = w_k.reshape(-1).float()
    return Assignment(T, E, tok, ids, w, offsets)


def route_probs(
    probs: torch.Tensor,
    batch: RoutingBatch,
    rule: CheckpointRule,
    layer: int = 0,
    select: RouteSelector | None = None,
) -> Assignment:
    """Route tokens from their routing probabilities `probs` [T, E] (float32, rows sum to 1).

    Each token t follows `batch.configs[batch.config_index[t]]` (or `batch.configs[0]` when the
    batch is uniform). All tokens are handled by one vectorised pass: the few distinct configs
    become small parameter rows, gathered per token by `config_index`.

    Rules (per token; E = number of experts, ranks are positions in the descending sort):
      - top_k: k = config.k or rule.top_k; a uniform batch runs exactly the ops of
        `checkpoint_top_k` (bit-for-bit equal), pairs in torch.topk order.
      - top_p: keep rank i iff the cumulative probability of the ranks *before* i is strictly
        `< p`, i.e. the smallest prefix whose cumulative sum reaches p (top-1 always kept).
        Boundary: a prefix summing to exactly p is complete (the next expert is not added). This
        is the `<` choice (XMoE-style); the MoE-Dynamic code's `<=` would add one more expert at
        exact equality. Sums and the comparison are in float32 (p rounded to float32).
      - threshold: keep experts with probability >= config.threshold (float32 comparison); the
        kept set is a top-ranked prefix and may be empty.
      - relative: keep experts with probability >= config.threshold x the token's top probability
        (float32); the top expert is always kept.
      - entropy: k = config.entropy_k[i], i = the number of config.entropy_thresholds <= H, H the
        Shannon entropy (nats, float32) of the token's probabilities; the top k.
    `p`, `threshold` and `k` are the config's values at MoE layer `layer`. Then the count is
    clamped to [min_experts, max_experts] (max None = E; both capped at E) by taking that many
    top-ranked experts. min_experts = 0 lets a token use no expert (only the
    residual stream passes); top_k and top_p still keep at least one by their own rule.
    Weights are the kept probabilities; renormalised to sum to 1 over the kept experts if
    config.renormalize (None -> rule.renormalize).
    Pairs are token-major; within a token, in descending probability order.
    """
    T, E = probs.shape
    device = probs.device
    rows = [_resolve(c, rule, E, layer) for c in batch.configs]
    if batch.uniform and rows[0].policy == TOP_K:
        return _top_k_fast(probs, rows[0], E)
    if select is not None and select.takes(probs):

        def top_k_picks(tokens: torch.Tensor, k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
            a = _top_k_fast(probs[tokens], replace(rows[0], k=k, renormalize=renorm), E)
            return a.expert_ids.view(-1, k), a.weights.view(-1, k)

        return _route_native(select, probs, None, rows, batch, top_k_picks)

    per_token = _PerToken(batch, device)

    policies = {r.policy for r in rows}
    sorted_p, sorted_ids = torch.sort(probs, dim=-1, descending=True)  # [T, E]
    counts: dict[int, torch.Tensor] = {}
    if TOP_K in policies:
        counts[TOP_K] = per_token([r.k for r in rows], torch.int64).expand(T)  # [T]
    if TOP_P in policies:
        p_t = per_token([r.p for r in rows], torch.float32)  # [T] or [1]
        csum = torch.cumsum(sorted_p, dim=-1)  # [T, E]
        before = torch.cat([torch.zeros_like(csum[:, :1]), csum[:, :-1]], dim=1)  # [T, E]
        counts[TOP_P] = (before < p_t[:, None]).sum(dim=-1)  # [T]
    if THRESHOLD in policies:
        thr_t = per_token([r.threshold for r in rows], torch.float32)  # [T] or [1]
        counts[THRESHOLD] = (sorted_p >= thr_t[:, None]).sum(dim=-1)  # [T]
    if RELATIVE in policies:
        rel_t = per_token([r.threshold for r in rows], torch.float32)  # [T] or [1]
        counts[RELATIVE] = (sorted_p >= rel_t[:, None] * sorted_p[:, :1]).sum(dim=-1)  # [T]
    if ENTROPY in policies:
        counts[ENTROPY] = _entropy_counts(probs, rows, per_token)  # [T]
    n = _clamped_counts(counts, rows, per_token, T)  # [T]

    keep = torch.arange(E, device=device)[None, :] < n[:, None]  # [T, E] over ranks
    tok, rank = keep.nonzero(as_tuple=True)  # [P], row-major => token-major, rank order
    weights = sorted_p[tok, rank]  # [P]
    if any(r.renormalize for r in rows):
        kept_sum = (sorted_p * keep).sum(dim=-1)  # [T]
        # top_k tokens: the same reduction as the uniform fast path, so a request's weights do not
        # depend on what it is batched with.
        for k in sorted({r.k for r in rows if r.policy == TOP_K and r.renormalize}):
            exact = sorted_p[:, :k].contiguous().sum(dim=-1)  # [T]
            is_k = per_token([r.policy == TOP_K and r.k == k for r in rows], torch.bool)
            kept_sum = torch.where(is_k, exact, kept_sum)
        kept_sum = kept_sum.clamp_min(_TINY)  # empty tokens: no 0/0
        renorm_t = per_token([r.renormalize for r in rows], torch.bool).expand(T)  # [T]
        weights = torch.where(renorm_t[tok], weights / kept_sum[tok], weights)  # [P]
    offsets = torch.zeros(T + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(n, dim=0)
    return Assignment(T, E, tok, sorted_ids[tok, rank], weights.float(), offsets)


# ----------------------------------------------------------------------------------------------
# group-limited routers: sigmoid with a selection bias (DeepSeek-V3, GLM-4.5), softmax with groups
# or routed scaling (DeepSeek-V2)

_DENOM_EPS = 1e-20  # transformers' DeepSeek-V3 / GLM-4.5 renormalisation: w / (sum w + 1e-20)


def _allowed_mask(choice: torch.Tensor, rule: CheckpointRule) -> torch.Tensor | None:
    """[T, E] bool: the experts of each token's best `topk_group` groups (None: no group limit).

    A group's score is, for sigmoid rules, the sum of its two best choice scores (its one score for
    groups of one: DeepSeek-V3 / GLM-4.5); for softmax rules its best probability (DeepSeek-V2)."""
    if not rule.grouped:
        return None
    T, E = choice.shape
    G = rule.n_group
    grouped = choice.view(T, G, E // G)  # [T, G, E/G]
    if rule.scoring == "sigmoid":
        group_scores = grouped.topk(min(2, E // G), dim=-1)[0].sum(dim=-1)  # [T, G]
    else:
        group_scores = grouped.max(dim=-1).values  # [T, G]
    group_idx = torch.topk(group_scores, k=rule.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores)  # [T, G]
    group_mask.scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E).bool()  # [T, E]


def _masked_choice(choice: torch.Tensor, rule: CheckpointRule) -> tuple[torch.Tensor, torch.Tensor]:
    """(the ranking: choice with -inf outside the allowed groups, what the checkpoint's top-k runs on:
    the same for sigmoid rules, 0.0 outside the allowed groups for softmax rules, as transformers)."""
    allowed_mask = _allowed_mask(choice, rule)  # [T, E] or None
    if allowed_mask is None:
        return choice, choice
    masked = choice.masked_fill(~allowed_mask, float("-inf"))
    return masked, masked if rule.scoring == "sigmoid" else choice.masked_fill(~allowed_mask, 0.0)


def _checkpoint_top_k(
    scores: torch.Tensor, masked_choice: torch.Tensor, k: int, renormalize: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's own picks: ids [T, k] (torch.topk(sorted=False) order, as transformers)
    and weights [T, k] (unbiased scores, / (sum + 1e-20) if renormalize, x scale)."""
    ids = torch.topk(masked_choice, k=k, dim=-1, sorted=False)[1]  # [T, k]
    w = scores.gather(1, ids)  # [T, k]
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + _DENOM_EPS)
    return ids, w * scale  # [T, k] each


def route_grouped(
    router_logits: torch.Tensor,
    batch: RoutingBatch,
    rule: CheckpointRule,
    score_bias: torch.Tensor | None = None,
    excluded: torch.Tensor | None = None,
    layer: int = 0,
    select: RouteSelector | None = None,
) -> Assignment:
    """Route a group-limited router (DeepSeek-V3 / GLM-4.5 sigmoid, DeepSeek-V2 softmax); every
    token by its own RoutingConfig.

    Common steps (float32): s = sigmoid(router_logits) for sigmoid rules, softmax(router_logits)
    for softmax rules (a NaN gives s = 0); choice = s + `score_bias` [E] (sigmoid rules; zeros if
    None); the group limit keeps the best `rule.topk_group` of `rule.n_group` groups (group score:
    sigmoid, the sum of its two best choice scores; softmax, its best probability); `excluded` [T|1, E]
    (steering, from `route`) sets choice to -inf; the A =
    `rule.allowed_experts` experts of those groups are ranked by choice, descending.

    Per policy (n = experts kept, always the n best-ranked allowed experts):
      - top_k: n = config.k or rule.top_k. Without k (or with k = the checkpoint's) in a batch
        where no token clamps it, ids, their order and weights equal transformers'
        `DeepseekV3TopkRouter` / `Glm4MoeTopkRouter` / `DeepseekV2TopkRouter` bit for bit
        (torch.topk(sorted=False) order; the softmax rule's dropped groups are filled with 0.0
        before that top-k, the sigmoid rule's with -inf, as transformers does).
      - top_p / threshold: the probability of an allowed expert is q = s / sum of s over the A
        allowed experts (sums to 1 like a softmax; experts in dropped groups have q = 0).
        top_p keeps the shortest rank prefix whose cumulative q reaches p (the rank before it
        sums to < p); threshold keeps n = #{allowed experts with q >= threshold}, taken as the n
        best by choice (the same experts whenever the bias does not reorder them); relative the
        same with q >= threshold x the token's largest q; entropy takes k from the entropy of q.
    n is clamped to [min_experts, max_experts] and then to A: a k above A is clamped to A (the
    group limit is never lifted). Weights: unbiased s of the kept experts, divided by (their sum
    + 1e-20) if config.renormalize (None -> rule.renormalize), times rule.routed_scaling_factor.
    Pairs are token-major; within a token, by rank (top_k: in the checkpoint's order).
    """
    T, E = router_logits.shape
    device = router_logits.device
    if rule.scoring == "sigmoid":
        scores = torch.sigmoid(router_logits.float()).nan_to_num_(nan=0.0)  # [T, E]
    else:
        scores = _softmax_no_nan(router_logits)  # [T, E]
    choice = scores if score_bias is None else scores + score_bias.float()  # [T, E]
    if excluded is not None:  # steering: excluded experts are never chosen (`route`)
        choice = choice.masked_fill(excluded, float("-inf"))  # [T, E]
    A = rule.allowed_experts
    scale = float(rule.routed_scaling_factor)
    rows = [_resolve(c, rule, A, layer) for c in batch.configs]
    uniform_top_k = batch.uniform and rows[0].policy == TOP_K
    if not uniform_top_k and select is not None and select.takes(scores):

        def top_k_picks(tokens: torch.Tensor, k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
            sub = choice[tokens]  # [n, E]
            return _checkpoint_top_k(scores[tokens], _masked_choice(sub, rule)[1], k, renorm, scale)

        group = dict(n_group=rule.n_group, topk_group=rule.topk_group, group_sigmoid=rule.scoring == "sigmoid")
        return _route_native(select, scores, choice, rows, batch, top_k_picks, grouped=True, scale=scale, **group)
    masked, checkpoint_masked = _masked_choice(choice, rule)  # [T, E] each
    if uniform_top_k:
        ids, w = _checkpoint_top_k(scores, checkpoint_masked, rows[0].k, rows[0].renormalize, scale)
        return Assignment.from_topk(ids, w, E)

    per_token = _PerToken(batch, device)

    _, ranked_ids = torch.sort(masked, dim=-1, descending=True, stable=True)  # [T, E], allowed first
    ranked_s = scores.gather(1, ranked_ids)  # [T, E]
    allowed = (torch.arange(E, device=device) < A)[None, :]  # [1, E] over ranks
    policies = {r.policy for r in rows}
    counts: dict[int, torch.Tensor] = {}
    if TOP_K in policies:
        counts[TOP_K] = per_token([r.k for r in rows], torch.int64).expand(T)  # [T]
    if policies & {TOP_P, THRESHOLD, RELATIVE, ENTROPY}:
        s_allowed = ranked_s * allowed  # [T, E]
        q = s_allowed / s_allowed.sum(dim=-1, keepdim=True).clamp_min(_TINY)  # [T, E]
        if TOP_P in policies:
            p_t = per_token([r.p for r in rows], torch.float32)
            before = torch.cumsum(q, dim=-1) - q  # [T, E] sum of the ranks before
            counts[TOP_P] = ((before < p_t[:, None]) & allowed).sum(dim=-1)  # [T]
        if THRESHOLD in policies:
            thr_t = per_token([r.threshold for r in rows], torch.float32)
            counts[THRESHOLD] = ((q >= thr_t[:, None]) & allowed).sum(dim=-1)  # [T]
        if RELATIVE in policies:
            rel_t = per_token([r.threshold for r in rows], torch.float32)
            q_max = q.max(dim=-1, keepdim=True).values  # [T, 1]
            counts[RELATIVE] = ((q >= rel_t[:, None] * q_max) & allowed).sum(dim=-1)  # [T]
        if ENTROPY in policies:
            counts[ENTROPY] = _entropy_counts(q, rows, per_token)  # [T]
    n = _clamped_counts(counts, rows, per_token, T)  # [T]

    keep = torch.arange(E, device=device)[None, :] < n[:, None]  # [T, E] over ranks
    kept_s = ranked_s * keep  # [T, E]
    renorm_t = per_token([r.renormalize for r in rows], torch.bool).expand(T)  # [T]
    denom = torch.where(renorm_t, kept_s.sum(dim=-1) + _DENOM_EPS, torch.ones_like(kept_s[:, 0]))  # [T]
    out_ids = ranked_ids  # [T, E] experts in output order
    out_w = ranked_s / denom[:, None] * scale  # [T, E] weights in output order
    # top_k tokens take the checkpoint's own picks and arithmetic, so a request's pairs do not
    # depend on what it is batched with
    for k, renorm in sorted({(r.k, r.renormalize) for r in rows if r.policy == TOP_K}):
        is_k = per_token([r.policy == TOP_K and (r.k, r.renormalize) == (k, renorm) for r in rows], torch.bool)
        ids_k, w_k = _checkpoint_top_k(scores, checkpoint_masked, k, renorm, scale)  # [T, k]
        is_k = is_k.expand(T)[:, None]  # [T, 1]
        out_ids = torch.cat([torch.where(is_k, ids_k, out_ids[:, :k]), out_ids[:, k:]], dim=1)  # [T, E]
        out_w = torch.cat([torch.where(is_k, w_k, out_w[:, :k]), out_w[:, k:]], dim=1)  # [T, E]
    tok, slot = keep.nonzero(as_tuple=True)  # [P] token-major, output order
    offsets = torch.zeros(T + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(n, dim=0)
    return Assignment(T, E, tok, out_ids[tok, slot], out_w[tok, slot].float(), offsets)


route_sigmoid = route_grouped  # the name under which the sigmoid rule was first exported


# ----------------------------------------------------------------------------------------------
# native dynamic routing


def relu_route(router_out: torch.Tensor) -> Assignment:
    """ReLU routing (ReMoE; BlockFFN after its RMSNorm): expert e is active for token t where
    `router_out[t, e] > 0`, with weight `router_out[t, e]` (float32). A token may use 0..E experts.

    `router_out` [T, E] is the router output *before* the ReLU or after it (same result); apply any
    normalisation (BlockFFN's RMSNorm) before calling. Pairs are token-major, by expert id.
    """
    out = router_out.float()  # [T, E]
    return Assignment.from_mask(out > 0, out)


def route_with_zero_experts(
    scores: torch.Tensor,
    num_ffn_experts: int,
    zero_kinds: Sequence[str] | str,
    top_k: int,
    *,
    scoring: str = "softmax",
    selection_bias: torch.Tensor | None = None,
    renormalize: bool = False,
    scaling_factor: float = 1.0,
) -> Assignment:
    """Top-k routing over FFN experts plus zero-computation experts; only FFN experts cost work.

    Columns of `scores` [T, N + Z]: 0..N-1 are the N = `num_ffn_experts` FFN experts, N..N+Z-1
    the zero-computation experts, whose kinds `zero_kinds` gives (one per zero expert, or one
    string for all):
      - "zero":     contributes nothing (AdaMoE null expert, MoE++ zero expert);
      - "identity": adds `w * x` (LongCat-Flash zero expert, MoE++ copy expert).
    Steps: s = softmax(scores) ("softmax"), sigmoid(scores) ("sigmoid") or scores as given
    ("none"), in float32; select the top `top_k` of `s + selection_bias` (the bias, e.g.
    LongCat's `e_score_correction_bias` [N + Z], only steers selection); weights are the unbiased
    s of the selected experts; if `renormalize`, divided by their sum over the selected experts
    that are not "zero" kind (= AdaMoE renormalising over real experts; MoE++ zeroing the zero
    expert then renormalising); finally multiplied by `scaling_factor` (LongCat's
    `routed_scaling_factor`; LongCat uses renormalize=False).

    Returns an Assignment over the N FFN experts (pairs token-major, in selection rank order; a
    token may have 0..top_k pairs), with `identity_weight` [T] = summed weight of the selected
    identity experts (None when no expert is of kind "identity") and `num_selected` [T] =
    top_k for every token (FFN + zero-computation experts picked) and `selection` = every pick (ids over
    the N + Z columns, in selection rank order), which routed-experts reporting returns.
    """
    T, total = scores.shape
    N = num_ffn_experts
    Z = total - N
    if Z < 0:
        raise ValueError(f"num_ffn_experts ({N}) exceeds the number of score columns ({total})")
    kinds = [zero_kinds] * Z if isinstance(zero_kinds, str) else list(zero_kinds)
    if len(kinds) != Z or any(k not in ZERO_EXPERT_KINDS for k in kinds):
        raise ValueError(f"zero_kinds must give one of {ZERO_EXPERT_KINDS} for each of the {Z} zero experts")
    device = scores.device
    if scoring == "softmax":
        s = torch.softmax(scores.float(), dim=-1)  # [T, N+Z]
    elif scoring == "sigmoid":
        s = torch.sigmoid(scores.float())  # [T, N+Z]
    elif scoring == "none":
        s = scores.float()  # [T, N+Z]
    else:
        raise ValueError(f"scoring must be 'softmax', 'sigmoid' or 'none', got {scoring!r}")
    k = min(top_k, total)
    choice = s if selection_bias is None else s + selection_bias.float()  # [T, N+Z]
    ids = torch.topk(choice, k, dim=-1).indices  # [T, k]
    w = s.gather(1, ids)  # [T, k]
    is_ffn = ids < N  # [T, k]
    # kind per column: 0 = FFN, 1 = zero, 2 = identity
    col_kind = torch.tensor([0] * N + [1 if x == "zero" else 2 for x in kinds], device=device)  # [N+Z]
    sel_kind = col_kind[ids]  # [T, k]
    if renormalize:
        denom = (w * (sel_kind != 1)).sum(dim=-1, keepdim=True)  # [T, 1]
        w = w / denom.clamp_min(torch.finfo(torch.float32).tiny)
    w = w * scaling_factor  # [T, k]
    identity_weight = None
    if "identity" in kinds:
        identity_weight = (w * (sel_kind == 2)).sum(dim=-1)  # [T]
    tok, slot = is_ffn.nonzero(as_tuple=True)  # [P] token-major, rank order
    offsets = torch.zeros(T + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(is_ffn.sum(dim=-1), dim=0)
    num_selected = torch.full((T,), k, dtype=torch.int64, device=device)
    selection = Assignment.from_topk(ids, w, total)  # every pick, zero experts as ids N..N+Z-1
    return Assignment(
        T,
        N,
        tok,
        ids[tok, slot],
        w[tok, slot],
        offsets,
        identity_weight,
        num_selected=num_selected,
        selection=selection,
    )


__all__ = [
    "ZERO_EXPERT_KINDS",
    "checkpoint_top_k",
    "drop_excluded",
    "relu_route",
    "route",
    "route_grouped",
    "route_probs",
    "route_sigmoid",
    "route_with_zero_experts",
    "router_probs",
]
