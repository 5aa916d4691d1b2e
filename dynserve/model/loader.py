"""Checkpoint loading: config.json + *.safetensors (single file or sharded) -> a ready CausalLM.

Owns reading safetensors lazily (one tensor at a time, so peak host memory stays near one copy of
the model), building the architecture class on the meta device and materialising its weights on
the engine's device in the configured dtype; plus KV-cache sizing and allocation helpers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import dynserve_kernels
import torch
from safetensors import safe_open

from dynserve.config import EngineConfig, ModelConfig
from dynserve.model import hugepages
from dynserve.model.base import CausalLM
from dynserve.model.decoder import torch_dtype
from dynserve.model.layers import set_backend
from dynserve.model.registry import get_model_class

_INDEX = "model.safetensors.index.json"


def default_model_dir() -> str:
    """Path of the model shipped inside the package (dynserve/assets/default_model)."""
    return str(Path(__file__).resolve().parent.parent / "assets" / "default_model")


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """Read-only name -> tensor mapping over a checkpoint's safetensors files; tensors are read
    from disk on access (host memory), never all at once."""

    def __init__(self, model_dir: str | os.PathLike) -> None:
        path = Path(model_dir)
        index = path / _INDEX
        self._where: dict[str, Path] = {}
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for name, fname in weight_map.items():
                self._where[name] = path / fname
            for f in set(self._where.values()):
                if not f.is_file():
                    raise FileNotFoundError(f"{index} lists shard {f.name!r}, which is missing")
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in model directory {str(path)!r}")
            for f in files:
                with safe_open(str(f), framework="pt") as fh:
                    for name in fh.keys():
                        self._where[name] = f
        self._handles: dict[Path, object] = {}

    def _handle(self, f: Path):  # safe_open handle, cached per file
        h = self._handles.get(f)
        if h is None:
            h = safe_open(str(f), framework="pt", device="cpu")
            self._handles[f] = h
        return h

    def __getitem__(self, name: str) -> torch.Tensor:
        f = self._where.get(name)
        if f is None:
            raise KeyError(f"checkpoint is missing tensor {name!r}")
        return self._handle(f).get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        self._handles.clear()


def build_model(model_config: ModelConfig, device: torch.device | str = "cpu", backend: str = "torch") -> CausalLM:
    """The architecture class for `model_config`, constructed on the meta device (no weights yet)."""
    cls = get_model_class(model_config.architecture)
    with torch.device("meta"):
        model = cls(model_config, device=device)
    set_backend(model, backend)
    return model


def load_model(config: EngineConfig) -> CausalLM:
    """Build `config.model`'s architecture and load its safetensors weights on `config.device` in
    `config.model.dtype`; kernels use the backend `select_backend(config.device, config.use_triton)`."""
    mc = config.model
    backend = dynserve_kernels.select_backend(config.device, config.use_triton)
    model = build_model(mc, device=config.device, backend=backend)
    weights = SafetensorsWeights(mc.model_dir)
    try:
        model.load_weights(weights)
    finally:
        weights.close()
    if torch.device(config.device).type == "cpu":
        hugepages.move_parameters(model)  # decode streams every weight: 2 MB pages spare the TLB
    return model.eval()


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
