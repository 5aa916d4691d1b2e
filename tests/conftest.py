"""Shared fixtures: tiny random-weight Hugging Face checkpoints (built by tests/checkpoints.py) and the
device the kernel tests run on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU the Triton kernels run on the CPU interpreter; with one they are compiled for it
# (TRITON_INTERPRET=1 in the environment still forces the interpreter). Set before triton is imported.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tiny test models gain nothing from intra-op threads, and on a busy 2-core machine extra threads
# oversubscribe the cores (10-30x slower). Also inherited by the server subprocesses tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from checkpoints import make_checkpoint  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def kernel_device() -> str:
    """Where the Triton kernel tests run: "cuda" when kernels are compiled for a GPU, else "cpu"."""
    return "cuda" if _cuda_available() and os.environ.get("TRITON_INTERPRET", "0") != "1" else "cpu"


@pytest.fixture(scope="session")
def device() -> str:
    return kernel_device()


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(arch, **overrides) -> path of a cached tiny checkpoint."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "mixtral", seed: int = 0, num_shards: int = 1, **overrides: object) -> Path:
        key = (arch, seed, num_shards, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = make_checkpoint(tmp_path_factory.mktemp(f"ckpt_{arch}"), arch, seed, num_shards, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def mixtral_dir(checkpoint_factory) -> Path:
    return checkpoint_factory("mixtral")
