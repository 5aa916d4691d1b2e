"""One-command GPU check of dynserve's Triton path: correctness compiled for the GPU, kernel resources,
engine parity, kernel and end-to-end speed. Needs only torch, triton, transformers, safetensors and
tokenizers (pytest and pytest-xdist if present, for the kernel tests); no network, no FastAPI.

    python3 -m dynserve.bench.gpu_check --out DIR              # one CUDA GPU; 214 s on an H200
    python3 -m dynserve.bench.gpu_check --out DIR --dry-run    # CPU, Triton interpreter, tiny shapes

From the repository root no install is needed: the script maps kernels/ to `dynserve_kernels`.

Sections run in order of importance, each in try/except and within the time left (--budget), and
print as they go. DIR gets summary.md (the tables; the README's GPU section takes it verbatim),
results.json and the logs. Exit status 1 when any check FAILs.

  env          card, versions, compiled mode; measured ceilings: device copy GB/s, bf16 matmul TFLOP/s
  tests        tests/test_kernels_*.py on the device (compiled Triton, not the interpreter)
  resources    registers, spills, shared memory, wgmma, 16-byte cp.async of every kernel config
  correctness  fused MoE at Mixtral / Qwen3-30B-A3B shapes (every config row, k 0..8), attention at
               (32,8,128)/(32,4,128) up to 8K context, three dtypes, against float32 references
  engine       tiny checkpoints: LLM on CUDA (Triton and torch backends, fp32 and bf16) vs the CPU
               engine: greedy tokens and expert usage, also under top_p and k=1 routing
  offline      ~1.1B random Mixtral, bf16, offline tok/s at batch 1 and 64 vs transformers on the GPU
  moe_bench    fused MoE vs torch._grouped_mm and the per-expert reference, k from 0 to 8
  attn_bench   decode attention vs the reference, B x context
  sweep        decode MoE configs around the table's (if time is left)
"""

from __future__ import annotations

import sys

DRY_RUN = "--dry-run" in sys.argv

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # before triton is imported (a test importing this module keeps its own)
    os.environ["TRITON_INTERPRET"] = "1" if DRY_RUN else "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _import_paths() -> list[str]:
    """Make `dynserve`, `dynserve_kernels` (the kernels/ folder) and tests/ importable without installing."""
    paths = [str(ROOT), str(ROOT / "tests")]
    try:
        import dynserve_kernels  # noqa: F401  (installed: pip install -e .)
    except ImportError:
        shim = Path(tempfile.mkdtemp(prefix="dynserve-shim-"))
        (shim / "dynserve_kernels").symlink_to(ROOT / "kernels")
        paths.insert(0, str(shim))
    for p in reversed(paths):
        sys.path.insert(0, p)
    return paths


PATHS = _import_paths()

import torch  # noqa: E402

DEVICE = "cpu" if DRY_RUN else "cuda"


# ----------------------------------------------------------------------------------------------- report
class Report:
    """Tables and PASS/FAIL checks, written to DIR after every section (a killed run keeps its results)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.tables: list[tuple[str, list[str], list[list[Any]]]] = []
        self.checks: list[list[Any]] = []  # [section, name, PASS/FAIL, detail]
        self.sections: list[list[Any]] = []  # [section, status, seconds]
        self.data: dict[str, Any] = {}

    def table(self, title: str, header: list[str], rows: list[list[Any]]) -> None:
        self.tables.append((title, header, rows))
        print(_markdown(title, header, rows), flush=True)

    def check(self, section: str, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append([section, name, "PASS" if ok else "FAIL", detail])
        if not ok:
            print(f"FAIL [{section}] {name}: {detail}", flush=True)

    @property
    def failed(self) -> bool:
        return any(c[2] == "FAIL" for c in self.checks) or any(s[1] == "error" for s in self.sections)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        parts = [_markdown("sections", ["section", "status", "s"], self.sections)]
        fails = [c for c in self.checks if c[2] == "FAIL"]
        n_pass = sum(c[2] == "PASS" for c in self.checks)
        parts.append(f"checks: {n_pass} PASS, {len(fails)} FAIL\n")
        if fails:
            parts.append(_markdown("failed checks", ["section", "check", "result", "detail"], fails))
        parts += [_markdown(t, h, r) for t, h, r in self.tables]
        (self.out / "summary.md").write_text("\n".join(parts))
        blob = {"sections": self.sections, "checks": self.checks, "tables": self.tables, "data": self.data}
        (self.out / "results.json").write_text(json.dumps(blob, indent=1, default=str))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.4g}"
    return str(v)


def _markdown(title: str, header: list[str], rows: list[list[Any]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- timing
def bench_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds per call: triton's do_bench (L2 flushed between calls) on CUDA."""
    if DEVICE == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    fn()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return sorted(samples)[1] * 1e3


def wall_ms(fn: Callable[[], Any], iters: int = 10) -> float:
    """Median host wall-clock milliseconds per call, synchronised (launch and host-sync overheads included)."""
    fn()
    samples = []
    for _ in range(iters):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        samples.append(time.perf_counter() - t0)
    return sorted(samples)[len(samples) // 2] * 1e3


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when out has non-finite values)."""
    if not torch.isfinite(out).all():
        return float("inf")
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-5}
# bf16 MoE rounds gate, up, silu*up and each expert's output to bf16 (as the torch reference does):
# against a float32 computation that is ~1.5% relative error; against the bf16 reference it is ~TOL
BF16_VS_FP32 = 3e-2
if DRY_RUN:  # the interpreter's float32 -> bf16 casts are coarser than the GPU's round-to-nearest
    TOL[torch.bfloat16] = 3e-2  # measured ~1.5% on average, more at T = 1 (64 values)
    BF16_VS_FP32 = 4e-2
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------- shapes
# (name, E, H, I, top-k); dry-run shapes are tiny
MOE_SHAPES = [("mixtral-8x7b", 8, 4096, 14336, 2), ("qwen3-30b-a3b", 128, 2048, 768, 8)]
if DRY_RUN:
    MOE_SHAPES = [("mixtral-tiny", 8, 64, 96, 2), ("qwen3-tiny", 16, 64, 32, 8)]


# (Hq, Hkv, D) of the attention checks
ATTN_HEADS = [(8, 2, 32)] if DRY_RUN else [(32, 8, 128), (32, 4, 128)]


def moe_problem(E: int, H: int, inter: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    w13 = (torch.randn(E, 2 * inter, H, generator=gen, device=DEVICE) * H**-0.5).to(dtype)  # [E, 2I, H]
    w2 = (torch.randn(E, H, inter, generator=gen, device=DEVICE) * inter**-0.5).to(dtype)  # [E, H, I]
    return w13, w2


def assignment(T: int, E: int, k_min: int, k_max: int, seed: int = 1):
    from dynserve_kernels.bench_moe import random_assignment

    return random_assignment(T, E, min(k_min, E), min(k_max, E), seed, DEVICE)


# ----------------------------------------------------------------------------------------------- sections
def section_env(rep: Report, ctx: dict, budget: float) -> None:
    import transformers
    import triton
    from dynserve_kernels import moe_triton

    row = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "compiled": not moe_triton._interpreting(),
    }
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        row.update(
            card=props.name,
            sms=props.multi_processor_count,
            l2_mb=getattr(props, "L2_cache_size", 0) / 2**20,
            mem_gb=props.total_memory / 2**30,
            cc=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
        n = 2**29  # 1 GiB of bf16
    else:
        row.update(card="cpu (dry run)")
        n = 2**22
    src = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench_ms(functools.partial(dst.copy_, src))
    row["copy_GB_s"] = 2 * src.numel() * 2 / ms / 1e6  # bytes read + written
    del src, dst
    m = 8192 if DEVICE == "cuda" else 256
    a = torch.randn(m, m, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=DEVICE, dtype=torch.bfloat16)
    ms = bench_ms(functools.partial(torch.matmul, a, b))
    row["mm_TFLOP_s"] = 2 * m**3 / ms / 1e9
    del a, b
    _free()
    ctx["copy_GB_s"], ctx["mm_TFLOP_s"] = row["copy_GB_s"], row["mm_TFLOP_s"]
    rep.data["env"] = row
    rep.check("env", "triton compiled (not the interpreter)", row["compiled"] or DRY_RUN, str(row["compiled"]))
    rep.table("env", list(row), [list(row.values())])


def section_tests(rep: Report, ctx: dict, budget: float) -> None:
    import importlib.util

    files = [f"tests/{n}" for n in ("test_kernels_moe.py", "test_kernels_attention.py", "test_kernels_compile.py")]
    files = [f for f in files if (ROOT / f).is_file()]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    if importlib.util.find_spec("xdist") and DEVICE == "cuda":
        cmd[4:4] = ["-n", "8"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(PATHS + [os.environ.get("PYTHONPATH", "")]))
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        log, rc = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT after {budget:.0f} s", -1
    (rep.out / "kernel_tests.log").write_text(log if isinstance(log, str) else log.decode())
    last = [ln for ln in str(log).splitlines() if ln.strip()][-1:] or ["(no output)"]
    rep.check("tests", "kernel tests on the device", rc == 0, last[0])
    rep.table("kernel tests", ["files", "result", "s"], [[" ".join(files), last[0], round(time.time() - t0, 1)]])


def _kernel_stats(kernel: Any) -> list[Any]:
    """[regs, spills, shared KB, tensor-core instr, share of 16-byte cp.async] of a compiled kernel."""
    if kernel is None or not hasattr(kernel, "asm"):
        return ["-", "-", "-", "-", "-"]
    kernel._init_handles() if hasattr(kernel, "_init_handles") else None
    ptx = kernel.asm.get("ptx", "") if hasattr(kernel.asm, "get") else ""
    mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "none")
    cp = [ln for ln in ptx.splitlines() if "cp.async" in ln and "shared.global" in ln]
    vec16 = sum(", 16," in ln or ", 0x10," in ln or ln.rstrip().rstrip(";").endswith((", 16", ", 0x10")) for ln in cp)
    shared = getattr(kernel.metadata, "shared", 0) / 1024
    return [
        getattr(kernel, "n_regs", "?"),
        getattr(kernel, "n_spills", "?"),
        round(shared, 1),
        mma,
        f"{vec16}/{len(cp)}",
    ]


def section_resources(rep: Report, ctx: dict, budget: float) -> None:
    from dynserve_kernels import attention_triton as at
    from dynserve_kernels import moe_triton as mt
    from dynserve_kernels.attention_ref import paged_attention_ref  # noqa: F401  (import check)
    from kernel_utils import make_batch

    rows = []
    E, H, inter = 8, 1024, 512
    if DRY_RUN:
        H, inter = 64, 32
    for dname, dtype in list(DT.items())[: 1 if DRY_RUN else 3]:
        w13, w2 = moe_problem(E, H, inter, dtype)
        a = assignment(64, E, 2, 2)
        x = torch.randn(64, H, device=DEVICE).to(dtype)
        table = mt._CONFIG_TABLE["32bit" if dtype == torch.float32 else "16bit"]
        for bound, cfg in table:
            mt.LAST_COMPILED.clear()
            mt.fused_moe_triton(x, w13, w2, a, config=cfg)
            tag = _tag(cfg)
            for kname in ("gate_up", "down"):
                stats = _kernel_stats(mt.LAST_COMPILED.get(kname))
                rows.append([kname, dname, f"P<={bound}" if bound < 1 << 40 else "P>4096", tag, *stats])
                if isinstance(stats[1], int):
                    rep.check("resources", f"{kname} {dname} {tag} no spills", stats[1] == 0, f"{stats[1]} spills")
        rows.append(["combine", dname, "", "", *_kernel_stats(mt.LAST_COMPILED.get("combine"))])
    for dname, dtype in list(DT.items())[: 1 if DRY_RUN else 3]:
        for hq, hkv, d in ATTN_HEADS:
            for seqs in ([(300, 1), (70, 1)], [(300, 40), (70, 70)]):
                batch, nb = make_batch(seqs, 16)
                cache = torch.zeros(2, nb, 16, hkv, d, dtype=dtype, device=DEVICE)
                T = batch.num_tokens
                q = torch.randn(T, hq, d, device=DEVICE).to(dtype)
                kv = torch.randn(T, hkv, d, device=DEVICE).to(dtype)
                dev_batch = _batch_on(batch)
                at.write_kv_triton(kv, kv, cache, dev_batch.slot_mapping)
                at.paged_attention_triton(q, cache, dev_batch, d**-0.5)
                kname = "decode" if all(n == 1 for _, n in seqs) else "prefill"
                rows.append([kname, dname, f"Hq{hq} Hkv{hkv} D{d}", "", *_kernel_stats(at.LAST_COMPILED.get(kname))])
        rows.append(["write_kv", dname, "Hkv4 D128", "", *_kernel_stats(at.LAST_COMPILED.get("write_kv"))])
    rep.table(
        "kernel resources", ["kernel", "dtype", "case", "config", "regs", "spills", "smem_KB", "tc", "vec16"], rows
    )


def _batch_on(batch: Any) -> Any:
    import dataclasses

    moved = {
        f.name: v.to(DEVICE) for f in dataclasses.fields(batch) if isinstance(v := getattr(batch, f.name), torch.Tensor)
    }
    return dataclasses.replace(batch, **moved)


def section_correctness(rep: Report, ctx: dict, budget: float) -> None:
    from dynserve_kernels import moe_triton as mt
    from dynserve_kernels.align import moe_align_ids, moe_align_reference
    from dynserve_kernels.moe_ref import fused_moe_ref

    deadline = time.time() + 0.6 * budget  # the rest is attention's
    rows = []
    for name, E, H, inter, topk in MOE_SHAPES:
        w13, w2 = moe_problem(E, H, inter, torch.bfloat16)
        w13f, w2f = w13.float(), w2.float()
        for T in (1, 7) if DRY_RUN else (1, 7, 64, 256):
            for kmode, (k0, k1) in (("top-k", (topk, topk)), ("k 0..8", (0, 8))):
                if time.time() > deadline:
                    break
                a = assignment(T, E, k0, k1, seed=T)
                x = torch.randn(T, H, device=DEVICE).to(torch.bfloat16)
                out = mt.fused_moe_triton(x, w13, w2, a)
                err = rel_err(out, fused_moe_ref(x.float(), w13f, w2f, a))
                err16 = rel_err(out, fused_moe_ref(x, w13, w2, a))
                det = bool(torch.equal(out, mt.fused_moe_triton(x, w13, w2, a)))
                ok = err <= BF16_VS_FP32 and err16 <= TOL[torch.bfloat16] and det
                row = [name, "bf16", T, kmode, a.num_pairs, "table", err, err16, det, "PASS" if ok else "FAIL"]
                rows.append(row)
                rep.check("correctness", f"moe {name} bf16 T={T} {kmode}", ok, f"rel {err:.2e}/{err16:.2e} det {det}")
        # every table row forced once, T=64, k 0..8
        a = assignment(64, E, 0, 8, seed=5)
        x = torch.randn(64, H, device=DEVICE).to(torch.bfloat16)
        ref = fused_moe_ref(x.float(), w13f, w2f, a)
        ref16 = fused_moe_ref(x, w13, w2, a)
        for _, cfg in mt._CONFIG_TABLE["16bit"]:
            out = mt.fused_moe_triton(x, w13, w2, a, config=cfg)
            err, err16 = rel_err(out, ref), rel_err(out, ref16)
            ok = err <= BF16_VS_FP32 and err16 <= TOL[torch.bfloat16]
            rows.append([name, "bf16", 64, "k 0..8", a.num_pairs, _tag(cfg), err, err16, "", "PASS" if ok else "FAIL"])
            rep.check("correctness", f"moe {name} bf16 forced {_tag(cfg)}", ok, f"rel {err:.2e}/{err16:.2e}")
        del w13, w2, w13f, w2f
        _free()
    # fp16 / fp32 at the second (smaller) shape, every row of their table
    name, E, H, inter, _ = MOE_SHAPES[-1]
    for dname in ("fp16", "fp32"):
        dtype = DT[dname]
        w13, w2 = moe_problem(E, H, inter, dtype)
        a = assignment(64, E, 0, 8, seed=6)
        x = torch.randn(64, H, device=DEVICE).to(dtype)
        ref = fused_moe_ref(x.double(), w13.double(), w2.double(), a)
        for _, cfg in mt._CONFIG_TABLE["32bit" if dtype == torch.float32 else "16bit"]:
            err = rel_err(mt.fused_moe_triton(x, w13, w2, a, config=cfg), ref)
            ok = err <= TOL[dtype] * (3 if dtype == torch.float16 else 1)
            rows.append([name, dname, 64, "k 0..8", a.num_pairs, _tag(cfg), err, "", "", "PASS" if ok else "FAIL"])
            rep.check("correctness", f"moe {name} {dname} {_tag(cfg)}", ok, f"rel {err:.2e}")
        del w13, w2
        _free()
    # alignment on the device == the plain-Python layout
    ids = torch.randint(0, 16, (777,), device=DEVICE)
    for bm in (16, 64):
        s_ids, blocks, _ = moe_align_ids(ids, bm, 16)
        ref_s, ref_b = moe_align_reference(ids.tolist(), bm, 16)
        ok = s_ids.tolist() == ref_s and blocks.tolist() == ref_b
        rep.check("correctness", f"moe_align on device, block {bm}", ok)
    rep.table("MoE correctness (rel. L2 error vs float32/64 reference)",
              ["shape", "dtype", "T", "k", "pairs", "config", "vs fp32/64", "vs torch bf16", "deterministic", "result"],
              rows)  # fmt: skip
    _attention_correctness(rep, deadline + 0.4 * budget)


def _attention_correctness(rep: Report, deadline: float) -> None:
    from dynserve_kernels import attention_triton as at
    from dynserve_kernels.attention_ref import paged_attention_ref, write_kv_ref
    from kernel_utils import fill_prefix, make_batch

    ctxs = (1, 17, 1000, 8191) if DEVICE == "cuda" else (1, 17, 40)
    layouts = {
        "decode": [(c, 1) for c in ctxs],
        "prefill": [(c, c) for c in ctxs[:3]],
        "mixed": [(ctxs[2], 1), (ctxs[1], ctxs[1]), (ctxs[-1], 37 if DEVICE == "cuda" else 5), (ctxs[0], 1)],
    }
    rows = []
    for hq, hkv, d in ATTN_HEADS:
        for dname, dtype in DT.items():
            for lname, seqs in layouts.items():
                if time.time() > deadline:
                    break
                gen = torch.Generator().manual_seed(0)
                batch, nb = make_batch(seqs, 16, seed=1)
                cache = torch.zeros(2, nb, 16, hkv, d, dtype=dtype)
                fill_prefix(cache, batch, gen)
                T = batch.num_tokens
                q = torch.randn(T, hq, d, generator=gen).to(dtype)
                k = torch.randn(T, hkv, d, generator=gen).to(dtype)
                v = torch.randn(T, hkv, d, generator=gen).to(dtype)
                db = _batch_on(batch)
                dcache = cache.to(DEVICE)
                dq, dk, dv = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
                # a padding token (slot -1) must not be written
                at.write_kv_triton(dk, dv, dcache, db.slot_mapping)
                rcache = cache.to(DEVICE).float()
                write_kv_ref(dk.float(), dv.float(), rcache, db.slot_mapping)
                kv_ok = bool(torch.equal(dcache.float(), rcache))
                out = at.paged_attention_triton(dq, dcache, db, d**-0.5)
                ref = paged_attention_ref(dq.float(), rcache, db, d**-0.5)
                err = rel_err(out, ref)
                ok = err <= max(TOL[dtype], 2e-5) and kv_ok
                rows.append(
                    [f"({hq},{hkv},{d})", dname, lname, str([c for c, _ in seqs]), err, kv_ok, "PASS" if ok else "FAIL"]
                )
                rep.check("correctness", f"attention ({hq},{hkv},{d}) {dname} {lname}", ok, f"rel {err:.2e} kv {kv_ok}")
    _free()
    rep.table("attention correctness (rel. L2 error vs float32 reference)",
              ["heads", "dtype", "layout", "context", "rel_err", "kv_write_exact", "result"], rows)  # fmt: skip


def _engine_run(path: str, prompts: list[list[int]], params: list[Any], **opts: Any) -> tuple[list, list]:
    from dynserve import LLM

    llm = LLM(path, **opts)
    try:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    finally:
        llm.engine.shutdown() if hasattr(llm.engine, "shutdown") else None
        del llm
        _free()
    toks = [list(o.outputs[0].token_ids) for o in outs]
    usage = [round(o.expert_usage.avg_experts_per_token, 4) for o in outs]
    return toks, usage


def section_engine(rep: Report, ctx: dict, budget: float) -> None:
    from checkpoints import make_checkpoint

    from dynserve import SamplingParams

    deadline = time.time() + budget
    tmp = Path(tempfile.mkdtemp(prefix="dynserve-gpucheck-"))
    gen = torch.Generator().manual_seed(0)
    rows = []
    routings = {
        "default": None,
        "top_p 0.5 min0": {"policy": "top_p", "p": 0.5, "min_experts": 0},
        "top_k k=1": {"policy": "top_k", "k": 1},
    }
    archs = ("mixtral",) if DRY_RUN else ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe")
    if DRY_RUN:
        routings.pop("top_k k=1")
    for arch in archs:
        if time.time() > deadline:
            break
        path = str(make_checkpoint(tmp / arch, arch))
        lens = (5, 17, 1) if DRY_RUN else (5, 17, 30, 9, 64, 1)
        prompts = [torch.randint(10, 300, (n,), generator=gen).tolist() for n in lens]
        for rname, routing in routings.items():
            n_new = 6 if DRY_RUN else 12
            sp = [SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True, routing=routing) for _ in prompts]
            ref_t, ref_u = _engine_run(path, prompts, sp, device="cpu", dtype="float32")
            variants = [("cuda fp32 triton", "float32", True)]
            if rname == "default":
                variants += [("cuda fp32 torch", "float32", False), ("cuda bf16 triton", "bfloat16", True)]
            for vname, dtype, use_triton in variants:
                if DRY_RUN and not use_triton:
                    continue
                t, u = _engine_run(path, prompts, sp, device=DEVICE, dtype=dtype, use_triton=use_triton)
                n = sum(len(x) for x in ref_t)
                same = sum(a == b for x, y in zip(t, ref_t, strict=True) for a, b in zip(x, y, strict=False))
                if dtype == "bfloat16":  # vs the CPU engine in bf16 (torch references)
                    bt, bu = _engine_run(path, prompts, sp, device="cpu", dtype="bfloat16")
                    same = sum(a == b for x, y in zip(t, bt, strict=True) for a, b in zip(x, y, strict=False))
                    usage_diff = max(abs(a - b) for a, b in zip(u, bu, strict=True))
                    ok = same / n >= 0.9
                else:
                    usage_diff = max(abs(a - b) for a, b in zip(u, ref_u, strict=True))
                    ok = same == n and usage_diff < 1e-6
                rows.append([arch, rname, vname, f"{same}/{n}", usage_diff, "PASS" if ok else "FAIL"])
                rep.check("engine", f"{arch} {rname} {vname}", ok, f"tokens {same}/{n}, usage diff {usage_diff}")
    rep.table("engine parity vs the CPU engine (greedy tokens, avg experts/token)",
              ["arch", "routing", "engine", "same tokens", "usage diff", "result"], rows)  # fmt: skip


def section_offline(rep: Report, ctx: dict, budget: float) -> None:
    import transformers

    from dynserve.bench.offline import BENCH_CONFIG, make_prompts, run_dynserve, run_transformers

    # the ~100M CPU benchmark model, scaled to ~1.1B: 8 experts top-2, vocab 32000
    cfg = dict(BENCH_CONFIG, hidden_size=1024, intermediate_size=2816, num_hidden_layers=14, num_attention_heads=16)
    new_tokens, batches = 128, (1, 64)
    if DRY_RUN:
        cfg.update(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512)  # fmt: skip
        new_tokens, batches = 8, (1, 4)
    path = Path(tempfile.mkdtemp(prefix="dynserve-1b-"))
    t0 = time.time()
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**cfg))
    n_params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    del model
    _free()
    print(f"offline: {n_params / 1e9:.2f}B-parameter checkpoint built in {time.time() - t0:.1f} s", flush=True)
    rows = []
    dtype = "bfloat16"
    for bsz in batches:
        prompts = make_prompts(bsz, cfg["vocab_size"], 64, 64)
        dt, n = run_dynserve(path, prompts, new_tokens, device=DEVICE, dtype=dtype, max_num_seqs=max(bsz, 1))
        ds = n / dt
        _free()
        dt_hf, n_hf = run_transformers(path, prompts, new_tokens, bsz, device=DEVICE, dtype=torch.bfloat16)
        hf = n_hf / dt_hf
        _free()
        rows.append([f"{n_params / 1e9:.2f}B Mixtral 8x top-2", "bf16", bsz, new_tokens, ds, hf, ds / hf])
        print(f"offline batch {bsz}: dynserve {ds:.1f} tok/s, transformers {hf:.1f} tok/s", flush=True)
    rep.data["offline"] = rows
    rep.table("offline decode, output tok/s (64-token prompts, greedy, EOS ignored)",
              ["model", "dtype", "batch", "new tokens", "dynserve", "transformers", "ratio"], rows)  # fmt: skip


def _syncs_per_call(fn: Callable[[], Any]) -> int | str:
    if DEVICE != "cuda":
        return "-"
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def _graph_capturable(fn: Callable[[], Any]) -> str:
    if DEVICE != "cuda":
        return "-"
    try:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        return "yes"
    except Exception as e:  # a host sync or allocation inside capture
        torch.cuda.synchronize()
        return f"no ({type(e).__name__})"


def section_moe_bench(rep: Report, ctx: dict, budget: float) -> None:
    from dynserve_kernels.bench_moe import grouped_mm_moe
    from dynserve_kernels.moe_ref import fused_moe_ref
    from dynserve_kernels.moe_triton import fused_moe_triton

    deadline = time.time() + budget
    copy_bw = ctx.get("copy_GB_s", 1.0) * 1e9  # bytes/s
    peak = ctx.get("mm_TFLOP_s", 1.0) * 1e12
    rows = []
    for name, E, H, inter, topk in MOE_SHAPES:
        w13, w2 = moe_problem(E, H, inter, torch.bfloat16)
        cases = [(M, f"top-{topk}", topk, topk) for M in (1, 16, 64, 256, 4096)]
        cases += [(M, "k 0..8", 0, 8) for M in (1, 64, 4096)]
        if E > 8:
            cases += [(M, f"k={k}", k, k) for M in (1, 64) for k in (1, 2, 4)]
        if DRY_RUN:
            cases = [(c[0] if c[0] < 100 else 32, *c[1:]) for c in cases[:4]]
        for M, kname, k0, k1 in cases:
            if time.time() > deadline:
                break
            a = assignment(M, E, k0, k1, seed=M)
            x = torch.randn(M, H, device=DEVICE).to(torch.bfloat16)
            P = a.num_pairs
            used = int(torch.unique(a.expert_ids).numel())
            nbytes = used * 3 * H * inter * 2 + 2 * M * H * 2
            flops = 6.0 * P * H * inter
            floor_us = max(nbytes / copy_bw, flops / peak) * 1e6
            call = functools.partial(fused_moe_triton, x, w13, w2, a)
            kern = bench_ms(call) * 1e3
            e2e = wall_ms(call) * 1e3
            try:
                gmm = bench_ms(functools.partial(grouped_mm_moe, x, w13, w2, a)) * 1e3
            except Exception as e:  # torch._grouped_mm missing or unsupported here
                gmm = float("nan")
                rep.data.setdefault("grouped_mm_error", repr(e))
            ref_call = functools.partial(fused_moe_ref, x, w13, w2, a)
            ref = bench_ms(ref_call) * 1e3 if M <= 256 or E <= 8 else float("nan")
            syncs = _syncs_per_call(call) if M in (1, 64) else ""
            rows.append([name, M, kname, P, used, nbytes / 1e6, floor_us, kern, e2e, gmm, ref,
                         floor_us / kern, flops / kern / 1e6, gmm / kern if gmm == gmm else "n/a", syncs])  # fmt: skip
        if E > 8 and DEVICE == "cuda":
            a = assignment(1, E, topk, topk)
            x = torch.randn(1, H, device=DEVICE).to(torch.bfloat16)
            rep.data["moe_graph_capture"] = _graph_capturable(functools.partial(fused_moe_triton, x, w13, w2, a))
        del w13, w2
        _free()
    rep.table(
        "fused MoE, bf16 (us; floor = max(bytes / copy rate, FLOPs / matmul rate); kern = do_bench median, "
        "L2 flushed; e2e = host wall clock incl. alignment and syncs)",
        ["shape", "M", "k", "pairs", "experts", "MB", "floor_us", "kern_us", "e2e_us", "grouped_mm_us",
         "ref_us", "kern/floor", "TFLOP/s", "gmm/kern", "syncs/call"],
        rows,
    )  # fmt: skip
    if "moe_graph_capture" in rep.data:
        rep.table("MoE CUDA-graph capture", ["capturable"], [[rep.data["moe_graph_capture"]]])


def section_attn_bench(rep: Report, ctx: dict, budget: float) -> None:
    from dynserve_kernels.attention_ref import paged_attention_ref
    from dynserve_kernels.attention_triton import _num_sms, decode_splits, paged_attention_triton
    from kernel_utils import make_batch

    deadline = time.time() + budget
    copy_bw = ctx.get("copy_GB_s", 1.0) * 1e9
    rows = []
    hq, hkv, d = (32, 8, 128)
    cases = [(B, L) for B in (1, 8, 64) for L in (1024, 8192)] + [(1, 32768)] if DEVICE == "cuda" else [(2, 64)]
    for B, L in cases:
        if time.time() > deadline:
            break
        batch, nb = make_batch([(L, 1)] * B, 16)
        cache = torch.randn(2, nb, 16, hkv, d, device=DEVICE).to(torch.bfloat16)
        q = torch.randn(B, hq, d, device=DEVICE).to(torch.bfloat16)
        db = _batch_on(batch)
        nbytes = B * L * hkv * d * 2 * 2
        kern = bench_ms(functools.partial(paged_attention_triton, q, cache, db, d**-0.5)) * 1e3  # auto splits
        whole = bench_ms(functools.partial(paged_attention_triton, q, cache, db, d**-0.5, num_splits=1)) * 1e3
        ref = bench_ms(functools.partial(paged_attention_ref, q, cache, db, d**-0.5)) * 1e3
        splits = decode_splits(B, hkv, L, _num_sms(torch.device(DEVICE)))
        floor = nbytes / copy_bw * 1e6
        rows.append([B, L, f"({hq},{hkv},{d})", nbytes / 1e6, splits, kern, whole, ref, floor / kern, floor / whole])
        del cache
        _free()
    rep.table(
        "decode attention, bf16 (us; splits: flash-decoding ranges per context, `triton_1split_us` the same "
        "kernel with one program per (sequence, kv head))",
        ["B", "context", "heads", "KV MB", "splits", "triton_us", "triton_1split_us", "ref_us", "floor/kern",
         "floor/1split"],
        rows,
    )  # fmt: skip


def _tag(cfg: dict[str, int]) -> str:
    w, s = cfg.get("num_warps", 4), cfg.get("num_stages", 3)
    return f"BM{cfg['BLOCK_M']} BN{cfg['BLOCK_N']} BK{cfg['BLOCK_K']} w{w} s{s}"


def section_sweep(rep: Report, ctx: dict, budget: float) -> None:
    from dynserve_kernels import moe_triton as mt

    deadline = time.time() + budget
    configs = [
        dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1, num_warps=w, num_stages=s)
        for bn in (32, 64, 128)
        for bk in (64, 128, 256)
        for w, s in ((4, 3), (4, 4), (8, 4))
    ]
    if DRY_RUN:
        configs = [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=1, num_stages=1)]
    rows = []
    for name, E, H, inter, topk in MOE_SHAPES:
        w13, w2 = moe_problem(E, H, inter, torch.bfloat16)
        for M in (1, 16, 64):
            if time.time() > deadline:
                break
            a = assignment(M, E, topk, topk, seed=M)
            x = torch.randn(M, H, device=DEVICE).to(torch.bfloat16)
            base_cfg = mt.get_config(a.num_pairs, torch.bfloat16)
            base = bench_ms(functools.partial(mt.fused_moe_triton, x, w13, w2, a)) * 1e3
            best, best_cfg = base, "table"
            for cfg in configs:
                if time.time() > deadline:
                    break
                try:
                    us = bench_ms(functools.partial(mt.fused_moe_triton, x, w13, w2, a, config=cfg)) * 1e3
                except Exception:  # out of shared memory for this tile
                    continue
                if us < best:
                    best, best_cfg = (
                        us,
                        f"BN{cfg['BLOCK_N']} BK{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}",
                    )
            rows.append([name, M, _tag(base_cfg), base, best_cfg, best, base / best])
        del w13, w2
        _free()
    rep.table(
        "decode MoE config sweep, bf16 (us)",
        ["shape", "M", "table config", "table_us", "best", "best_us", "speedup"],
        rows,
    )


SECTIONS: list[tuple[str, Callable[[Report, dict, float], None], float, float]] = [
    # (name, function, minimum seconds left to start it, its own cap in seconds)
    ("env", section_env, 5, 30),
    ("tests", section_tests, 30, 110),
    ("resources", section_resources, 20, 50),
    ("correctness", section_correctness, 30, 70),
    ("engine", section_engine, 30, 60),
    ("offline", section_offline, 60, 110),
    ("moe_bench", section_moe_bench, 30, 70),
    ("attn_bench", section_attn_bench, 10, 20),
    ("sweep", section_sweep, 20, 60),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_out", help="folder for summary.md, results.json and logs")
    ap.add_argument("--budget", type=float, default=390.0, help="seconds for the whole check")
    ap.add_argument("--only", default=None, help="comma-separated sections to run (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    args = ap.parse_args(argv)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    rep = Report(Path(args.out))
    start = time.time()
    deadline = start + args.budget
    only = set(args.only.split(",")) if args.only else None
    ctx: dict[str, Any] = {}
    for name, fn, need, cap in SECTIONS:
        if only and name not in only:
            continue
        left = deadline - time.time()
        if left < need:
            rep.sections.append([name, "skipped (time)", 0])
            continue
        print(f"\n=== {name} ({left:.0f} s left) ===", flush=True)
        t0 = time.time()
        torch.manual_seed(0)  # the same inputs every run: a check's result must not depend on luck
        try:
            fn(rep, ctx, min(cap, left - 5))
            status = "ok"
        except Exception:
            status = "error"
            tb = traceback.format_exc()
            print(tb, flush=True)
            rep.data.setdefault("errors", {})[name] = tb
            (rep.out / f"error_{name}.txt").write_text(tb) if rep.out.mkdir(
                parents=True, exist_ok=True
            ) is None else None
            _free()
        rep.sections.append([name, status, round(time.time() - t0, 1)])
        rep.save()
    print("\n" + (rep.out / "summary.md").read_text(), flush=True)
    print(f"total {time.time() - start:.0f} s; {'FAIL' if rep.failed else 'all checks PASS'}")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
