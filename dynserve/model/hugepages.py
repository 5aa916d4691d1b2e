"""Transparent huge pages for the big CPU tensors (weights, KV cache).

A decode step streams every weight once and reads KV blocks all over the pool; with 4 KB pages that
is a TLB miss every 4 KB. Linux backs a region with 2 MB pages when it is `madvise(MADV_HUGEPAGE)`d
before it is first touched (the default THP mode "madvise" does nothing otherwise), so these
helpers map fresh anonymous memory, advise its 2 MB-aligned part, and only then write into it.

Only on Linux, for CPU tensors of at least 2 MB; anywhere else (or with `DYNSERVE_HUGEPAGES=0`)
they return ordinary tensors, so callers need no special case. The tensors are views into a
slightly larger mapping: `safetensors.torch.save_model` refuses them and `torch.save` writes the
whole mapping, so clone weights before saving them (dynserve itself never saves a model).
"""

from __future__ import annotations

import mmap
import os
import sys

import torch
from torch import nn

_HUGE = 2 * 1024 * 1024


def _enabled() -> bool:
    return (
        sys.platform.startswith("linux")
        and hasattr(mmap, "MADV_HUGEPAGE")
        and os.environ.get("DYNSERVE_HUGEPAGES", "1") != "0"
    )


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.empty(shape, dtype) whose memory is 2 MB-aligned and advised for huge pages (CPU, Linux,
    >= 2 MB); untouched, so the pages fault in huge when first written."""
    device = torch.device(device)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < _HUGE or not _enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    # a fresh anonymous mapping: never-touched pages, unlike a malloc that may reuse heap memory
    # (private: a shared anonymous mapping is shmem, which THP leaves alone by default)
    region = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive
    offset = (-raw.data_ptr()) % _HUGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, offset, (nbytes // _HUGE) * _HUGE)
    except OSError:
        pass  # best effort: ordinary pages
    return raw[offset : offset + nbytes].view(dtype).view(shape)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    return empty(shape, dtype, device).zero_()


def move_parameters(module: nn.Module) -> int:
    """Re-home every CPU parameter and buffer of >= 2 MB in huge-page memory (data copied, tensors
    kept: the same Parameter objects point at the new storage, tied weights stay tied). Returns the
    number of bytes moved."""
    if not _enabled():
        return 0
    moved: dict[int, torch.Tensor] = {}  # old storage address -> new tensor (tied weights share one)
    done: set[int] = set()  # tensors already re-homed (a tied Parameter is listed once per owner)
    total = 0
    for tensors in (list(module.named_parameters(remove_duplicate=False)), list(module.named_buffers())):
        for _, t in tensors:
            big = t.numel() * t.element_size() >= _HUGE
            if id(t) in done or t.device.type != "cpu" or not big or not t.is_contiguous():
                continue
            done.add(id(t))
            key = t.data_ptr()
            if key not in moved:
                new = empty(tuple(t.shape), t.dtype)
                new.copy_(t)
                moved[key] = new
                total += t.numel() * t.element_size()
            t.data = moved[key]
    return total
