"""gpt-oss end to end: the biased top-k router against transformers' `GptOssTopKRouter` and under the
adaptive policies; the experts (biases, interleaved gate/up, clamped SwiGLU) against transformers'
`GptOssExperts`; MXFP4 experts dequantised at load; greedy generation through the engine (chunked
prefill, paged decode, sliding-window layers shorter than the context) and the HTTP server equal to
transformers'; top_p spending fewer experts than the checkpoint's k and saying so in `usage`.
(Logit parity through the paged cache, float32 and bfloat16: test_model_parity.py's "gpt_oss".)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from dynserve_kernels.moe_ref import ClampedSwiGLU, dense_moe_reference, fused_moe_ref
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from test_deepseek import hf_greedy, pairs
from test_model_parity import prompt

from dynserve import LLM, RoutingConfig, SamplingParams
from dynserve.config import EngineConfig
from dynserve.engine.async_engine import AsyncEngine
from dynserve.model.layers import FP4_E2M1_VALUES, dequantize_mxfp4
from dynserve.routing import CheckpointRule, RoutingBatch, route
from dynserve.server.app import ServerSettings, build_app

E, TOP_K, HIDDEN = 8, 2, 64  # tests/checkpoints.py's gpt_oss
NEW_TOKENS = 8
RULE = CheckpointRule(num_experts=E, top_k=TOP_K, renormalize=True)  # gpt_oss.gpt_oss_rule
# prompts longer than the sliding window (6): the window decides what the sliding layers see
PROMPTS = [prompt(n, 384, 60 + n) for n in (5, 14, 23)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _router_logits(seed: int, T: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, HIDDEN, generator=g)  # [T, H]
    return x, torch.randn(E, HIDDEN, generator=g) * 0.3, torch.randn(E, generator=g)  # [E, H], [E]


def test_router_equals_transformers_and_adaptive_rule():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    x, w, b = _router_logits(seed=3)
    ref = GptOssTopKRouter(GptOssConfig(hidden_size=HIDDEN, num_local_experts=E, num_experts_per_tok=TOP_K))
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(b)
        _, ref_w, ref_ids = ref(x)  # [T, k] each
    logits = F.linear(x, w, b)  # [T, E]
    got = route(logits, RoutingBatch.single(RoutingConfig()), RULE)
    assert torch.equal(got.expert_ids.view(-1, TOP_K), ref_ids)  # same experts, same order
    torch.testing.assert_close(got.weights.view(-1, TOP_K), ref_w, rtol=1e-6, atol=1e-7)

    # adaptive policies: rank and sum the softmax over all E, weight by the softmax over the kept logits
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    top_p = route(logits, RoutingBatch.single(RoutingConfig(policy="top_p", p=0.5)), RULE)
    n = top_p.experts_per_token()
    assert n.min() >= 1 and n.float().mean() < TOP_K  # confident tokens keep one expert
    for t, ps in enumerate(pairs(top_p)):
        ids = [e for e, _ in ps]
        ranked = probs[t].argsort(descending=True).tolist()
        assert ids == ranked[: len(ids)]
        assert probs[t, ranked[: len(ids) - 1]].sum() < 0.5 <= probs[t, ranked[: len(ids)]].sum() + 1e-6
        kept = torch.softmax(logits[t, ids], dim=-1)
        torch.testing.assert_close(torch.tensor([wt for _, wt in ps]), kept, rtol=1e-5, atol=1e-6)
    thr = route(logits, RoutingBatch.single(RoutingConfig(policy="threshold", threshold=0.3, max_experts=3)), RULE)
    assert thr.experts_per_token().tolist() == (probs >= 0.3).sum(-1).clamp(1, 3).tolist()
    k4 = route(logits, RoutingBatch.single(RoutingConfig(policy="top_k", k=4)), RULE)
    torch.testing.assert_close(k4.weights.view(-1, 4), torch.softmax(logits.topk(4).values, dim=-1))


def test_experts_equal_transformers_with_biases_and_clamps():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    H, inter = 16, 12
    cfg = GptOssConfig(hidden_size=H, intermediate_size=inter, num_local_experts=E, swiglu_limit=0.8)
    ref = GptOssExperts(cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for prm in (ref.gate_up_proj, ref.gate_up_proj_bias, ref.down_proj, ref.down_proj_bias):
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)
    x = torch.randn(10, H, generator=g)  # [T, H]
    logits = torch.randn(10, E, generator=g)  # [T, E]
    a = route(logits, RoutingBatch.single(RoutingConfig()), RULE)
    with torch.no_grad():
        want = ref(x, a.expert_ids.view(-1, TOP_K), a.weights.view(-1, TOP_K))  # [T, H]
    gu = ref.gate_up_proj.detach()  # [E, H, 2I], gate/up interleaved
    w13 = torch.cat([gu[..., 0::2], gu[..., 1::2]], dim=-1).transpose(1, 2).contiguous()  # [E, 2I, H]
    b13 = torch.cat([ref.gate_up_proj_bias[:, 0::2], ref.gate_up_proj_bias[:, 1::2]], dim=-1).detach()  # [E, 2I]
    w2, b2 = ref.down_proj.detach().transpose(1, 2).contiguous(), ref.down_proj_bias.detach()  # [E, H, I], [E, H]
    act = ClampedSwiGLU(cfg.swiglu_alpha, cfg.swiglu_limit)
    got = fused_moe_ref(x, w13, w2, a, b13, b2, act)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense_moe_reference(x, w13, w2, a, b13, b2, act), want, rtol=1e-5, atol=1e-5)
    for backend in ("cpu", "triton"):  # the options route every backend through the reference
        torch.testing.assert_close(
            __import__("dynserve_kernels").fused_moe(x, w13, w2, a, backend, b13, b2, act), got, rtol=0, atol=0
        )


# ---------------------------------------------------------------- MXFP4


def _quantize_mxfp4(w: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random MXFP4 (blocks [..., G, 16] uint8, scales [..., G] uint8) shaped like w [..., K], and the
    float32 values they encode (exactly, by construction)."""
    g = torch.Generator().manual_seed(seed)
    *lead, K = w.shape
    codes = torch.randint(0, 16, (*lead, K // 32, 32), generator=g)  # [..., G, 32]
    scales = torch.randint(122, 128, (*lead, K // 32), generator=g, dtype=torch.int32)  # 2^-5 .. 2^0
    values = torch.tensor(FP4_E2M1_VALUES)[codes] * torch.exp2(scales.float() - 127)[..., None]  # [..., G, 32]
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)  # low nibble first: [..., G, 16]
    return blocks, scales.to(torch.uint8), values.reshape(*lead, K)


def test_dequantize_mxfp4_layout_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales, values = _quantize_mxfp4(torch.empty(3, 5, 64), seed=0)
    got = dequantize_mxfp4(blocks, scales, torch.float32)  # [3, 5, 64]
    assert torch.equal(got, values)
    # transformers' loader returns the [E, in, out] parameter: our tensor transposed
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(ref, got.transpose(1, 2))
    assert dequantize_mxfp4(blocks, scales, torch.bfloat16).dtype == torch.bfloat16


def test_mxfp4_checkpoint_loads_the_dequantised_experts(checkpoint_factory, tmp_path):
    src = checkpoint_factory("gpt_oss")
    plain, quant = tmp_path / "plain", tmp_path / "mxfp4"
    shutil.copytree(src, plain)
    shutil.copytree(src, quant)
    tensors = load_file(src / "model.safetensors")
    plain_t, quant_t = dict(tensors), dict(tensors)
    for name, t in tensors.items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            # stored [E, in, out]; MXFP4 packs [E, out, in] along `in`
            blocks, scales, values = _quantize_mxfp4(t.transpose(1, 2), seed=len(name))
            plain_t[name] = values.transpose(1, 2).contiguous()
            del quant_t[name]
            quant_t[f"{name}_blocks"], quant_t[f"{name}_scales"] = blocks, scales
    save_file(plain_t, plain / "model.safetensors", metadata={"format": "pt"})
    save_file(quant_t, quant / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((quant / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (quant / "config.json").write_text(json.dumps(cfg))
    a = LLM(str(plain)).generate(prompt_token_ids=PROMPTS[:2], sampling_params=GREEDY)
    b = LLM(str(quant)).generate(prompt_token_ids=PROMPTS[:2], sampling_params=GREEDY)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert [o.outputs[0].token_ids for o in a] == hf_greedy(plain, PROMPTS[:2])

    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quant / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gptq"):
        LLM(str(quant))


# ---------------------------------------------------------------- engine and server


def test_engine_greedy_matches_transformers_and_top_p_spends_fewer_experts(checkpoint_factory):
    path = checkpoint_factory("gpt_oss")
    llm = LLM(str(path), block_size=4, max_num_batched_tokens=16)  # chunked prefill + paged decode
    sparse = SamplingParams(
        temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, routing=RoutingConfig("top_p", p=0.3)
    )
    # one generate call mixes the checkpoint's rule and top_p requests
    outs = llm.generate(prompt_token_ids=PROMPTS * 2, sampling_params=[GREEDY] * 3 + [sparse] * 3)
    assert [o.outputs[0].token_ids for o in outs[:3]] == hf_greedy(path, PROMPTS)
    for o in outs[:3]:
        assert o.expert_usage.avg_experts_per_token == pytest.approx(TOP_K)
    for o in outs[3:]:
        usage = o.expert_usage
        assert 1 <= usage.avg_experts_per_token < TOP_K
        assert usage.expert_activations == sum(usage.per_layer)
        assert len(usage.per_layer) == 4  # every layer MoE
        assert all(0 < t < 384 for t in o.outputs[0].token_ids)


@pytest.fixture(scope="module")
def client(checkpoint_factory):
    cfg = EngineConfig.create(str(checkpoint_factory("gpt_oss")), num_kv_blocks=64, max_num_seqs=4)
    eng = AsyncEngine.from_config(cfg)
    yield TestClient(build_app(eng, ServerSettings(served_model_name="oss", api_key="")), raise_server_exceptions=False)
    eng.shutdown_sync(timeout=0)


def test_server_greedy_matches_transformers_and_top_p_usage(client, checkpoint_factory):
    path = checkpoint_factory("gpt_oss")
    want = hf_greedy(path, PROMPTS[1:])
    body = {"model": "oss", "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    offline = LLM(str(path)).generate(prompt_token_ids=PROMPTS[1:], sampling_params=GREEDY)
    assert [o.outputs[0].token_ids for o in offline] == want
    for p, o in zip(PROMPTS[1:], offline, strict=True):
        r = client.post("/v1/completions", json={**body, "prompt": p})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["text"] == o.outputs[0].text
        assert out["usage"]["avg_experts_per_token"] == pytest.approx(TOP_K)
    r = client.post("/v1/completions", json={**body, "prompt": PROMPTS[2], "routing": {"policy": "top_p", "p": 0.3}})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert 1 <= usage["avg_experts_per_token"] < TOP_K and usage["expert_activations"] > 0
