"""Routed experts per token, ragged: what each token position was routed to in every MoE layer (expert
ids in routing order and their weights), for RL users who replay the routing in a trainer.

Owns:
  - `RoutedExperts`: rows of consecutive token positions on the host; a row is, per MoE layer, the
    expert ids (and weights) of that position, or None for a position that was not computed (served
    from the prefix cache, or a sequence's last token, which no step fed through the model).
  - `RoutedStep`: one step's assignments of every MoE layer gathered to the host once, re-ordered
    token-major (token, then layer, then routing order) on the device before the copy, so a
    sequence's rows are one contiguous slice.
  - `RoutedExpertsBuilder`: a sequence's rows as they are computed, each position kept once (a
    recompute after preemption does not add it again).
  - `expert_token_counts`: a step's per-(layer, expert) token counts on the device, with no host sync.

Ids are what the router picked: FFN experts 0..E-1 and, for zero-computation experts (LongCat-Flash),
their router columns E.. (so a trainer can replay them); usage accounting counts only ids < E.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dynserve.routing.base import Assignment

Row = list[list[int]] | None  # per MoE layer, the expert ids of one token position; None: not computed


@dataclass
class RoutedExperts:
    """Ragged routed experts of N consecutive token positions over L MoE layers (host tensors).

    Pairs are token-major, then layer, then routing order: position i, layer l owns pairs
    [offsets[i*L + l], offsets[i*L + l + 1]). `computed[i]` is False for a position that was not
    computed (its row is None and it owns no pairs).
    """

    num_layers: int
    computed: torch.Tensor  # [N] bool
    counts: torch.Tensor  # [N, L] int32 experts per position and layer
    ids: torch.Tensor  # [P] int32 expert ids
    weights: torch.Tensor  # [P] float32 routing weights

    @classmethod
    def empty(cls, num_layers: int, num_rows: int = 0) -> RoutedExperts:
        """`num_rows` rows that were not computed (None)."""
        return cls(
            num_layers,
            torch.zeros(num_rows, dtype=torch.bool),
            torch.zeros(num_rows, num_layers, dtype=torch.int32),
            torch.zeros(0, dtype=torch.int32),
            torch.zeros(0, dtype=torch.float32),
        )

    @classmethod
    def concat(cls, parts: Sequence[RoutedExperts], num_layers: int) -> RoutedExperts:
        if not parts:
            return cls.empty(num_layers)
        if len(parts) == 1:
            return parts[0]
        return cls(
            num_layers,
            torch.cat([p.computed for p in parts]),
            torch.cat([p.counts for p in parts]),
            torch.cat([p.ids for p in parts]),
            torch.cat([p.weights for p in parts]),
        )

    def __len__(self) -> int:
        return int(self.computed.numel())

    def offsets(self) -> torch.Tensor:
        """[N*L + 1] int64: CSR offsets of the (position, layer) cells into `ids` / `weights`."""
        out = torch.zeros(self.counts.numel() + 1, dtype=torch.int64)
        out[1:] = torch.cumsum(self.counts.reshape(-1).to(torch.int64), dim=0)
        return out

    def tolist(self) -> list[Row]:
        """Per position, per MoE layer, the expert ids (None for a position not computed)."""
        return self._nested(self.ids.tolist())

    def weights_tolist(self) -> list[list[list[float]] | None]:
        """The routing weights in the shape of `tolist()`."""
        return self._nested(self.weights.tolist())

    def __getitem__(self, i: int) -> Row:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        i %= n
        return self.slice(i, i + 1).tolist()[0]

    def slice(self, begin: int, end: int) -> RoutedExperts:
        """Positions begin .. end-1 (clamped)."""
        n = len(self)
        begin, end = max(0, min(begin, n)), max(0, min(end, n))
        end = max(begin, end)
        per_pos = self.counts.sum(dim=1, dtype=torch.int64)  # [N]
        p0 = int(per_pos[:begin].sum())
        p1 = p0 + int(per_pos[begin:end].sum())
        return RoutedExperts(
            self.num_layers,
            self.computed[begin:end],
            self.counts[begin:end],
            self.ids[p0:p1],
            self.weights[p0:p1],
        )

    def num_pairs(self, below: int | None = None) -> int:
        """Pairs in all rows; with `below`, only ids < below (the FFN experts usage counts)."""
        return int(self.ids.numel()) if below is None else int((self.ids < below).sum())

    def _nested(self, flat: list) -> list:
        counts = self.counts.tolist()
        computed = self.computed.tolist()
        out: list = []
        k = 0
        for done, row in zip(computed, counts, strict=True):
            if not done:
                out.append(None)
                continue
            layers = []
            for c in row:
                layers.append(flat[k : k + c])
                k += c
            out.append(layers)
        return out


def _token_major(assignments: list[Assignment]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's pairs of every layer, re-ordered token-major (token, layer, routing order) on their
    device without a host sync: counts [T, L] int32, ids [P] int32, weights [P] float32."""
    use = [a.selection if a.selection is not None else a for a in assignments]
    device = use[0].token_offsets.device
    L = len(use)
    offs = torch.stack([a.token_offsets for a in use])  # [L, T+1]
    counts_lt = offs[:, 1:] - offs[:, :-1]  # [L, T]
    T = counts_lt.shape[1]
    counts_tl = counts_lt.T.contiguous()  # [T, L]
    base = torch.zeros(T * L + 1, dtype=torch.int64, device=device)  # [T*L+1] exclusive cumsum over cells
    base[1:] = torch.cumsum(counts_tl.reshape(-1), dim=0)
    sizes = [a.num_pairs for a in use]
    P = sum(sizes)
    layer = torch.repeat_interleave(
        torch.arange(L, device=device), torch.tensor(sizes, device=device), output_size=P
    )  # [P]
    tok = torch.cat([a.token_ids for a in use])  # [P]
    layer_start = torch.zeros(L, dtype=torch.int64, device=device)  # [L] first pair of each layer
    layer_start[1:] = torch.cumsum(torch.tensor(sizes[:-1], dtype=torch.int64, device=device), dim=0)
    rank = torch.arange(P, device=device) - layer_start[layer] - (offs[layer, tok] - offs[layer, 0])  # [P]
    dest = base[tok * L + layer] + rank  # [P]
    ids = torch.empty(P, dtype=torch.int32, device=device)
    ids[dest] = torch.cat([a.expert_ids for a in use]).to(torch.int32)
    weights = torch.empty(P, dtype=torch.float32, device=device)
    weights[dest] = torch.cat([a.weights for a in use]).float()
    return counts_tl.to(torch.int32), ids, weights


@dataclass
class RoutedStep:
    """One step's routed experts on the host, token-major, for the sequences that asked for them."""

    num_layers: int
    counts: torch.Tensor  # [T, L] int32
    ids: torch.Tensor  # [P] int32
    weights: torch.Tensor  # [P] float32
    pair_offsets: torch.Tensor  # [T+1] int64: token t owns pairs [pair_offsets[t], pair_offsets[t+1])

    @classmethod
    def gather(cls, assignments: list[Assignment], num_tokens: int) -> RoutedStep:
        """Copy the step's assignments of every MoE layer to the host (three copies in all)."""
        L = len(assignments)
        if L == 0:
            z = torch.zeros(0, dtype=torch.int32)
            offsets = torch.zeros(num_tokens + 1, dtype=torch.int64)
            return cls(0, torch.zeros(num_tokens, 0, dtype=torch.int32), z, z.float(), offsets)
        counts, ids, weights = (t.cpu() for t in _token_major(assignments))
        pair_offsets = torch.zeros(counts.shape[0] + 1, dtype=torch.int64)
        pair_offsets[1:] = torch.cumsum(counts.sum(dim=1, dtype=torch.int64), dim=0)
        return cls(L, counts, ids, weights, pair_offsets)

    def rows(self, begin: int, end: int) -> RoutedExperts:
        """Tokens begin .. end-1 of the step (one sequence's slice), all computed; copies, so a sequence
        that keeps them does not keep the whole step's arrays alive."""
        p0, p1 = int(self.pair_offsets[begin]), int(self.pair_offsets[end])
        return RoutedExperts(
            self.num_layers,
            torch.ones(end - begin, dtype=torch.bool),
            self.counts[begin:end].clone(),
            self.ids[p0:p1].clone(),
            self.weights[p0:p1].clone(),
        )


class RoutedExpertsBuilder:
    """A sequence's routed experts as steps compute its positions: rows from `first_position` on are
    kept, each position once (the first computation wins: a recompute after preemption adds nothing);
    positions never computed read as None."""

    def __init__(self, num_layers: int, first_position: int = 0) -> None:
        self.num_layers = num_layers
        self.first_position = first_position
        self._starts: list[int] = []
        self._chunks: list[RoutedExperts] = []
        self.recorded_upto = first_position  # positions below this were computed or skipped

    def add(self, start: int, rows: RoutedExperts) -> None:
        """Rows of positions start .. start+len(rows)-1, just computed."""
        skip = max(0, self.recorded_upto - start)
        if skip >= len(rows):
            return
        if skip:
            rows = rows.slice(skip, len(rows))
            start += skip
        self._starts.append(start)
        self._chunks.append(rows)
        self.recorded_upto = start + len(rows)

    def rows(self, begin: int, end: int) -> RoutedExperts:
        """Positions begin .. end-1; those not computed (or before `first_position`) are None rows."""
        parts: list[RoutedExperts] = []
        pos = begin
        i = max(0, bisect.bisect_right(self._starts, begin) - 1)
        while pos < end and i < len(self._chunks):
            s, chunk = self._starts[i], self._chunks[i]
            e = s + len(chunk)
            i += 1
            if e <= pos:
                continue
            if s > pos:
                gap = min(s, end) - pos
                parts.append(RoutedExperts.empty(self.num_layers, gap))
                pos += gap
                if pos >= end:
                    break
            take = min(e, end)
            parts.append(chunk.slice(pos - s, take - s))
            pos = take
        if pos < end:
            parts.append(RoutedExperts.empty(self.num_layers, end - pos))
        return RoutedExperts.concat(parts, self.num_layers)


def expert_token_counts(assignments: list[Assignment], num_experts: int) -> torch.Tensor:
    """[L, E] int64 on the assignments' device: token positions routed to each FFN expert in each MoE
    layer, with no host sync (CUDA's bincount would sync: an index_add there)."""
    if not assignments:
        return torch.zeros(0, num_experts, dtype=torch.int64)
    L = len(assignments)
    if all(a.expert_counts is not None for a in assignments):  # counted by the routing kernel
        return torch.stack([a.expert_counts for a in assignments])  # [L, E]
    flat = torch.cat([a.expert_ids.to(torch.int64) + layer * num_experts for layer, a in enumerate(assignments)])  # [P]
    if flat.is_cuda:
        out = torch.zeros(L * num_experts, dtype=torch.int64, device=flat.device)
        out.index_add_(0, flat, torch.ones_like(flat))
    else:
        out = torch.bincount(flat, minlength=L * num_experts)
    return out.view(L, num_experts)  # [L, E]


__all__ = ["RoutedExperts", "RoutedExpertsBuilder", "RoutedStep", "Row", "expert_token_counts"]
