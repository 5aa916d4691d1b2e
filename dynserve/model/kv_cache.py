"""The paged KV cache's layout (attention layers, KV heads, head dim) per architecture, its size per
block, and its allocation (one [2, num_blocks, block_size, Hkv, D] tensor per attention layer)."""

from __future__ import annotations

import torch

from dynserve.config import ModelConfig
from dynserve.model import hugepages
from dynserve.model.decoder import torch_dtype
from dynserve.model.registry import get_model_class


def kv_cache_layout(model_config: ModelConfig) -> tuple[int, int, int]:
    """(attention layers, KV heads, head dim) of the paged KV cache. The config's num_hidden_layers /
    num_key_value_heads / head_dim, unless the architecture class defines a `kv_cache_layout(model_config)`
    classmethod (several attention sublayers per layer, latent attention caching another head size)."""
    try:
        cls = get_model_class(model_config.architecture)
    except ValueError:
        cls = None
    layout = getattr(cls, "kv_cache_layout", None)
    if layout is not None:
        return layout(model_config)
    return model_config.num_layers, model_config.num_kv_heads, model_config.head_dim


def num_attention_layers(model_config: ModelConfig) -> int:
    return kv_cache_layout(model_config)[0]


def kv_cache_bytes_per_block(model_config: ModelConfig, block_size: int, dtype: str | torch.dtype) -> int:
    """Bytes one KV block takes across all attention layers (K and V)."""
    elem = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    layers, kv_heads, head_dim = kv_cache_layout(model_config)
    return layers * 2 * block_size * kv_heads * head_dim * elem


def allocate_kv_caches(
    model_config: ModelConfig, num_blocks: int, block_size: int, device: torch.device | str, dtype: str | torch.dtype
) -> list[torch.Tensor]:
    """One zeroed [2, num_blocks, block_size, Hkv, D] tensor per attention layer (see `kv_cache_layout`)."""
    layers, kv_heads, head_dim = kv_cache_layout(model_config)
    shape = (2, num_blocks, block_size, kv_heads, head_dim)
    dt = torch_dtype(dtype)
    return [hugepages.zeros(shape, dt, device) for _ in range(layers)]
