"""The `dynserve` command as a user runs it: generate, serve, and clear errors."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

DYNSERVE = [sys.executable, "-m", "dynserve.cli"]


def test_generate_json(mixtral_dir):
    r = subprocess.run(
        [
            *DYNSERVE,
            "generate",
            str(mixtral_dir),
            "--prompt",
            "def f(x):",
            "--prompt",
            "import os",
            "--max-tokens",
            "5",
            "--json",
            "--routing",
            "top_p",
            "--routing-p",
            "0.3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row["prompt"] for row in rows] == ["def f(x):", "import os"]
    assert all(row["outputs"][0]["finish_reason"] in ("length", "stop") for row in rows)
    assert all(1.0 <= row["avg_experts_per_token"] <= 4.0 for row in rows)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    r = subprocess.run(
        [*DYNSERVE, "generate", str(tmp_path / "nope"), "--prompt", "x"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2
    assert "config.json" in r.stderr and "Traceback" not in r.stderr


def test_unknown_architecture_is_named(mixtral_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(mixtral_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FancyNewMoeForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run([*DYNSERVE, "generate", str(d), "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "FancyNewMoeForCausalLM" in r.stderr and "Traceback" not in r.stderr


def test_invalid_routing_flag_is_rejected(mixtral_dir):
    r = subprocess.run(
        [*DYNSERVE, "generate", str(mixtral_dir), "--prompt", "x", "--routing", "top_p", "--routing-p", "1.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "routing.p" in r.stderr


@pytest.mark.slow
def test_serve_answers_then_exits_0_on_sigterm(mixtral_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [
            *DYNSERVE,
            "serve",
            str(mixtral_dir),
            "--port",
            str(port),
            "--served-model-name",
            "tiny",
            "--routing",
            "top_p",
            "--routing-p",
            "0.4",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.3)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "tiny", "prompt": "import os", "max_tokens": 4, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200
        usage = r.json()["usage"]
        assert usage["completion_tokens"] >= 1 and usage["avg_experts_per_token"] > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        log.close()


def _synopsis_blocks() -> dict[str, str]:
    """README's CLI synopsis: command -> its lines (the first and the indented continuations)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## CLI") :]
    code = section[section.index("```") + 3 : section.index("```", section.index("```") + 3)]
    blocks: dict[str, str] = {}
    current = ""
    for line in code.splitlines():
        if line.startswith("dynserve "):
            current = line.split()[1]
            blocks[current] = ""
        if current:
            blocks[current] += line + "\n"
    return blocks


def test_every_cli_flag_is_in_the_readme_synopsis():
    from dynserve.cli import build_parser

    blocks = _synopsis_blocks()
    (commands,) = [a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"]
    options = {
        name: {o for a in p._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        for name, p in commands.choices.items()
    }
    engine_flags = options["generate"] & options["eval-routing"] & options["serve"]  # `[ENGINE FLAGS]`
    for name, opts in options.items():
        block = blocks[name]
        own = opts if name == "serve" or "[ENGINE FLAGS]" not in block else opts - engine_flags
        assert [o for o in own if o not in block] == [], name
    assert all(o in blocks["serve"] for o in engine_flags)
