"""The served model id (issue 18, item 4): `--served-model-name` when given, else the checkpoint
directory's name, and `dynserve-demo` for the embedded model; never a machine-specific path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dynserve.config import EngineConfig, default_served_model_name
from dynserve.engine import AsyncEngine
from dynserve.server.app import ServerSettings, build_app


def _models(model_dir: str | None, **settings: object) -> list[dict]:
    engine = AsyncEngine.from_config(EngineConfig.create(model_dir, num_kv_blocks=16))
    try:
        with TestClient(build_app(engine, ServerSettings(api_key="", **settings))) as client:
            models = client.get("/v1/models").json()["data"]
            name = models[0]["id"]
            r = client.post("/v1/completions", json={"model": name, "prompt": "import os", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["model"] == name
            return models
    finally:
        engine.shutdown_sync(timeout=0)


def test_the_demo_model_is_served_as_dynserve_demo():
    (card,) = _models(None)
    assert card["id"] == "dynserve-demo" and card["root"] == "dynserve-demo"


def test_a_checkpoint_is_served_under_its_directory_name(mixtral_dir):
    (card,) = _models(str(mixtral_dir))
    assert card["id"] == Path(mixtral_dir).name and not card["id"].startswith("/")
    (card,) = _models(str(mixtral_dir), served_model_name="my-model")
    assert card["id"] == "my-model"


def test_relative_and_trailing_slash_paths_give_the_directory_name(tmp_path, monkeypatch):
    (tmp_path / "Qwen3-30B-A3B").mkdir()
    monkeypatch.chdir(tmp_path / "Qwen3-30B-A3B")
    assert default_served_model_name(".") == "Qwen3-30B-A3B"
    assert default_served_model_name(str(tmp_path / "Qwen3-30B-A3B") + os.sep) == "Qwen3-30B-A3B"
    monkeypatch.chdir(tmp_path)
    assert default_served_model_name("Qwen3-30B-A3B") == "Qwen3-30B-A3B"


@pytest.mark.parametrize("given", [None, "x"])
def test_the_engine_config_carries_the_name(given):
    cfg = EngineConfig.create(None, served_model_name=given, num_kv_blocks=16)
    assert cfg.model_name == (given or "dynserve-demo")
