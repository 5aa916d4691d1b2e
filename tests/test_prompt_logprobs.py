"""Prompt logprobs (what lm-eval's likelihood tasks need): every prompt token's log-probability under
the model, as transformers' log_softmax gives it; None for the first token; the top N alternatives;
computed even where the prefix cache holds the prompt; max_tokens 0 returns the prompt alone."""

from __future__ import annotations

import pytest
import torch

from dynserve import LLM, SamplingParams

TEXT = "def hello(name):\n    return 'hello ' + name\n"


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory):
    return str(checkpoint_factory("mixtral"))


@pytest.fixture(scope="module")
def hf_logprobs(ckpt):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()  # [P, V]
        return torch.log_softmax(logits, dim=-1)  # [P, V]

    return run


@pytest.mark.parametrize("chunk", [None, 5])
def test_prompt_logprobs_match_transformers(ckpt, hf_logprobs, chunk):
    opts = {"max_num_batched_tokens": chunk, "enable_chunked_prefill": True} if chunk else {}
    llm = LLM(ckpt, num_kv_blocks=64, block_size=4, **opts)
    ids = llm.tokenizer.encode(TEXT)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    out = llm.generate({"prompt_token_ids": ids}, params)[0]
    ref = hf_logprobs(ids)  # row p predicts token p+1
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(ids) and plp[0] is None
    for p in range(1, len(ids)):
        lp = plp[p]
        assert lp.token_id == ids[p]
        assert lp.logprob == pytest.approx(float(ref[p - 1, ids[p]]), abs=1e-4)
        top = ref[p - 1].topk(3)
        assert [t.token_id for t in lp.top] == top.indices.tolist()
    # again with the prompt in the prefix cache: still every position
    again = llm.generate({"prompt_token_ids": ids}, params)[0]
    assert [lp.logprob if lp else None for lp in again.prompt_logprobs] == [lp.logprob if lp else None for lp in plp]


def test_python_logprobs_carry_the_token_text(ckpt):
    # vLLM's Logprob.decoded_token: each alternative's text, for sampled and prompt positions alike
    llm = LLM(ckpt, num_kv_blocks=64)
    out = llm.generate(TEXT, SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=2))[0]
    positions = [*out.outputs[0].logprobs, *out.prompt_logprobs[1:]]
    assert positions and all(len(p.top) == 2 for p in positions)
    for p in positions:
        for alt in p.top:
            assert alt.decoded == llm.tokenizer.decode([alt.token_id], skip_special_tokens=False)
    assert any(alt.decoded for p in positions for alt in p.top)


def test_max_tokens_zero_returns_the_prompt_alone(ckpt):
    llm = LLM(ckpt, num_kv_blocks=64)
    out = llm.generate(TEXT, SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert out.finished and out.outputs[0].token_ids == [] and out.outputs[0].text == ""
    assert out.outputs[0].finish_reason == "length"
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    stats = llm.get_stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total


def test_prompt_logprobs_validation():
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


@pytest.fixture(scope="module")
def client(ckpt):
    from fastapi.testclient import TestClient

    from dynserve.config import EngineConfig
    from dynserve.engine import AsyncEngine
    from dynserve.server.app import ServerSettings, build_app

    engine = AsyncEngine.from_config(EngineConfig.create(ckpt, num_kv_blocks=64))
    yield TestClient(build_app(engine, ServerSettings(served_model_name="m", api_key="")))
    engine.shutdown_sync(timeout=0)


def test_lm_eval_style_echo_logprobs_over_http(client, ckpt, hf_logprobs):
    """lm-eval's likelihood request: token-id prompt, echo, logprobs 1, max_tokens 1 (and the SDK's
    max_tokens 0): the prompt tokens' logprobs come back, null for the first, as transformers has them."""
    from dynserve.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(ckpt).encode(TEXT)
    ref = hf_logprobs(ids)
    for max_tokens in (0, 1):
        r = client.post(
            "/v1/completions",
            json={"prompt": [ids], "max_tokens": max_tokens, "logprobs": 1, "echo": True, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = [float(ref[p - 1, ids[p]]) for p in range(1, len(ids))]
        assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=1e-4)
        assert lp["text_offset"] == sorted(lp["text_offset"])
        if max_tokens == 0:
            assert r.json()["usage"]["completion_tokens"] == 0


def test_streamed_echo_carries_the_prompt_logprobs_first(client):
    import json

    body = {"prompt": TEXT, "max_tokens": 3, "logprobs": 2, "echo": True, "stream": True, "temperature": 0}
    with client.stream("POST", "/v1/completions", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    first = events[0]["choices"][0]
    assert first["text"] == TEXT
    assert first["logprobs"]["token_logprobs"][0] is None
    assert len(first["logprobs"]["tokens"]) > 1
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    plain = client.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]
    assert text == plain["text"]
