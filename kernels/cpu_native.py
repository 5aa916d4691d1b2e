"""Native CPU kernels (kernels/csrc/cpu_kernels.c): built on first use, loaded with ctypes.

The torch references are the portable CPU path; these kernels replace them where plain torch has
to copy, pad or loop in Python:
- `paged_decode_attention` reads K/V in place through the block tables, where the reference first
  gathers every sequence's blocks into a padded [B, Lmax, Hkv, D] copy;
- `fused_moe` runs every expert of a decode-sized assignment in one call with a small-M GEMM that
  streams each expert's weights once (MKL's GEMM packs them first and is tuned for large M), where
  the reference issues ~8 torch ops per expert. Large batches (prefill) stay on the reference.
`takes_linear`, `takes_moe` and `takes_decode_attention` say which calls a kernel takes. Every kernel
has a float32 and a bfloat16 version (bfloat16 weights, activations and KV cache, float32 accumulation).

Building: the C file is compiled once per source/compiler/CPU with `$CC` (default `cc`) using
`-O3 -march=native -fopenmp` into `$DYNSERVE_CACHE_DIR` (default `~/.cache/dynserve/kernels`),
written to a temporary name and renamed, so concurrent processes never load a half-written file;
if that folder is not writable, a private per-user folder under the temp dir is used.
No compiler, a failed build or `DYNSERVE_NATIVE_CPU=0` makes `available()` False and callers fall
back to the torch references; the reason is in `unavailable_reason()`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from dynserve_kernels.metadata import kv_halves_dense

if TYPE_CHECKING:
    from dynserve_kernels.metadata import AttentionMetadata

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("csrc") / "cpu_kernels.c"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


def _cpu_signature() -> str:
    """The host's ISA flags: a -march=native build must not be reused on a different CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dirs() -> list[Path]:
    """Where builds may go, in order: the configured cache, then a private per-user temp folder."""
    base = os.environ.get("DYNSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dynserve")
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return [Path(base) / "kernels", Path(tempfile.gettempdir()) / f"dynserve-kernels-{user}"]


def _writable_dir(d: Path) -> bool:
    """Create `d` if needed; usable when writable, and, for the shared temp location, private to us
    (never load a library another user could have planted)."""
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(d, os.W_OK | os.X_OK):
            return False
        if d.parent == Path(tempfile.gettempdir()) and hasattr(os, "getuid"):
            st = d.stat()
            return st.st_uid == os.getuid() and not st.st_mode & 0o022
        return True
    except OSError:
        return False


def build_library(flags: list[str], out_dir: Path | None = None) -> ctypes.CDLL:
    """Compile kernels/csrc/cpu_kernels.c with `$CC` and `flags` (or reuse that build), load it and
    declare its C signatures. Raises RuntimeError when no compiler or no writable folder exists, or
    the build fails."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found on PATH)")
    src = _SRC.read_bytes()
    key = hashlib.sha256(b"\0".join([src, cc.encode(), " ".join(flags).encode(), _cpu_signature().encode()]))
    dirs = [out_dir] if out_dir is not None else _cache_dirs()
    target = next((d for d in dirs if _writable_dir(d)), None)
    if target is None:
        raise RuntimeError(f"no writable folder for the kernel build (tried {', '.join(map(str, dirs))})")
    so = target / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if not so.is_file():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, str(_SRC), "-o", tmp, "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
            os.replace(tmp, so)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(so))
    fn = lib.dyn_paged_decode_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _f32, _ptr, _i64, _ptr, _i64]
    fn = lib.dyn_moe_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64]
    fn = lib.dyn_gemm_nt_f32
    fn.restype = None
    fn.argtypes = [_ptr, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64, _i64]
    fn = lib.dyn_paged_decode_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _f32, _ptr, _i64, _ptr, _i64]
    fn = lib.dyn_moe_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64]
    fn = lib.dyn_gemm_nt_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [_ptr, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64]
    fn = lib.dyn_in_range
    fn.restype = ctypes.c_int
    fn.argtypes = [_ptr, _i64, _i64, _i64]
    fn = lib.dyn_offsets_ok
    fn.restype = ctypes.c_int
    fn.argtypes = [_ptr, _i64, _i64]
    fn = lib.dyn_moe_group
    fn.restype = None
    fn.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr]
    for fn in (lib.dyn_rope_f32, lib.dyn_rope_bf16):
        fn.restype = None
        fn.argtypes = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64]
    fn = lib.dyn_write_kv
    fn.restype = ctypes.c_int
    fn.argtypes = [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64]
    for fn in (lib.dyn_rmsnorm_f32, lib.dyn_rmsnorm_bf16):
        fn.restype = None
        fn.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32]
    for fn in (lib.dyn_attn_block_f32, lib.dyn_attn_block_bf16):
        fn.restype = ctypes.c_int
        fn.argtypes = [*[_ptr] * 11, *[_i64] * 6, _f32, _f32, _ptr, _i64, _ptr, _i64, _ptr, _i64, _f32, _i64]
    for fn in (lib.dyn_decode_layers_f32, lib.dyn_decode_layers_bf16):
        fn.restype = _i64
        fn.argtypes = [
            *[_ptr] * 7, *[_i64] * 8, _f32, _f32, _ptr, _i64, _ptr, _i64, _ptr, _i64, _f32, _i64, _i64,
            *[_ptr] * 8, _i64,
        ]  # fmt: skip
    for fn in (lib.dyn_moe_block_f32, lib.dyn_moe_block_bf16):
        fn.restype = _i64
        fn.argtypes = [*[_ptr] * 6, *[_i64] * 4, *[_ptr] * 17, _i64]
    fn = lib.dyn_route
    fn.restype = _i64
    fn.argtypes = [
        _ptr,
        _ptr,
        _i64,
        _i64,
        _i64,
        _i64,
        ctypes.c_int32,
        ctypes.c_int32,
        _ptr,
        *[_ptr] * 10,
        _f32,
        *[_ptr] * 4,
    ]
    return lib


def _build() -> ctypes.CDLL:
    return build_library(_FLAGS)


def _load() -> ctypes.CDLL | None:
    global _lib, _reason, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("DYNSERVE_NATIVE_CPU", "1") == "0":
                _reason = "disabled by DYNSERVE_NATIVE_CPU=0"
            else:
                try:
                    _lib = _build()
                except Exception as e:  # no compiler, build error, unloadable library
                    _reason = str(e)
                    log.warning("native CPU kernels unavailable, using the torch references: %s", e)
            _tried = True
    return _lib


def available() -> bool:
    """True when the native kernels are built and loaded (builds them on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _reason


# dtypes the kernels take: float32 and bfloat16 (bfloat16 weights, activations and KV cache with
# float32 accumulation, rounded where torch's bfloat16 ops round)
DTYPES = (torch.float32, torch.bfloat16)


def _check_dtypes(**ts: torch.Tensor) -> torch.dtype:
    """The one dtype of the named CPU tensors; ValueError unless it is float32 or bfloat16 for all."""
    dtype = next(iter(ts.values())).dtype
    if dtype in DTYPES and _cpu_native_dtype(*ts.values()):  # the common case, without the messages
        return dtype
    for name, t in ts.items():
        if t.dtype not in DTYPES or t.device.type != "cpu":
            raise ValueError(f"{name} must be a float32 or bfloat16 CPU tensor, got {t.dtype} on {t.device}")
        if t.dtype != dtype:
            got = ", ".join(str(u.dtype) for u in ts.values())
            raise ValueError(f"{', '.join(ts)} must share one dtype, got {got}")
    return dtype


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_threads: int | None = None,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """One query per sequence: q [B, Hq, D] over kv_cache [2, N, bs, Hkv, D] -> [B, Hq, D] (CPU; float32,
    or bfloat16 for both, with float32 scores and softmax).

    block_tables [B, max_blocks] and seq_lens [B] (int64) as in AttentionMetadata; seq_lens[b] counts the
    new token, whose K/V must already be written. A sequence with length 0 gets zeros. `sinks` [Hq]
    (any float dtype, used in float32) and `window` (> 0: the last `window` positions only) as
    `attention_ref.paged_attention_ref`.
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_reason}")
    B, hq, d = q.shape
    two, _, bs, hkv, dk = kv_cache.shape
    if two != 2 or dk != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit kv_cache {tuple(kv_cache.shape)}")
    dtype = _check_dtypes(q=q, kv_cache=kv_cache)
    if block_tables.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} / seq_lens {tuple(seq_lens.shape)} for B={B}")
    if not kv_halves_dense(kv_cache):
        raise ValueError("kv_cache's K and V halves must each be contiguous")
    q = q.contiguous()
    bt = block_tables.to(torch.int64).contiguous()  # [B, max_blocks]
    sl = seq_lens.to(torch.int64).contiguous()  # [B]
    if not lib.dyn_in_range(sl.data_ptr(), B, -(2**63), bt.shape[1] * bs + 1):
        raise ValueError("a sequence is longer than its block table covers")
    out = torch.empty_like(q)  # [B, Hq, D]
    if B == 0:
        return out
    k_half, v_half = kv_cache[0], kv_cache[1]  # [N, bs, Hkv, D] each, contiguous
    if not lib.dyn_in_range(bt.data_ptr(), bt.numel(), 0, kv_cache.shape[1]):
        raise ValueError(f"block table entries must lie in [0, {kv_cache.shape[1]})")
    s32 = None
    if sinks is not None:
        if sinks.shape != (hq,):
            raise ValueError(f"sinks {tuple(sinks.shape)} must have one logit per query head ({hq})")
        s32 = sinks.to(device="cpu", dtype=torch.float32).contiguous()  # [Hq]
    fn = lib.dyn_paged_decode_f32 if dtype == torch.float32 else lib.dyn_paged_decode_bf16
    status = fn(
        q.data_ptr(), k_half.data_ptr(), v_half.data_ptr(), bt.data_ptr(), bt.shape[1], sl.data_ptr(),
        B, hq, hkv, d, bs, float(scale), None if s32 is None else s32.data_ptr(), max(int(window or 0), 0),
        out.data_ptr(), num_threads or torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("native decode attention could not allocate its scratch buffer")
    return out


def gemm_nt(
    x: torch.Tensor, w: torch.Tensor, num_threads: int | None = None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T (+ bias [N]) -> [M, N] (CPU; float32, or bfloat16 for both with float32
    accumulation and one rounding per output) with the small-M GEMM under `fused_moe`."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_reason}")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"expected x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    dtype = _check_dtypes(x=x, w=w)
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} does not fit w {tuple(w.shape)}")
    x, w = x.contiguous(), w.contiguous()
    (M, K), N = x.shape, w.shape[0]
    y = torch.empty(M, N, dtype=dtype)  # [M, N]
    threads = num_threads or torch.get_num_threads()
    if not (M and N):
        return y
    if dtype == torch.float32:
        lib.dyn_gemm_nt_f32(x.data_ptr(), K, w.data_ptr(), K, M, N, y.data_ptr(), N, threads)
        return y if bias is None else y.add_(bias)
    b32 = None if bias is None else bias.to(torch.float32).contiguous()  # [N], added before the rounding
    status = lib.dyn_gemm_nt_bf16(
        x.data_ptr(), K, w.data_ptr(), K, M, N, y.data_ptr(), N, None if b32 is None else b32.data_ptr(), threads
    )
    if status != 0:
        raise MemoryError("native GEMM could not allocate its scratch buffer")
    return y


# rows up to which the native GEMM beats MKL's on a weight that is not in cache (every weight, in
# a decode step of a model larger than the L3); larger batches are compute-bound, where MKL wins
NATIVE_LINEAR_MAX_ROWS = 96

# rows per expert up to which the native MoE beats MKL through the torch reference (decode batches);
# prefill-sized groups are compute-bound large GEMMs where MKL's packed kernels win
NATIVE_MOE_MAX_ROWS = 64

# bfloat16 has no such limit: without AVX512-BF16/AMX, torch's bfloat16 GEMM (oneDNN) is 3-7x slower
# than the native kernel at 96-512 rows on an AVX2 machine (README, "Kernels on the CPU"), so
# prefill runs the native kernels too


def _cpu_native_dtype(*ts: torch.Tensor) -> bool:
    """All CPU tensors of one dtype the kernels take (float32 or bfloat16)."""
    dtype = ts[0].dtype
    if dtype is not torch.float32 and dtype is not torch.bfloat16:
        return False
    for t in ts:
        if t.dtype is not dtype or not t.is_cpu:
            return False
    return True


def takes_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemm_nt` should run this linear: float32 on the CPU and a decode-sized batch, or
    bfloat16 on the CPU and any batch."""
    return (
        x.dim() == 2
        and 0 < x.shape[0]
        and _cpu_native_dtype(x, weight)
        and (x.shape[0] <= NATIVE_LINEAR_MAX_ROWS or x.dtype == torch.bfloat16)
        and weight.is_contiguous()
        and available()
    )


def takes_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor | None = None) -> bool:
    """Whether `fused_moe` should run this MoE layer: float32 or bfloat16 on the CPU, contiguous expert
    weights, and, in float32, no expert with more than NATIVE_MOE_MAX_ROWS rows (`counts` [E]: rows
    per expert; None when x has at most NATIVE_MOE_MAX_ROWS tokens, which bounds every expert's rows)."""
    return (
        w13.dim() == 3
        and w13.shape[0] > 0
        and _cpu_native_dtype(x, w13, w2)  # before counts.max(): no device sync for a CUDA tensor
        and (
            x.dtype == torch.bfloat16
            or (x.shape[0] <= NATIVE_MOE_MAX_ROWS if counts is None else int(counts.max()) <= NATIVE_MOE_MAX_ROWS)
        )
        and w13.is_contiguous()
        and w2.is_contiguous()
        and available()
    )


def takes_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionMetadata) -> bool:
    """Whether `paged_decode_attention` should run this attention: one query per sequence, float32 or
    bfloat16 on the CPU."""
    return batch.max_query_len == 1 and q.shape[0] == batch.num_seqs and _cpu_native_dtype(q, kv_cache) and available()


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    token_offsets: torch.Tensor,
    num_threads: int | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum over token t's pairs (e, w) of w * W2_e (silu(gate_e x_t) * up_e x_t): [T, H] in x.dtype.

    x [T, H], w13 [E, 2I, H], w2 [E, H, I] (CPU, all float32 or all bfloat16; bfloat16 rounds where
    `fused_moe_ref` does and accumulates in float32); pairs token-major: pair p is
    (token_ids[p], expert_ids[p], weights[p]) and token t owns pairs token_offsets[t]..[t+1]-1.
    Tokens with no pair get zeros. `counts` (`torch.bincount(expert_ids, minlength=E)`) is accepted
    for callers that pass it and not needed: the pairs are grouped by expert in C.
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_reason}")
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"expected x [T,H], w13 [E,2I,H], w2 [E,H,I]; got {x.shape}, {w13.shape}, {w2.shape}")
    T, H = x.shape
    E, two_i, h13 = w13.shape
    if h13 != H or two_i % 2 or w2.shape != (E, H, two_i // 2):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    dtype = _check_dtypes(x=x, w13=w13, w2=w2)
    if not (w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError("expert weights must be contiguous")
    P = int(expert_ids.numel())
    if token_ids.numel() != P or weights.numel() != P or token_offsets.shape != (T + 1,):
        raise ValueError(f"ragged assignment of {P} pairs does not fit {T} tokens")
    if P == 0:
        return torch.zeros(T, H, dtype=dtype)
    expert_ids = expert_ids.to(torch.int64).contiguous()  # [P]
    token_ids = token_ids.to(torch.int64).contiguous()  # [P]
    tok_off = token_offsets.to(torch.int64).contiguous()  # [T + 1]
    if not lib.dyn_in_range(expert_ids.data_ptr(), P, 0, E):
        raise ValueError(f"expert ids must lie in [0, {E})")
    if not lib.dyn_in_range(token_ids.data_ptr(), P, 0, T):
        raise ValueError(f"token ids must lie in [0, {T})")
    if not lib.dyn_offsets_ok(tok_off.data_ptr(), T, P):
        raise ValueError(f"token_offsets must rise from 0 to the number of pairs ({P})")
    x = x.contiguous()
    w32 = weights.to(torch.float32).contiguous()  # [P]
    idx = torch.empty(E + 1 + 2 * P, dtype=torch.int64)
    expert_off, order, sorted_tok = idx[: E + 1], idx[E + 1 : E + 1 + P], idx[E + 1 + P :]  # [E + 1], [P], [P]
    sorted_w = torch.empty(P, dtype=torch.float32)  # [P]
    lib.dyn_moe_group(
        expert_ids.data_ptr(), token_ids.data_ptr(), w32.data_ptr(), P, E, expert_off.data_ptr(), order.data_ptr(),
        sorted_tok.data_ptr(), sorted_w.data_ptr(),
    )  # fmt: skip
    y_pairs = torch.empty(P, H, dtype=torch.float32)  # [P, H] weighted outputs, token-major
    out = torch.empty(T, H, dtype=dtype)  # [T, H]
    fn = lib.dyn_moe_f32 if dtype == torch.float32 else lib.dyn_moe_bf16
    status = fn(
        x.data_ptr(), T, H, w13.data_ptr(), w2.data_ptr(), E, two_i // 2, sorted_tok.data_ptr(),
        sorted_w.data_ptr(), order.data_ptr(), expert_off.data_ptr(), tok_off.data_ptr(), y_pairs.data_ptr(),
        out.data_ptr(), num_threads or torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("native MoE could not allocate its scratch buffer")
    return out


def takes_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `rms_norm` should run this norm: float32 or bfloat16 CPU tensors of one dtype,
    contiguous, weight [H] over x's last dim."""
    dtype = x.dtype
    return (
        (dtype is torch.float32 or dtype is torch.bfloat16)
        and weight.dtype is dtype
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dim() >= 1
        and weight.dim() == 1
        and weight.shape[0] == x.shape[-1]
        and x.is_contiguous()
        and weight.is_contiguous()
        and available()
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, checked: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`norm_ref.rms_norm_ref` natively: x [..., H], weight [H] -> (out [..., H], None); with
    `residual` (x's shape) the norm is of h = x + residual and h comes back too: (out, h).
    float32 or bfloat16 (rounded where the reference rounds); `takes_rms_norm` must hold (`checked`:
    the caller has just checked it, as the dispatcher does)."""
    lib = _lib if _tried else _load()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_reason}")
    if not (checked or takes_rms_norm(x, weight)):
        raise ValueError(
            f"rms_norm takes contiguous float32/bfloat16 CPU x [..., H] and weight [H] of one dtype, "
            f"got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}"
        )
    H = x.shape[-1]
    T = x.numel() // H if H else 0
    out = torch.empty_like(x)  # [..., H]
    h = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype is not x.dtype or not residual.is_contiguous():
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not fit x {tuple(x.shape)}")
        h = torch.empty_like(x)  # [..., H]
    if T:
        fn = lib.dyn_rmsnorm_f32 if x.dtype is torch.float32 else lib.dyn_rmsnorm_bf16
        fn(
            x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
            None if h is None else h.data_ptr(), T, H, float(eps),
        )  # fmt: skip
    return out, h


def _rows_of_heads(x: torch.Tensor) -> bool:
    """x [T, H, D] with each token's H * D elements contiguous (any stride between tokens)."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


def takes_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `rope` should rotate x: float32 or bfloat16 CPU x [T, H, D] with contiguous heads, and
    contiguous cos/sin [T, R] of x's dtype, R even and <= D."""
    return (
        _rows_of_heads(x)
        and cos.dim() == 2
        and cos.shape == sin.shape
        and cos.shape[0] == x.shape[0]
        and cos.shape[1] % 2 == 0
        and cos.shape[1] <= x.shape[2]
        and cos.is_contiguous()
        and sin.is_contiguous()
        and _cpu_native_dtype(x, cos, sin)
        and available()
    )


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, checked: bool = False) -> torch.Tensor:
    """`rope_ref.apply_rope_ref` natively: x [T, H, D] (token rows may be strided, e.g. a view of a
    merged qkv projection) and cos/sin [T, R] -> a new contiguous [T, H, D]; `takes_rope` must hold
    (`checked`: the caller has just checked it)."""
    lib = _lib if _tried else _load()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_reason}")
    if not (checked or takes_rope(x, cos, sin)):
        raise ValueError(f"rope takes x [T, H, D] and cos/sin [T, R]; got {tuple(x.shape)}, {tuple(cos.shape)}")
    T, H, D = x.shape
    out = torch.empty(T, H, D, dtype=x.dtype)  # [T, H, D]
    if out.numel():
        fn = lib.dyn_rope_f32 if x.dtype is torch.float32 else lib.dyn_rope_bf16
        fn(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), T, H, D, cos.shape[1])
    return out


def takes_write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """Whether `write_kv` should write these rows: key/value [T, Hkv, D] with contiguous heads, a
    kv_cache [2, N, bs, Hkv, D] with dense halves (`kv_halves_dense`) of their dtype (float32 or
    bfloat16), int64 CPU slots [T]."""
    return (
        _rows_of_heads(key)
        and _rows_of_heads(value)
        and key.shape == value.shape
        and kv_cache.dim() == 5
        and key.shape[1:] == kv_cache.shape[3:]
        and slot_mapping.dtype is torch.int64
        and slot_mapping.device.type == "cpu"
        and slot_mapping.shape == (key.shape[0],)
        and slot_mapping.is_contiguous()
        and kv_halves_dense(kv_cache)
        and _cpu_native_dtype(key, value, kv_cache)
        and available()
    )


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, checked: bool = False
) -> None:
    """`attention_ref.write_kv_ref` natively: key/value [T, Hkv, D] into kv_cache [2, N, bs, Hkv, D] at
    slots slot_mapping [T] (slots < 0 skipped); `takes_write_kv` must hold (`checked`: the caller has
    just checked it). ValueError (and nothing written) when a slot lies past the cache."""
    lib = _lib if _tried else _load()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_reason}")
    if not (checked or takes_write_kv(key, value, kv_cache, slot_mapping)):
        raise ValueError(f"write_kv takes key/value [T, Hkv, D] of the cache's layout; got {tuple(key.shape)}")
    T, hkv, d = key.shape
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    status = lib.dyn_write_kv(
        key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0), kv_cache[0].data_ptr(),
        kv_cache[1].data_ptr(), slot_mapping.data_ptr(), T, hkv * d, num_slots, key.element_size(),
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"slots must lie below the cache's {num_slots} slots")


# ------------------------------------------------------------------------------- attention block


def takes_attention_block(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    w_o: torch.Tensor,
    norm_weights: tuple[torch.Tensor, torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    batch: AttentionMetadata,
) -> bool:
    """Whether `attention_block` should run this decode attention block: one query per sequence,
    contiguous float32 or bfloat16 CPU tensors of one dtype, a cache with dense K/V halves, and in
    float32 no more rows than the native GEMM takes (`NATIVE_LINEAR_MAX_ROWS`, so the result equals
    the layer-by-layer path's)."""
    T = x.shape[0] if x.dim() == 2 else -1
    memo = batch.kernel_memo
    step_ok = memo.get("attention_block_step")  # the step's layout: the same in every layer
    if step_ok is None:
        step_ok = memo["attention_block_step"] = batch.max_query_len == 1 and available()
    return (
        step_ok
        and T > 0
        and T == batch.num_seqs
        and slot_mapping.dtype is torch.int64
        and slot_mapping.is_cpu
        and cos.is_contiguous()
        and sin.is_contiguous()
        and (T <= NATIVE_LINEAR_MAX_ROWS or x.dtype is torch.bfloat16)
        and _cpu_native_dtype(x, w_qkv, w_o, norm_weights[0], norm_weights[1], cos, sin, kv_cache)
        and x.is_contiguous()
        and w_qkv.is_contiguous()
        and w_o.is_contiguous()
        and kv_cache.dim() == 5
        and kv_halves_dense(kv_cache)
    )


def attention_block(
    x: torch.Tensor,
    in_norm: tuple[torch.Tensor, float],
    w_qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    batch: AttentionMetadata,
    scale: float,
    w_o: torch.Tensor,
    post_norm: tuple[torch.Tensor, float],
    num_heads: int,
    num_threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's attention block in one native call (`attention_ref.attention_block_ref`):
    x [T, H] (the residual stream, one token per sequence) -> (y, h), h = x + o_proj(attn(rope(
    qkv_proj(rmsnorm(x))))) and y = rmsnorm(h), both [T, H]; the new K/V rows are written to
    kv_cache [2, N, bs, Hkv, D] at slot_mapping [T]. `in_norm`/`post_norm`: (weight [H], eps);
    w_qkv [(Hq + 2 Hkv) D, H] (q rows, then k, then v), w_o [H, Hq D], cos/sin [T, R]. Bit-identical
    to the layer-by-layer native kernels; `takes_attention_block` must hold."""
    lib = _lib if _tried else _load()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_reason}")
    T, H = x.shape
    _, num_blocks, bs, hkv, d = kv_cache.shape
    hq = num_heads
    R = cos.shape[1]
    if (
        hq % hkv
        or w_qkv.shape != ((hq + 2 * hkv) * d, H)
        or w_o.shape != (H, hq * d)
        or cos.shape != (T, R)
        or sin.shape != (T, R)
        or R % 2
        or R > d
        or in_norm[0].shape != (H,)
        or post_norm[0].shape != (H,)
    ):
        raise ValueError(
            f"attention block shapes do not fit: x {tuple(x.shape)}, w_qkv {tuple(w_qkv.shape)}, w_o "
            f"{tuple(w_o.shape)}, cos {tuple(cos.shape)}, kv_cache {tuple(kv_cache.shape)}, {hq} query heads"
        )
    slots = slot_mapping.contiguous()  # [T]
    if slots.shape != (T,):
        raise ValueError(f"slot_mapping {tuple(slots.shape)} does not fit {T} sequences")
    key = ("attention_block", T, num_blocks, bs)  # converted and checked once per step, not per layer
    tables = batch.kernel_memo.get(key)
    if tables is None:
        bt = batch.block_tables.to(torch.int64).contiguous()  # [T, max_blocks]
        sl = batch.seq_lens.to(torch.int64).contiguous()  # [T]
        if bt.shape[0] != T or sl.shape != (T,):
            raise ValueError(f"block_tables / seq_lens do not fit {T} sequences")
        if not lib.dyn_in_range(sl.data_ptr(), T, -(2**63), bt.shape[1] * bs + 1):
            raise ValueError("a sequence is longer than its block table covers")
        if not lib.dyn_in_range(bt.data_ptr(), bt.numel(), 0, num_blocks):
            raise ValueError(f"block table entries must lie in [0, {num_blocks})")
        tables = batch.kernel_memo[key] = (bt, sl)
    bt, sl = tables
    y = torch.empty_like(x)  # [T, H]
    h = torch.empty_like(x)  # [T, H]
    fn = lib.dyn_attn_block_f32 if x.dtype is torch.float32 else lib.dyn_attn_block_bf16
    status = fn(
        x.data_ptr(), in_norm[0].data_ptr(), w_qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), w_o.data_ptr(), post_norm[0].data_ptr(), y.data_ptr(),
        h.data_ptr(), T, H, hq, hkv, d, R, float(in_norm[1]), float(post_norm[1]), slots.data_ptr(),
        num_blocks * bs, bt.data_ptr(), bt.shape[1], sl.data_ptr(), bs, float(scale),
        num_threads or torch.get_num_threads(),
    )  # fmt: skip
    if status == -1:
        raise ValueError(f"slots must lie below the cache's {num_blocks * bs} slots")
    if status != 0:
        raise MemoryError("native attention block could not allocate its scratch buffer")
    return y, h


# ------------------------------------------------------------------------------------------- routing
MAX_ROUTE_EXPERTS = 4096


@dataclass(frozen=True)
class RouteTable:
    """Per-config parameters of `route_select`, one entry per config (build once, reuse: `route_table`).

    policy: 0 top_k, 1 top_p, 2 threshold, 3 relative, 4 entropy; k, p, threshold, lo, hi, renorm as
    resolved for one MoE layer; entropy thresholds / k values per config, concatenated."""

    policy: torch.Tensor  # [C] int32
    k: torch.Tensor  # [C] int64
    p: torch.Tensor  # [C] float32
    threshold: torch.Tensor  # [C] float32
    lo: torch.Tensor  # [C] int64
    hi: torch.Tensor  # [C] int64
    renorm: torch.Tensor  # [C] int32
    ent_off: torch.Tensor  # [C+1] int64: config c's thresholds are ent_thr[ent_off[c]:ent_off[c+1]]
    ent_thr: torch.Tensor  # [sum n_c] float32
    ent_k: torch.Tensor  # [sum (n_c + 1)] int64: config c's k values start at ent_off[c] + c


def route_table(rows: tuple[tuple, ...]) -> RouteTable:
    """rows: per config (policy, k, p, threshold, lo, hi, renorm, entropy_thresholds, entropy_k)."""
    off = [0]
    thr: list[float] = []
    ks: list[int] = []
    for r in rows:
        thr += list(r[7])
        ks += list(r[8])
        off.append(len(thr))
    col = list(zip(*rows, strict=True)) if rows else [()] * 9
    return RouteTable(
        torch.tensor(col[0], dtype=torch.int32), torch.tensor(col[1], dtype=torch.int64),
        torch.tensor(col[2], dtype=torch.float32), torch.tensor(col[3], dtype=torch.float32),
        torch.tensor(col[4], dtype=torch.int64), torch.tensor(col[5], dtype=torch.int64),
        torch.tensor(col[6], dtype=torch.int32), torch.tensor(off, dtype=torch.int64),
        torch.tensor(thr, dtype=torch.float32), torch.tensor(ks or [0], dtype=torch.int64),
    )  # fmt: skip


def takes_route(scores: torch.Tensor) -> bool:
    """Whether `route_select` should route these scores: a float32 [T, E] CPU tensor, E <= 4096."""
    return (
        scores.dtype is torch.float32
        and scores.device.type == "cpu"
        and scores.dim() == 2
        and scores.shape[1] <= MAX_ROUTE_EXPERTS
        and available()
    )


def route_select(
    scores: torch.Tensor,
    choice: torch.Tensor | None,
    table: RouteTable,
    config_index: torch.Tensor | None,
    *,
    n_group: int = 1,
    topk_group: int = 1,
    group_sigmoid: bool = False,
    grouped: bool = False,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The general routing pass natively (`dyn_route` in csrc/cpu_kernels.c documents the rule): scores
    [T, E] (and the ranking `choice` [T, E]) -> (token_offsets [T+1], token_ids [P], expert_ids [P],
    weights [P] float32), token-major, each token's experts in rank order."""
    lib = _lib if _tried else _load()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_reason}")
    if not takes_route(scores):
        raise ValueError(f"route_select takes float32 [T, E<={MAX_ROUTE_EXPERTS}] CPU scores, got {scores.dtype}")
    T, E = scores.shape
    scores = scores.contiguous()
    if choice is not None:
        choice = choice.contiguous().float()
        if choice.shape != scores.shape:
            raise ValueError(f"choice {tuple(choice.shape)} must match scores {tuple(scores.shape)}")
    C = table.policy.numel()
    if config_index is not None:
        config_index = config_index.to(torch.int64).contiguous()
        if config_index.shape != (T,) or not lib.dyn_in_range(config_index.data_ptr(), T, 0, C):
            raise ValueError(f"config_index must be [T] ids in [0, {C})")
    elif C < 1:
        raise ValueError("route_select needs at least one config")
    if n_group < 1 or E % n_group or not 1 <= topk_group <= n_group or n_group > 256:
        raise ValueError(f"bad group limit: n_group {n_group}, topk_group {topk_group}, E {E}")
    offsets = torch.zeros(T + 1, dtype=torch.int64)
    tok = torch.empty(T * E, dtype=torch.int64)
    ids = torch.empty(T * E, dtype=torch.int64)
    w = torch.empty(T * E, dtype=torch.float32)
    t = table
    P = lib.dyn_route(
        scores.data_ptr(), choice.data_ptr() if choice is not None else None, T, E, n_group, topk_group,
        int(group_sigmoid), int(grouped), config_index.data_ptr() if config_index is not None else None,
        t.policy.data_ptr(), t.k.data_ptr(), t.p.data_ptr(), t.threshold.data_ptr(), t.lo.data_ptr(),
        t.hi.data_ptr(), t.renorm.data_ptr(), t.ent_off.data_ptr(), t.ent_thr.data_ptr(), t.ent_k.data_ptr(),
        float(scale), offsets.data_ptr(), tok.data_ptr(), ids.data_ptr(), w.data_ptr(),
    )  # fmt: skip
    if P < 0:
        raise ValueError("route_select: too many experts or groups")
    return offsets, tok[:P], ids[:P], w[:P]


class _CpuRouteSelector:
    """`route_select` as a `dynserve.routing.base.RouteSelector`: parameter tables cached per set of
    resolved configs (they repeat across layers and steps)."""

    def takes(self, scores: torch.Tensor) -> bool:
        return takes_route(scores)

    @staticmethod
    @functools.lru_cache(maxsize=512)
    def _table(rows: tuple[tuple, ...]) -> RouteTable:
        return route_table(rows)

    def __call__(
        self, scores: torch.Tensor, choice: torch.Tensor | None, rows: tuple[tuple, ...],
        config_index: torch.Tensor | None, **group: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        return route_select(scores, choice, self._table(rows), config_index, **group)


ROUTE_SELECTOR = _CpuRouteSelector()


# ----------------------------------------------------------------------------------------- MoE block


def takes_moe_block(
    y: torch.Tensor, h: torch.Tensor, w_router: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> bool:
    """Whether `moe_block` should run this decode MoE block: contiguous float32 or bfloat16 CPU tensors
    of one dtype, y/h [T, H], w_router [E, H] with E <= 4096, w13 [E, 2I, H] and w2 [E, H, I], and in
    float32 at most NATIVE_MOE_MAX_ROWS tokens (so no expert can have more rows than `fused_moe` takes
    natively, and the router GEMM is the native one `linear` would run)."""
    if y.dim() != 2 or w_router.dim() != 2 or w13.dim() != 3:
        return False
    T, H = y.shape
    E = w_router.shape[0]
    return (
        0 < T
        and (T <= NATIVE_MOE_MAX_ROWS or y.dtype is torch.bfloat16)
        and 0 < E <= MAX_ROUTE_EXPERTS
        and h.shape == y.shape
        and w_router.shape[1] == H
        and w13.shape[0] == E
        and w13.shape[2] == H
        and w2.shape == (E, H, w13.shape[1] // 2)
        and _cpu_native_dtype(y, h, w_router, w13, w2)
        and y.is_contiguous()
        and h.is_contiguous()
        and w_router.is_contiguous()
        and w13.is_contiguous()
        and w2.is_contiguous()
        and available()
    )


@dataclass(frozen=True)
class MoEBlockResult:
    """What `moe_block` returns: out [T, H] = h + the routed experts' weighted sum; the layer's pairs
    (token-major: token t owns pairs offsets[t]..[t+1]-1, each with token_ids / expert_ids / weights);
    token_counts [T] (experts per token) and expert_counts [E] (tokens per expert), int64."""

    out: torch.Tensor
    offsets: torch.Tensor
    token_ids: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor
    token_counts: torch.Tensor
    expert_counts: torch.Tensor


def moe_block(
    y: torch.Tensor,
    h: torch.Tensor,
    w_router: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    rows: tuple[tuple, ...],
    config_index: torch.Tensor | None,
    num_threads: int | None = None,
) -> MoEBlockResult | None:
    """A decode step's MoE block in one native call (`moe_ref.moe_block_ref`): router logits y [T, H] @
    w_router [E, H]^T, softmax in float32, each token's routing config (`rows` as `route_select`'s
    tables, `config_index` [T] or None for config 0), the fused experts on the pairs, and the residual
    add h [T, H] + experts. Probabilities agree with torch's softmax to float32 rounding; a token of
    the checkpoint's top_k (policy 0) whose last kept and best dropped expert are within that rounding
    of each other makes the call return None before any expert runs (torch.topk's rounding and tie
    order decide such a pick: the caller routes the layer op by op). `takes_moe_block` must hold."""
    lib = _lib if _tried else _load()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_reason}")
    T, H = y.shape
    E, two_i = w13.shape[0], w13.shape[1]
    t = _CpuRouteSelector._table(rows)
    C = t.policy.numel()
    if config_index is not None:
        config_index = config_index.to(torch.int64).contiguous()
        if config_index.shape != (T,) or not lib.dyn_in_range(config_index.data_ptr(), T, 0, C):
            raise ValueError(f"config_index must be [T] ids in [0, {C})")
    elif C < 1:
        raise ValueError("moe_block needs at least one config")
    idx = torch.empty(T + 1 + 3 * T * E + T + E, dtype=torch.int64)
    offsets, tok, ids = idx[: T + 1], idx[T + 1 : T + 1 + T * E], idx[T + 1 + T * E : T + 1 + 2 * T * E]
    token_counts, expert_counts = idx[T + 1 + 3 * T * E : 2 * T + 1 + 3 * T * E], idx[2 * T + 1 + 3 * T * E :]
    w = torch.empty(T * E, dtype=torch.float32)
    out = torch.empty_like(y)  # [T, H]
    fn = lib.dyn_moe_block_f32 if y.dtype is torch.float32 else lib.dyn_moe_block_bf16
    P = fn(
        y.data_ptr(), h.data_ptr(), w_router.data_ptr(), w13.data_ptr(), w2.data_ptr(), out.data_ptr(), T, H, E,
        two_i // 2, config_index.data_ptr() if config_index is not None else None, t.policy.data_ptr(),
        t.k.data_ptr(), t.p.data_ptr(), t.threshold.data_ptr(), t.lo.data_ptr(), t.hi.data_ptr(),
        t.renorm.data_ptr(), t.ent_off.data_ptr(), t.ent_thr.data_ptr(), t.ent_k.data_ptr(), offsets.data_ptr(),
        tok.data_ptr(), ids.data_ptr(), w.data_ptr(), token_counts.data_ptr(), expert_counts.data_ptr(),
        num_threads or torch.get_num_threads(),
    )  # fmt: skip
    if P == -1:
        return None
    if P < 0:
        raise MemoryError("native MoE block could not allocate its scratch buffer")
    return MoEBlockResult(out, offsets, tok[:P], ids[:P], w[:P], token_counts, expert_counts)


# ---------------------------------------------------------------------------------- decode layers


@dataclass(frozen=True)
class DecodeLayerWeights:
    """One decoder layer's tensors as `decode_layers` reads them: the attention block's (input norm
    weight [H], w_qkv [(Hq + 2 Hkv) D, H], w_o [H, Hq D], post-attention norm weight [H]), its paged
    cache [2, N, bs, Hkv, D] and the MoE block's (router [E, H], w13 [E, 2I, H], w2 [E, H, I])."""

    in_norm: torch.Tensor
    w_qkv: torch.Tensor
    w_o: torch.Tensor
    post_norm: torch.Tensor
    kv_cache: torch.Tensor
    w_router: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor


class DecodeLayers:
    """A model's stack of [attention block, MoE block] decode layers for `run`: every layer's tensor
    addresses gathered once (weights and caches never move while a model serves), checked to be what
    the fused kernels take (one dtype, contiguous, dense cache halves, one shape for every layer)."""

    def __init__(
        self, layers: list[DecodeLayerWeights], num_heads: int, in_eps: float, post_eps: float, scale: float
    ) -> None:
        if not layers:
            raise ValueError("no layers")
        first = layers[0]
        self.dtype = first.w_qkv.dtype
        self.H = first.w_qkv.shape[1]
        _, self.num_blocks, self.bs, self.hkv, self.d = first.kv_cache.shape
        self.hq = num_heads
        self.E, self.I = first.w13.shape[0], first.w13.shape[1] // 2
        self.in_eps, self.post_eps, self.scale = float(in_eps), float(post_eps), float(scale)
        H, hq, hkv, d, E, I = self.H, self.hq, self.hkv, self.d, self.E, self.I  # noqa: E741
        shapes = [(H,), ((hq + 2 * hkv) * d, H), (H, hq * d), (H,), tuple(first.kv_cache.shape), (E, H),
                  (E, 2 * I, H), (E, H, I)]  # fmt: skip
        rows = []
        for lw in layers:
            ts = (lw.in_norm, lw.w_qkv, lw.w_o, lw.post_norm, lw.kv_cache, lw.w_router, lw.w13, lw.w2)
            if any(tuple(t.shape) != sh for t, sh in zip(ts, shapes, strict=True)) or hq % hkv:
                raise ValueError("decode layers must share one shape")
            if not (_cpu_native_dtype(*ts) and kv_halves_dense(lw.kv_cache)):
                raise ValueError("decode layers take contiguous float32 or bfloat16 CPU tensors of one dtype")
            if not all(t.is_contiguous() for t in ts if t is not lw.kv_cache):
                raise ValueError("decode layer weights must be contiguous")
            kv = lw.kv_cache
            rows.append([lw.in_norm.data_ptr(), lw.w_qkv.data_ptr(), kv[0].data_ptr(), kv[1].data_ptr(),
                         lw.w_o.data_ptr(), lw.post_norm.data_ptr(), lw.w_router.data_ptr(), lw.w13.data_ptr(),
                         lw.w2.data_ptr()])  # fmt: skip
        self._keep = layers  # the addresses below stay valid while these tensors live
        self.addresses = torch.tensor(rows, dtype=torch.int64)  # [L, 9]
        self.num_layers = len(layers)
        self._tables: dict[tuple, tuple[torch.Tensor, list[RouteTable]]] = {}

    def takes(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionMetadata) -> bool:
        """Whether `run` takes this step: one token per sequence, x [T, H] of the layers' dtype (float32:
        at most NATIVE_MOE_MAX_ROWS tokens), contiguous cos/sin [T, R]."""
        T = x.shape[0] if x.dim() == 2 else -1
        return (
            0 < T
            and batch.max_query_len == 1
            and T == batch.num_seqs
            and (T <= NATIVE_MOE_MAX_ROWS or x.dtype is torch.bfloat16)
            and x.dtype is self.dtype
            and x.is_cpu
            and x.shape[1] == self.H
            and cos.dtype is self.dtype
            and cos.is_contiguous()
            and sin.is_contiguous()
            and available()
        )

    def _route_tables(self, rows_per_layer: tuple[tuple[tuple, ...], ...]) -> torch.Tensor:
        """[L, 10] addresses of each layer's routing table (cached per set of rows)."""
        hit = self._tables.get(rows_per_layer)
        if hit is None:
            if len(self._tables) > 256:
                self._tables.clear()
            tables = [_CpuRouteSelector._table(r) for r in rows_per_layer]
            addr = torch.tensor(
                [[t.policy.data_ptr(), t.k.data_ptr(), t.p.data_ptr(), t.threshold.data_ptr(), t.lo.data_ptr(),
                  t.hi.data_ptr(), t.renorm.data_ptr(), t.ent_off.data_ptr(), t.ent_thr.data_ptr(),
                  t.ent_k.data_ptr()] for t in tables],
                dtype=torch.int64,
            )  # fmt: skip
            hit = self._tables[rows_per_layer] = (addr, tables)  # the tables stay alive with their addresses
        return hit[0]

    def run(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slot_mapping: torch.Tensor,
        batch: AttentionMetadata,
        rows_per_layer: tuple[tuple[tuple, ...], ...],
        config_index: torch.Tensor | None,
        start: int = 0,
        num_threads: int | None = None,
    ) -> DecodeLayersResult:
        """Layers start.. of a decode step (`takes` must hold): x [T, H] (the residual stream; updated in
        place) through each layer's attention block and MoE block (`attention_block`, `moe_block`: the
        same kernels). `rows_per_layer`: each layer's routing config rows (`route_select`'s), with
        `config_index` [T] or None. Stops early at a layer whose routing `moe_block` would refuse (a
        checkpoint top_k near-tie): its attention has run; `y`/`h` of the result are its MoE inputs."""
        lib = _lib if _tried else _load()
        if lib is None:
            raise RuntimeError(f"native CPU kernels unavailable: {_reason}")
        T, H = x.shape
        L, E, R = self.num_layers, self.E, cos.shape[1]
        if len(rows_per_layer) != L or not 0 <= start < L:
            raise ValueError(f"{len(rows_per_layer)} routing rows / start {start} for {L} layers")
        if cos.shape != (T, R) or sin.shape != (T, R) or R % 2 or R > self.d or not x.is_contiguous():
            raise ValueError(f"x {tuple(x.shape)} / cos {tuple(cos.shape)} do not fit the decode layers")
        slots = slot_mapping.contiguous()  # [T]
        if slots.shape != (T,) or slots.dtype is not torch.int64:
            raise ValueError(f"slot_mapping {tuple(slots.shape)} does not fit {T} sequences")
        bs, num_blocks = self.bs, self.num_blocks
        key = ("attention_block", T, num_blocks, bs)  # shared with attention_block: once per step
        tables = batch.kernel_memo.get(key)
        if tables is None:
            bt = batch.block_tables.to(torch.int64).contiguous()  # [T, max_blocks]
            sl = batch.seq_lens.to(torch.int64).contiguous()  # [T]
            if bt.shape[0] != T or sl.shape != (T,):
                raise ValueError(f"block_tables / seq_lens do not fit {T} sequences")
            if not lib.dyn_in_range(sl.data_ptr(), T, -(2**63), bt.shape[1] * bs + 1):
                raise ValueError("a sequence is longer than its block table covers")
            if not lib.dyn_in_range(bt.data_ptr(), bt.numel(), 0, num_blocks):
                raise ValueError(f"block table entries must lie in [0, {num_blocks})")
            tables = batch.kernel_memo[key] = (bt, sl)
        bt, sl = tables
        if config_index is not None:
            C = max(len(r) for r in rows_per_layer)
            config_index = config_index.to(torch.int64).contiguous()
            if config_index.shape != (T,) or not lib.dyn_in_range(config_index.data_ptr(), T, 0, C):
                raise ValueError(f"config_index must be [T] ids in [0, {C})")
        tp = self._route_tables(rows_per_layer)  # [L, 10]
        idx = torch.empty(L * (T + 1) + 3 * L * T * E + L * T + L * E + L, dtype=torch.int64)
        a = L * (T + 1)
        offsets = idx[:a].view(L, T + 1)
        tok, ids = idx[a : a + L * T * E].view(L, T * E), idx[a + L * T * E : a + 2 * L * T * E].view(L, T * E)
        a += 3 * L * T * E
        token_counts, expert_counts = idx[a : a + L * T].view(L, T), idx[a + L * T : a + L * T + L * E].view(L, E)
        pairs = idx[a + L * T + L * E :]  # [L]
        w = torch.empty(L, T * E, dtype=torch.float32)
        y = torch.empty_like(x)  # [T, H]
        h = torch.empty_like(x)  # [T, H]
        fn = lib.dyn_decode_layers_f32 if x.dtype is torch.float32 else lib.dyn_decode_layers_bf16
        stop = fn(
            x.data_ptr(), y.data_ptr(), h.data_ptr(), cos.data_ptr(), sin.data_ptr(), self.addresses.data_ptr(),
            tp.data_ptr(), start, L, T, H, self.hq, self.hkv, self.d, R, self.in_eps, self.post_eps, slots.data_ptr(),
            num_blocks * bs, bt.data_ptr(), bt.shape[1], sl.data_ptr(), bs, self.scale, E, self.I,
            config_index.data_ptr() if config_index is not None else None, offsets.data_ptr(), tok.data_ptr(),
            ids.data_ptr(), w.data_ptr(), token_counts.data_ptr(), expert_counts.data_ptr(), pairs.data_ptr(),
            num_threads or torch.get_num_threads(),
        )  # fmt: skip
        if stop == -1:
            raise ValueError(f"slots must lie below the cache's {num_blocks * bs} slots")
        if stop < 0:
            raise MemoryError("native decode layers could not allocate their scratch buffers")
        return DecodeLayersResult(int(stop), y, h, offsets, tok, ids, w, token_counts, expert_counts, pairs)


@dataclass(frozen=True)
class DecodeLayersResult:
    """What `DecodeLayers.run` returns: layers start..stop-1 ran (stop == L: all); per layer l, its
    pairs (pairs[l] of them, token-major) in offsets[l] [T+1] / token_ids[l] / expert_ids[l] /
    weights[l] [T*E] (first pairs[l] used), token_counts[l] [T] and expert_counts[l] [E]. When stop <
    L, y and h [T, H] are layer stop's MoE inputs (normed input and residual)."""

    stop: int
    y: torch.Tensor
    h: torch.Tensor
    offsets: torch.Tensor
    token_ids: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor
    token_counts: torch.Tensor
    expert_counts: torch.Tensor
    pairs: torch.Tensor
