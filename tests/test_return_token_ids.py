"""`return_token_ids` (vLLM's): the prompt's and each choice's token ids in completions and chat,
streamed (each chunk's new ids; the prompt's once per choice) and not; and a model without a
tokenizer, whose stream carries no text, streams a chunk per token with it, which is what the load
generator times (TTFT/ITL) for token-id prompts."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from dynserve.config import EngineConfig
from dynserve.engine.async_engine import AsyncEngine
from dynserve.server.app import ServerSettings, build_app


def _client(path):  # noqa: ANN202
    eng = AsyncEngine.from_config(EngineConfig.create(str(path), num_kv_blocks=64, max_num_seqs=4))
    return eng, TestClient(build_app(eng, ServerSettings(api_key="")), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(checkpoint_factory):
    eng, c = _client(checkpoint_factory("mixtral"))
    yield c
    eng.shutdown_sync(timeout=0)


def _events(r) -> list[dict]:
    assert r.status_code == 200, r.text
    blocks = r.text.split("\n\n")[:-1]
    assert blocks[-1] == "data: [DONE]"
    return [json.loads(b[len("data: ") :]) for b in blocks[:-1]]


def test_completion_token_ids_streamed_and_not(client):
    body = {"prompt": ["hello world", "the cat"], "max_tokens": 6, "temperature": 0, "ignore_eos": True, "n": 2}
    plain = client.post("/v1/completions", json=body).json()
    assert all("token_ids" not in c for c in plain["choices"])  # off by default
    full = client.post("/v1/completions", json={**body, "return_token_ids": True}).json()
    assert [c["text"] for c in full["choices"]] == [c["text"] for c in plain["choices"]]
    assert all(len(c["token_ids"]) == 6 for c in full["choices"])
    assert sum(len(c["token_ids"]) for c in full["choices"]) == full["usage"]["completion_tokens"]
    prompts = {c["index"] // 2: c["prompt_token_ids"] for c in full["choices"]}
    assert sum(len(p) for p in prompts.values()) == full["usage"]["prompt_tokens"] and prompts[0] != prompts[1]

    chunks = _events(client.post("/v1/completions", json={**body, "return_token_ids": True, "stream": True}))
    ids: dict[int, list[int]] = {}
    prompt_ids: dict[int, list[list[int]]] = {}
    for ch in chunks:
        for c in ch["choices"]:
            ids.setdefault(c["index"], []).extend(c["token_ids"])
            if "prompt_token_ids" in c:
                prompt_ids.setdefault(c["index"], []).append(c["prompt_token_ids"])
    assert ids == {c["index"]: c["token_ids"] for c in full["choices"]}  # greedy: the same tokens
    assert prompt_ids == {c["index"]: [c["prompt_token_ids"]] for c in full["choices"]}  # once per choice


def test_chat_token_ids_streamed_and_not(client):
    body = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    full = client.post("/v1/chat/completions", json=body).json()
    (choice,) = full["choices"]
    assert len(choice["token_ids"]) == 5 and len(choice["prompt_token_ids"]) == full["usage"]["prompt_tokens"]
    chunks = _events(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert [i for ch in chunks for c in ch["choices"] for i in c.get("token_ids", [])] == choice["token_ids"]
    assert [c["prompt_token_ids"] for ch in chunks for c in ch["choices"] if "prompt_token_ids" in c] == [
        choice["prompt_token_ids"]
    ]


def test_return_token_ids_is_validated(client):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "return_token_ids": "yes please"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_token_ids"


def test_model_without_tokenizer_streams_a_chunk_per_token(checkpoint_factory, tmp_path):
    src = checkpoint_factory("mixtral")
    path = tmp_path / "no_tok"
    shutil.copytree(src, path)
    for f in path.glob("tokenizer*"):
        f.unlink()
    eng, client = _client(path)
    try:
        body = {"prompt": [5, 9, 13, 2], "max_tokens": 7, "temperature": 0, "ignore_eos": True, "stream": True}
        silent = _events(client.post("/v1/completions", json=body))
        assert len([c for ch in silent for c in ch["choices"]]) < 7  # no text: nothing per token to send
        chunks = _events(client.post("/v1/completions", json={**body, "return_token_ids": True}))
        per_token = [c["token_ids"] for ch in chunks for c in ch["choices"] if c["token_ids"]]
        assert len(per_token) == 7 and all(len(t) == 1 for t in per_token)
    finally:
        eng.shutdown_sync(timeout=0)
