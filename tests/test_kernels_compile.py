"""GPU readiness without a GPU: every Triton kernel compiles ahead of time for sm_90 and sm_80.

`dynserve_kernels.aot` compiles each kernel at every `_CONFIG_TABLE` row / attention shape and each
dtype (bf16, fp16, fp32) with the argument specialization of a real model (dims and strides
divisible by 16), runs ptxas and reads the cubin. A case fails on a compile error, on any register
spill (a stack frame > 0) or on shared memory above the target's limit (227 KB sm_90, 163 KB
sm_80). The compiles run in a subprocess with TRITON_INTERPRET=0 (conftest sets it to 1, which
turns the kernels into interpreter functions at import); compiled kernels land in Triton's cache,
so a second run takes seconds. `pytest -s` prints the table. Skipped only when this Triton build
has no NVIDIA backend with ptxas and cuobjdump.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import dynserve_kernels
import pytest
import torch
from dynserve_kernels import aot

CASES = aot.cases()


def _env() -> dict[str, str]:
    """This process's environment with the interpreter off and the same import path (worktree shims)."""
    path = os.pathsep.join(p for p in sys.path if p)
    return {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    """(target, case name) -> resources of the compiled kernel, from one parallel AOT run."""
    if (why := aot.toolchain_missing()) is not None:
        pytest.skip(f"no ahead-of-time CUDA compile here: {why}")
    out = tmp_path_factory.mktemp("aot") / "results.json"
    cmd = [sys.executable, "-W", "ignore", "-m", "dynserve_kernels.aot", "--json", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    print(proc.stdout)  # the table (pytest -s)
    if not out.exists():
        pytest.fail(f"AOT compile run failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return {(r["target"], r["name"]): r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("target", list(aot.TARGETS))
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def test_kernel_compiles_without_spills_within_shared_memory(compiled, case: aot.Case, target: str):
    r = compiled[(target, case.name)]
    assert r["error"] is None, f"{case.name} does not compile for {target}: {r['error']}"
    assert r["stack"] == 0, f"{case.name} on {target}: {r['stack']} B/thread of spills at {r['regs']} registers"
    limit = aot.TARGETS[target][1]
    assert r["shared"] <= limit, f"{case.name} on {target}: {r['shared'] / 1024:.0f} KB shared > {limit // 1024} KB"


def test_bf16_gemms_use_tensor_cores(compiled):
    # the 16-bit MoE GEMMs and attention dots run on mma (sm_80) / mma or wgmma (sm_90), never FMA
    # (the split-decode merge has no dot: a weighted sum of a few rows)
    for (_, name), r in compiled.items():
        dots = any(k in name for k in ("gate_up", "down", "decode", "prefill")) and "merge" not in name
        if not name.endswith("fp32 aligned") and dots:
            assert r["mma"] in ("mma", "wgmma"), (name, r["target"], r["mma"])
    big = [r for (t, n), r in compiled.items() if t == "sm_90" and "BM128" in n and "fp32" not in n]
    assert big and all(r["mma"] == "wgmma" for r in big)


def test_per_step_ints_are_not_specialized():
    # num_pairs / num_blocks / stride_bt / tiles_per_split change every step: a specialization on them (== 1, % 16)
    # would compile a new kernel in the middle of serving
    code = (
        "from dynserve_kernels import attention_triton as a, moe_triton as m\n"
        "def dns(fn): return sorted(p.name for p in fn.params if p.do_not_specialize)\n"
        "print(dns(m._gate_up_kernel), dns(m._down_kernel), dns(a._decode_kernel), dns(a._prefill_kernel))\n"
    )
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    moe = "['num_blocks', 'num_pairs']"
    decode = "['stride_bt', 'tiles_per_split']"
    assert proc.stdout.split() == [*moe.split(), *moe.split(), *decode.split(), "['stride_bt']"]


def test_select_backend_warns_when_cuda_runs_in_the_interpreter(monkeypatch):
    monkeypatch.delenv("DYNSERVE_KERNEL_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1 is set but the device is CUDA"):
        assert dynserve_kernels.select_backend(torch.device("cuda")) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dynserve_kernels.select_backend("cpu", use_triton=True) == "triton"  # the CPU interpreter: fine
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert dynserve_kernels.select_backend("cuda") == "triton"


def test_aot_module_runs_as_a_script_help():
    proc = subprocess.run(
        [sys.executable, "-m", "dynserve_kernels.aot", "--help"], env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--json" in proc.stdout
    assert Path(aot.__file__).name == "aot.py"
