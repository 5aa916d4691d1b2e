"""The paged KV cache's layout (attention layers, KV heads, head dim, whether K and V share storage) per
architecture, its size per block, and its allocation (one [2, num_blocks, block_size, Hkv, D] tensor per
attention layer; with shared K/V a stride-0 view of one [1, num_blocks, block_size, Hkv, D] tensor)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from dynserve.config import ModelConfig
from dynserve.model import hugepages
from dynserve.model.decoder import torch_dtype
from dynserve.model.registry import get_model_class


class KVCacheLayout(NamedTuple):
    """One model's paged cache: `num_layers` tensors of [2, blocks, block_size, num_kv_heads, head_dim].
    `shared_kv`: K and V are one tensor (multi-head latent attention caches the latent once and
    attends with V = K), so a block costs half."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    shared_kv: bool = False


def kv_cache_layout(model_config: ModelConfig) -> KVCacheLayout:
    """The paged KV cache's layout: the config's num_hidden_layers / num_key_value_heads / head_dim,
    unless the architecture class defines a `kv_cache_layout(model_config)` classmethod (several
    attention sublayers per layer, latent attention caching one latent row per token)."""
    try:
        cls = get_model_class(model_config.architecture)
    except ValueError:
        cls = None
    layout = getattr(cls, "kv_cache_layout", None)
    if layout is not None:
        return KVCacheLayout(*layout(model_config))
    return KVCacheLayout(model_config.num_layers, model_config.num_kv_heads, model_config.head_dim)


def num_attention_layers(model_config: ModelConfig) -> int:
    return kv_cache_layout(model_config)[0]


def kv_cache_bytes_per_block(model_config: ModelConfig, block_size: int, dtype: str | torch.dtype) -> int:
    """Bytes one KV block takes across all attention layers (K and V, or the shared latent once)."""
    elem = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    layers, kv_heads, head_dim, shared = kv_cache_layout(model_config)
    return layers * (1 if shared else 2) * block_size * kv_heads * head_dim * elem


def allocate_kv_caches(
    model_config: ModelConfig, num_blocks: int, block_size: int, device: torch.device | str, dtype: str | torch.dtype
) -> list[torch.Tensor]:
    """One zeroed [2, num_blocks, block_size, Hkv, D] tensor per attention layer (see `kv_cache_layout`);
    with shared K/V, a [1, ...] tensor expanded to 2 (both halves are the same memory)."""
    layers, kv_heads, head_dim, shared = kv_cache_layout(model_config)
    shape = (1 if shared else 2, num_blocks, block_size, kv_heads, head_dim)
    dt = torch_dtype(dtype)
    caches = [hugepages.zeros(shape, dt, device) for _ in range(layers)]
    return [c.expand(2, *shape[1:]) for c in caches] if shared else caches
