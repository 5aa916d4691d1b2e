"""The GPU check's CPU-runnable parts: `python -m dynserve.bench.gpu_check --dry-run` runs its sections on the CPU
(Triton interpreter, tiny shapes) and writes the summary a GPU run would write."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_writes_summary_and_passes(tmp_path):
    out = tmp_path / "gc"
    sections = "env,correctness,engine,offline,attn_bench"
    proc = subprocess.run(
        [sys.executable, "-m", "dynserve.bench.gpu_check", "--dry-run", "--out", str(out), "--only", sections],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    failed = [c for c in results.get("checks", []) if c[2] != "PASS"]
    assert proc.returncode == 0, f"failed: {failed}; errors: {results.get('errors')}; {proc.stderr[-2000:]}"
    assert [s[0] for s in results["sections"]] == sections.split(",")
    assert all(s[1] == "ok" for s in results["sections"]), results["sections"]
    checks = results["checks"]
    assert checks and all(c[2] == "PASS" for c in checks)
    names = " ".join(c[1] for c in checks)
    # the kernels were compared against references in every dtype, and the engine against the CPU engine
    assert "moe qwen3-tiny fp32" in names and "attention (8,2,32) bf16 decode" in names
    assert "mixtral top_p 0.5 min0 cuda fp32 triton" in names
    summary = (out / "summary.md").read_text()
    for title in ("### env", "### MoE correctness", "### engine parity", "### offline decode", "### decode attention"):
        assert title in summary


def test_failed_check_gives_exit_status_1(tmp_path):
    # a FAIL anywhere makes the one command fail, so a person running it cannot miss it
    from dynserve.bench import gpu_check

    rep = gpu_check.Report(tmp_path)
    rep.check("x", "ok one", True)
    assert not rep.failed
    rep.check("x", "bad one", False, "rel 1e-1")
    rep.save()
    assert rep.failed
    summary = (tmp_path / "summary.md").read_text()
    assert "1 PASS, 1 FAIL" in summary and "bad one" in summary
