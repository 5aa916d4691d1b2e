"""Checkpoint loading: config.json + *.safetensors (single file or sharded) -> a ready CausalLM.

Owns reading safetensors lazily (one tensor at a time, so peak host memory stays near one copy of
the model), building the architecture class on the meta device and materialising its weights on
the engine's device in the configured dtype. (The KV cache's layout and allocation: model/kv_cache.py.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import dynserve_kernels
import torch
from safetensors import safe_open

from dynserve.config import EngineConfig, ModelConfig, default_model_dir
from dynserve.model import hugepages
from dynserve.model.base import CausalLM
from dynserve.model.experts import ExpertExecutor, use_experts
from dynserve.model.layers import set_backend
from dynserve.model.registry import get_model_class

_INDEX = "model.safetensors.index.json"


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


def load_model(config: EngineConfig, experts: ExpertExecutor | None = None) -> CausalLM:
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
    if experts is not None:  # e.g. expert parallelism: keep only the experts this process runs
        use_experts(model, experts)
    if torch.device(config.device).type == "cpu":
        hugepages.move_parameters(model)  # decode streams every weight: 2 MB pages spare the TLB
    return model.eval()


__all__ = ["SafetensorsWeights", "build_model", "default_model_dir", "load_model"]
