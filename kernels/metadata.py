"""AttentionMetadata: what the paged-attention kernels read about a step, as plain tensors.

Owned by the kernels package so that kernels depend on nothing above them (the model's
`ForwardBatch` extends it with the token tensors and routing of a step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(kw_only=True)
class AttentionMetadata:
    """Paged-KV layout of one step: B sequences, T new tokens in total.

    Sequence b's new tokens are rows query_start_loc[b]:query_start_loc[b+1] of q; they sit at
    positions seq_lens[b]-query_len_b .. seq_lens[b]-1 of that sequence, so its first
    seq_lens[b]-query_len_b positions (cached prefix, earlier chunks) are read from the KV cache
    through block_tables[b].
    """

    query_start_loc: torch.Tensor  # [B+1] int64 (cumulative query lengths)
    seq_lens: torch.Tensor  # [B] int64 context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int64 (padded with 0)
    max_query_len: int
    max_seq_len: int
    block_size: int
    # query_start_loc / seq_lens as Python lists (host copies: loops must not sync a device)
    query_start_loc_host: list[int] = field(default_factory=list)
    seq_lens_host: list[int] = field(default_factory=list)
    # what kernel wrappers derive once per step and reuse in every layer (converted, validated block
    # tables; checks of the step's layout), keyed by the wrapper; owned by the kernels package
    kernel_memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.numel())


def kv_halves_dense(kv_cache: torch.Tensor) -> bool:
    """Whether a paged cache [2, N, bs, Hkv, D] fits the kernels: each half (K, V) dense. The halves
    may share storage (stride(0) == 0, `kv_cache = latent.expand(2, ...)`): then K and V are one
    tensor, the layout of multi-head latent attention's compressed cache."""
    if kv_cache.dim() != 5:
        return False
    # kv_cache[i].is_contiguous() for both halves, from the strides (no views: this runs every layer)
    shape, strides = kv_cache.shape, kv_cache.stride()
    if 0 in shape:
        return True
    expected = 1
    for i in range(4, 0, -1):
        if shape[i] != 1 and strides[i] != expected:
            return False
        expected *= shape[i]
    return True
