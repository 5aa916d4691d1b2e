"""lm-evaluation-harness against a live dynserve server (issue 18): its `local-completions` model sends
every multiple-choice option as token ids with `echo`, `logprobs: 1`, `max_tokens: 1` and scores the
prompt logprobs. Runs a tiny local task (tests/lm_eval_task, no network); skipped where lm-eval is not
installed (`pip install -e ".[lm-eval]"`; the dev extra brings it, so CI runs it)."""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

lm_eval = pytest.importorskip("lm_eval")

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_task"


@pytest.fixture(scope="module")
def server(mixtral_dir, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("lm_eval") / "serve.log", "wb")
    cmd = [sys.executable, "-m", "dynserve.cli", "serve", str(mixtral_dir), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--served-model-name", "tiny", "--num-kv-blocks", "64"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "server exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def test_lm_eval_multiple_choice_runs_against_the_server(server, mixtral_dir, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task_dir = tmp_path / "task"
    shutil.copytree(TASK_DIR, task_dir)
    yaml_path = task_dir / "dynserve_tiny_mc.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("tiny_mc.jsonl", str(task_dir / "tiny_mc.jsonl")))
    model_args = (
        f"model=tiny,base_url={server}/v1/completions,tokenizer={mixtral_dir},tokenizer_backend=huggingface,"
        "num_concurrent=1,max_retries=1"
    )
    out = simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=["dynserve_tiny_mc"],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
    )
    acc = out["results"]["dynserve_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    samples = out["samples"]["dynserve_tiny_mc"]
    assert len(samples) == 4
    for sample in samples:
        lls = [resp[0][0] for resp in sample["resps"]]
        assert len(lls) == 3 and all(math.isfinite(x) and x < 0 for x in lls)
        assert len(set(lls)) > 1  # the options are scored, not given one value
