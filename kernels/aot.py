"""Ahead-of-time compile of every Triton kernel for named GPU targets: no GPU needed.

`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))`
runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas) on the CPU; the wheel bundles
ptxas and cuobjdump. Each case is one kernel at one `_CONFIG_TABLE` row (or attention shape) and
one dtype, with the argument specialization a launch would see:

- "aligned": pointers, model dims and strides divisible by 16 (every real model shape);
- "unaligned": only the pointers (odd test shapes; the K loop cannot prove 16-byte loads).

Per-step ints (`num_pairs`, `num_blocks`, `stride_bt`) are `do_not_specialize` in the kernels, so
they carry no divisibility in either spec. Resources are read from the cubin
(`cuobjdump --dump-resource-usage`: registers, stack frame = spills) and the compile metadata
(dynamic shared memory); tensor-core use from the PTX (wgmma / mma.sync).

Run `python -m dynserve_kernels.aot [--json PATH]` (TRITON_INTERPRET must not be 1: the kernels have
to be real JITFunctions). tests/test_kernels_compile.py runs it in a subprocess and checks limits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

# target name -> (compute capability, shared memory per block opt-in limit in bytes)
TARGETS: dict[str, tuple[int, int]] = {"sm_90": (90, 227 * 1024), "sm_80": (80, 163 * 1024)}
DTYPES = ("bf16", "fp16", "fp32")
SPECS = ("aligned", "unaligned")

# kernel arguments whose values change every step: no specialization (see the kernels' decorators)
_PER_STEP = {"num_pairs", "num_blocks", "stride_bt", "tiles_per_split", "S", "P", "NB"}
# non-pointer arguments that are divisible by 16 for real model shapes
_MODEL_DIMS = {"H", "N_INTER", "half_stride", "stride_blk", "stride_pos", "block_size", "D", "ROW"}


@dataclass(frozen=True)
class Case:
    """One compile: `module.kernel` with `constexprs`, launch options and an argument spec."""

    module: str  # "moe_triton" | "attention_triton"
    kernel: str  # "_gate_up_kernel"
    row: str  # "16bit[2] BM64 BN128 BK64 w4 s3" or "D128 G4/8"
    dtype: str  # "bf16" | "fp16" | "fp32"
    spec: str  # "aligned" | "unaligned"
    pointers: tuple[tuple[str, str], ...]  # (argument, triton pointer type) for every pointer argument
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"{self.kernel.strip('_').removesuffix('_kernel')} {self.row} {self.dtype} {self.spec}"


@dataclass
class Result:
    case: Case
    target: str
    regs: int = 0
    stack: int = 0  # bytes per thread of local memory (stack frame): spills
    shared: int = 0  # bytes of shared memory per block
    mma: str = "-"  # "wgmma" | "mma" | "-" (FMA)
    seconds: float = 0.0
    error: str | None = field(default=None)

    @property
    def shared_limit(self) -> int:
        return TARGETS[self.target][1]


def _cfg_row(cfg: dict[str, int]) -> str:
    return f"BM{cfg['BLOCK_M']} BN{cfg['BLOCK_N']} BK{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"


def cases(specs: tuple[str, ...] = ("aligned",)) -> list[Case]:
    """Every kernel x config row (or attention shape) x dtype that serving can launch, per spec in `specs`.

    The "unaligned" spec (odd model dims) applies to the MoE GEMMs only: every other kernel's
    arguments are fixed by the model shape, for which only "aligned" is realistic."""
    import torch
    from dynserve_kernels.attention_triton import decode_config, prefill_config
    from dynserve_kernels.moe_triton import _CONFIG_TABLE

    out: list[Case] = []
    for dt in DTYPES:
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
        precision = "ieee" if dt == "fp32" else "tf32"
        rows = _CONFIG_TABLE["32bit" if dt == "fp32" else "16bit"]
        table = "32bit" if dt == "fp32" else "16bit"
        for spec in specs:
            for i, (_, cfg) in enumerate(rows):
                tiles = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
                consts = tuple({**tiles, "PRECISION": precision, "UPCAST": False}.items())
                launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
                row = f"{table}[{i}] {_cfg_row(cfg)}"
                ptrs_gu = (("x_ptr", dt), ("w13_ptr", dt), ("inter_ptr", dt), ("sorted_ids_ptr", "i32"))
                ptrs_gu += (("block_expert_ptr", "i32"), ("num_used_ptr", "i32"), ("token_ids_ptr", "i64"))
                out.append(Case("moe_triton", "_gate_up_kernel", row, dt, spec, ptrs_gu, consts, **launch))
                ptrs_dn = (("inter_ptr", dt), ("w2_ptr", dt), ("pair_out_ptr", "fp32"), ("sorted_ids_ptr", "i32"))
                ptrs_dn += (("block_expert_ptr", "i32"), ("num_used_ptr", "i32"), ("weights_ptr", "fp32"))
                out.append(Case("moe_triton", "_down_kernel", row, dt, spec, ptrs_dn, consts, **launch))
        # the remaining kernels only see model shapes: aligned spec only
        ptrs_c = (("pair_out_ptr", "fp32"), ("offsets_ptr", "i64"), ("out_ptr", dt))
        out.append(Case("moe_triton", "_combine_kernel", "BH1024", dt, "aligned", ptrs_c, (("BLOCK_H", 1024),), 4, 3))
        ptrs_w = (("key_ptr", dt), ("value_ptr", dt), ("cache_ptr", dt), ("slot_ptr", "i64"))
        for block in (256, 512, 1024, 4096):  # Hkv * D: 4x64, 8x64 or 4x128, 8x128, 32x128
            warps = 4 if block >= 1024 else 2
            out.append(
                Case("attention_triton", "_write_kv_kernel", f"ROW{block}", dt, "aligned", ptrs_w,
                     (("BLOCK", block),), warps, 3)
            )  # fmt: skip
        ptrs_a = (("q_ptr", dt), ("cache_ptr", dt), ("out_ptr", dt), ("bt_ptr", "i64"), ("seq_lens_ptr", "i64"))
        ptrs_a += (("sinks_ptr", "fp32"),)
        # decode: without splits the partial-state pointers are unused (given `out`); with them float32
        ptrs_d = (*ptrs_a, ("part_ptr", dt), ("ml_ptr", dt))
        ptrs_ds = (*ptrs_a, ("part_ptr", "fp32"), ("ml_ptr", "fp32"))
        for d in (64, 128):
            # HAS_SINKS (gpt-oss) adds a few scalar ops after the K/V loop: the sink-free build is the one checked
            att = (("BLOCK_D", d), ("UPCAST", False), ("PRECISION", precision), ("HAS_SINKS", False))
            # G in {4, 8} is a runtime int (BLOCK_G = 16 for both): one compile covers both groups
            cfg = decode_config(d, torch_dtype, interpret=False)
            for split, ptrs in ((False, ptrs_d), (True, ptrs_ds)):
                out.append(
                    Case("attention_triton", "_decode_kernel",
                         f"D{d} G4/8 BN{cfg['BLOCK_N']}{' split' if split else ''}", dt, "aligned", ptrs,
                         (("BLOCK_G", 16), ("BLOCK_N", cfg["BLOCK_N"]), *att, ("SPLIT", split)), cfg["num_warps"], 3)
                )  # fmt: skip
            ptrs_m = (("part_ptr", "fp32"), ("ml_ptr", "fp32"), ("out_ptr", dt), ("sinks_ptr", "fp32"))
            out.append(
                Case("attention_triton", "_decode_merge_kernel", f"D{d} BS64", dt, "aligned", ptrs_m,
                     (("BLOCK_S", 64), ("BLOCK_D", d), ("HAS_SINKS", False)), 4, 3)
            )  # fmt: skip
            cfg = prefill_config(d, torch_dtype, interpret=False)
            out.append(
                Case("attention_triton", "_prefill_kernel", f"D{d} BM{cfg['BLOCK_M']} BN{cfg['BLOCK_N']}", dt,
                     "aligned", (*ptrs_a, ("qsl_ptr", "i64")),
                     (("BLOCK_M", cfg["BLOCK_M"]), ("BLOCK_N", cfg["BLOCK_N"]), *att), cfg["num_warps"], 3)
            )  # fmt: skip
    # the one-launch MoE alignment: dtype-free; expert counts of the families (Mixtral 8 ... DeepSeek 256)
    ptrs_al = (("ids_ptr", "i64"), ("sorted_ptr", "i32"), ("block_expert_ptr", "i32"), ("num_used_ptr", "i32"))
    for block_e in (16, 64, 128, 256, 512):
        block_p, warps = (32 if block_e >= 256 else 64), (4 if block_e <= 128 else 8)
        for bm in (16, 64):
            out.append(
                Case("moe_triton", "_align_kernel", f"BE{block_e} BP{block_p} BM{bm}", "i64", "aligned", ptrs_al,
                     (("BM", bm), ("BLOCK_P", block_p), ("BLOCK_E", block_e)), warps, 3)
            )  # fmt: skip
    return out


def toolchain_missing() -> str | None:
    """Why AOT compiles for CUDA cannot run here (no NVIDIA backend / ptxas / cuobjdump), else None."""
    try:
        import triton
        from triton.backends import backends
    except ImportError as exc:  # pragma: no cover - triton is a dependency
        return f"triton not importable: {exc}"
    if "nvidia" not in backends:
        return "this triton build has no NVIDIA backend"
    for tool in ("ptxas", "cuobjdump"):
        if not _tool(tool).exists():
            return f"triton's NVIDIA backend bundles no {tool} ({_tool(tool)})"
    del triton
    return None


def _tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _kernel(case: Case) -> Any:
    import importlib

    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(f"dynserve_kernels.{case.module}"), case.kernel)
    if not isinstance(fn, JITFunction):
        raise RuntimeError("kernels were imported under TRITON_INTERPRET=1: run with TRITON_INTERPRET=0")
    return fn


def _signature(fn: Any, case: Case) -> tuple[dict[str, str], dict[tuple[int, ...], list[list[Any]]]]:
    """Triton signature and divisibility attributes of a launch under `case.spec`."""
    pointers = dict(case.pointers)
    consts = dict(case.constexprs)
    sig: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, arg in enumerate(fn.arg_names):
        if arg in consts:
            sig[arg] = "constexpr"
            continue
        if arg in pointers:
            sig[arg] = "*" + pointers[arg]
            aligned = True  # torch allocations are 256-byte aligned
        elif arg == "qk_scale":
            sig[arg] = "fp32"
            aligned = False
        else:
            sig[arg] = "i32"
            aligned = case.spec == "aligned" and arg not in _PER_STEP and (arg in _MODEL_DIMS or "stride" in arg)
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


_RESOURCE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def compile_case(case: Case, target: str) -> Result:
    """Compile `case` for `target` ("sm_90" | "sm_80") and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Result(case, target)
    t0 = time.perf_counter()
    try:
        fn = _kernel(case)
        sig, attrs = _signature(fn, case)
        src = ASTSource(fn, sig, dict(case.constexprs), attrs)
        opts = dict(num_warps=case.num_warps, num_stages=case.num_stages)
        compiled = triton.compile(src, target=GPUTarget("cuda", TARGETS[target][0], 32), options=opts)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            dump = subprocess.run(
                [str(_tool("cuobjdump")), "--dump-resource-usage", str(cubin)],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
        usage = {k: int(v) for k, v in _RESOURCE.findall(dump.split("Function", 1)[1])}
        ptx = compiled.asm["ptx"]
        res.regs = usage["REG"]
        res.stack = max(usage["STACK"], usage["LOCAL"])
        res.shared = compiled.metadata.shared + usage["SHARED"]
        res.mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "-"
    except Exception as exc:  # report every failure; the caller decides
        res.error = f"{type(exc).__name__}: {exc}"[:2000]
    res.seconds = time.perf_counter() - t0
    return res


def _job(args: tuple[Case, str]) -> Result:
    return compile_case(*args)


def run_all(
    targets: tuple[str, ...] = tuple(TARGETS),
    specs: tuple[str, ...] = ("aligned",),
    workers: int | None = None,
    kernel: str | None = None,
) -> list[Result]:
    """Compile every case for every target, in parallel processes (results in case order)."""
    os.environ["TRITON_INTERPRET"] = "0"  # inherited by the workers before they import the kernels
    jobs = [(c, t) for t in targets for c in cases(specs) if kernel is None or kernel in c.kernel]
    # the big MoE GEMMs first, so the pool does not end on one long compile
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][0].module != "moe_triton" or "combine" in jobs[i][0].kernel)
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        done = list(pool.map(_job, [jobs[i] for i in order], chunksize=1))
    results: list[Result] = [None] * len(jobs)  # type: ignore[list-item]
    for i, res in zip(order, done, strict=True):
        results[i] = res
    return results


def problems(res: Result) -> list[str]:
    """What makes a compiled case unfit to serve: compile error, spills, shared memory over the limit."""
    out = []
    if res.error:
        out.append(f"compile error: {res.error}")
        return out
    if res.stack > 0:
        out.append(f"{res.stack} B/thread stack frame (register spills) at {res.regs} registers")
    if res.shared > res.shared_limit:
        out.append(f"{res.shared / 1024:.1f} KB shared memory > {res.shared_limit // 1024} KB on {res.target}")
    return out


def format_table(results: list[Result]) -> str:
    lines = [
        "| target | kernel | row | dtype | spec | regs | spill B | shared KB | mma | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        kernel = r.case.kernel.strip("_").removesuffix("_kernel")
        if r.error:
            lines.append(f"| {r.target} | {kernel} | {r.case.row} | {r.case.dtype} | {r.case.spec} | ERROR |||||")
            continue
        lines.append(
            f"| {r.target} | {kernel} | {r.case.row} | {r.case.dtype} | {r.case.spec} | {r.regs} | {r.stack} "
            f"| {r.shared / 1024:.0f} | {r.mma} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--target", action="append", choices=list(TARGETS), help="default: all")
    parser.add_argument("--spec", action="append", choices=list(SPECS), help="default: aligned")
    parser.add_argument("--kernel", help="only kernels whose name contains this")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    if (why := toolchain_missing()) is not None:
        print(f"cannot compile for CUDA here: {why}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = run_all(tuple(args.target or TARGETS), tuple(args.spec or ["aligned"]), args.workers, args.kernel)
    print(format_table(results))
    bad = [(r, p) for r in results for p in problems(r)]
    for r, p in bad:
        print(f"FAIL {r.target} {r.case.name}: {p}")
    print(f"{len(results)} compiles in {time.perf_counter() - t0:.1f} s, {len(bad)} problems")
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "name": r.case.name} for r in results], default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
