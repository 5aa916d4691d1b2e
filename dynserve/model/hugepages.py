"""Transparent huge pages for the big CPU tensors (weights, KV cache).

A decode step streams every weight once and reads KV blocks all over the pool; with 4 KB pages that
is a TLB miss every 4 KB. Linux backs a region with 2 MB pages when it is `madvise(MADV_HUGEPAGE)`d
before it is first touched (the default THP mode "madvise" does nothing otherwise), so these
helpers allocate a 2 MB-aligned, advised buffer and only then write into it.

Only on Linux CPU tensors of at least 2 MB; anywhere else (or with `DYNSERVE_HUGEPAGES=0`) they
return ordinary tensors, so callers need no special case.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch
from torch import nn

_HUGE = 2 * 1024 * 1024
_MADV_HUGEPAGE = 14
_libc: ctypes.CDLL | None = None


def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    global _libc
    if not sys.platform.startswith("linux") or os.environ.get("DYNSERVE_HUGEPAGES", "1") == "0":
        return None
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fn = _libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.empty(shape, dtype) whose memory is 2 MB-aligned and advised for huge pages (CPU, Linux,
    >= 2 MB); untouched, so the pages fault in huge when first written."""
    device = torch.device(device)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    madvise = _madvise() if device.type == "cpu" else None
    if madvise is None or nbytes < _HUGE:
        return torch.empty(shape, dtype=dtype, device=device)
    raw = torch.empty(nbytes + _HUGE, dtype=torch.uint8)  # large: mmap'd by malloc, not yet touched
    start = raw.data_ptr()
    offset = (-start) % _HUGE
    length = (nbytes // _HUGE) * _HUGE
    madvise(start + offset, length, _MADV_HUGEPAGE)  # best effort: a failure leaves normal pages
    return raw[offset : offset + nbytes].view(dtype).view(shape)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    return empty(shape, dtype, device).zero_()


def move_parameters(module: nn.Module) -> int:
    """Re-home every CPU parameter and buffer of >= 2 MB in huge-page memory (data copied, tensors
    kept: the same Parameter objects point at the new storage, tied weights stay tied). Returns the
    number of bytes moved."""
    if _madvise() is None:
        return 0
    moved: dict[int, torch.Tensor] = {}  # old storage address -> new tensor (tied weights share one)
    done: set[int] = set()  # tensors already re-homed (a tied Parameter is listed once per owner)
    total = 0
    for tensors in (list(module.named_parameters(remove_duplicate=False)), list(module.named_buffers())):
        for _, t in tensors:
            if id(t) in done or t.device.type != "cpu" or t.numel() * t.element_size() < _HUGE:
                continue
            if not t.is_contiguous():
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
