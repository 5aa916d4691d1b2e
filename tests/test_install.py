"""Installs match the commands (issue 18, item 2): the core install has no triton and the CPU path
never imports it; the commands' extra dependencies come with extras that the README shows on the
command's line; the CPU Dockerfile installs the CPU build of torch by default."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
README = (ROOT / "README.md").read_text()

_NO_TRITON = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError("No module named 'triton'", name="triton")

sys.meta_path.insert(0, Block())
from fastapi.testclient import TestClient

from dynserve import LLM, SamplingParams
from dynserve.config import EngineConfig
from dynserve.engine import AsyncEngine
from dynserve.server.app import ServerSettings, build_app

llm = LLM(sys.argv[1], num_kv_blocks=32)
out = llm.generate(["def f(x):", "import os"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
assert all(len(o.outputs[0].token_ids) == 4 for o in out)
engine = AsyncEngine.from_config(EngineConfig.create(sys.argv[1], num_kv_blocks=32))
with TestClient(build_app(engine, ServerSettings(api_key=""))) as client:
    r = client.post("/v1/completions", json={"prompt": "x = 1", "max_tokens": 3, "stream": True})
    assert r.status_code == 200 and "[DONE]" in r.text, r.text
engine.shutdown_sync(timeout=0)
assert not [m for m in sys.modules if m.split(".")[0] == "triton"]
print("ok")
"""


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in reqs}


def test_the_cpu_path_runs_with_triton_not_installed(mixtral_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", _NO_TRITON, str(mixtral_dir)], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_triton_only_in_the_cuda_and_dev_extras():
    extras = PYPROJECT["optional-dependencies"]
    assert "triton" not in _names(PYPROJECT["dependencies"])
    assert "triton" in _names(extras["cuda"]) and "triton" in _names(extras["dev"])
    assert 'pip install -e ".[cuda]"' in README


def test_each_commands_dependency_comes_with_the_extra_the_readme_names():
    extras = PYPROJECT["optional-dependencies"]
    assert "matplotlib" in _names(extras["eval"]) and "httpx" in _names(extras["loadtest"])
    for extra in ("eval", "loadtest"):  # dev (what CI installs) has everything
        assert _names(extras[extra]) <= _names(extras["dev"])
    section = README[README.index("## Evaluating routing") :]
    install = section.index('pip install -e ".[eval]"')
    assert install < section.index("dynserve eval-routing")
    # lm-eval's local-completions with `tokenizer_backend=huggingface` (the README's command) imports
    # transformers, which lm-eval[api] does not bring
    assert {"lm-eval", "transformers"} <= _names(extras["lm-eval"]) <= _names(extras["dev"])
    assert 'pip install -e ".[lm-eval]"' in section and "tokenizer_backend=huggingface" in section
    loadtests = (ROOT / "loadtests" / "README.md").read_text()
    assert loadtests.index('pip install -e ".[loadtest]"') < loadtests.index("python -m loadtests.loadgen --")


def test_the_readme_says_how_to_get_each_torch_build():
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in README
    assert "https://download.pytorch.org/whl/cu" in README


def test_the_cpu_dockerfile_defaults_to_the_cpu_build_of_torch():
    text = (ROOT / "deploy" / "Dockerfile.cpu").read_text()
    (default,) = re.findall(r"^ARG TORCH_INDEX_URL=(\S*)$", text, flags=re.M)
    assert default == "https://download.pytorch.org/whl/cpu"
    assert '--index-url "${TORCH_INDEX_URL}"' in text
