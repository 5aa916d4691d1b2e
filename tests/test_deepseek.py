"""DeepSeek-V2 / V3 end to end: the V2 softmax router (greedy, group-limited greedy) against
transformers' own router module and under the adaptive policies; greedy generation through the engine
and through the HTTP server equal to transformers'; top_p spending fewer experts than the checkpoint's
top-k and saying so in `usage`; the MLA paged-cache layout. (Logit parity of every variant through
the paged cache: test_model_parity.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from test_model_parity import prompt

from dynserve import LLM, RoutingConfig, SamplingParams
from dynserve.config import EngineConfig
from dynserve.engine.async_engine import AsyncEngine
from dynserve.model.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block, kv_cache_layout
from dynserve.routing import Assignment, CheckpointRule, RoutingBatch, route
from dynserve.server.app import ServerSettings, build_app

E, N_GROUP, TOPK_GROUP, TOP_K, HIDDEN, SCALE = 16, 4, 2, 3, 32, 2.0
NEW_TOKENS = 8
V3_TOP_K = 4  # num_experts_per_tok of tests/checkpoints.py's deepseek_v3


def v2_rule(grouped: bool = True) -> CheckpointRule:
    return CheckpointRule(
        num_experts=E,
        top_k=TOP_K,
        scoring="softmax",
        n_group=N_GROUP if grouped else 1,
        topk_group=TOPK_GROUP if grouped else 1,
        routed_scaling_factor=SCALE,
    )


def pairs(a: Assignment) -> list[list[tuple[int, float]]]:
    off = a.token_offsets.tolist()
    return [
        list(zip(a.expert_ids[off[t] : off[t + 1]].tolist(), a.weights[off[t] : off[t + 1]].tolist(), strict=True))
        for t in range(a.num_tokens)
    ]


def router_inputs(seed: int, T: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, HIDDEN, generator=g), torch.randn(E, HIDDEN, generator=g) * 0.5  # [T, H], [E, H]


# ---------------------------------------------------------------- DeepSeek-V2's softmax router


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_v2_router_default_top_k_equals_transformers_bit_for_bit(topk_method):
    import transformers
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    cfg = transformers.DeepseekV2Config(
        hidden_size=HIDDEN,
        n_routed_experts=E,
        num_experts_per_tok=TOP_K,
        n_group=N_GROUP,
        topk_group=TOPK_GROUP,
        topk_method=topk_method,
        routed_scaling_factor=SCALE,
    )
    x, w = router_inputs(seed=7)
    ref = DeepseekV2TopkRouter(cfg)
    with torch.no_grad():
        ref.weight.copy_(w)
        _, ref_w, ref_ids = ref(x)  # [T, k] each
    grouped = topk_method == "group_limited_greedy"
    got = route(F.linear(x, w), RoutingBatch.single(RoutingConfig()), v2_rule(grouped))
    assert got.experts_per_token().tolist() == [TOP_K] * len(x)
    assert torch.equal(got.expert_ids.view(-1, TOP_K), ref_ids)  # same experts, same order
    assert torch.equal(got.weights.view(-1, TOP_K), ref_w)  # bit for bit
    if grouped:  # the group limit changes some tokens' picks (else the test would not exercise it)
        free = torch.topk(F.linear(x, w), TOP_K).indices
        assert not torch.equal(free.sort(-1).values, ref_ids.sort(-1).values)


MIXED = [
    RoutingConfig(),
    RoutingConfig(policy="top_p", p=0.3),
    RoutingConfig(policy="top_p", p=0.8, renormalize=True, max_experts=5),
    RoutingConfig(policy="threshold", threshold=0.15, min_experts=0),
    RoutingConfig(policy="top_k", k=1),
    RoutingConfig(policy="top_k", k=100),
]


def test_v2_grouped_mixed_batch_equals_each_config_alone_and_top_p_stays_in_groups():
    x, w = router_inputs(seed=8, T=60)
    logits = F.linear(x, w)  # [T, E]
    index = torch.arange(len(x)) % len(MIXED)
    mixed = pairs(route(logits, RoutingBatch(list(MIXED), index), v2_rule()))
    for c, cfg in enumerate(MIXED):
        rows = (index == c).nonzero().flatten()
        alone = pairs(route(logits[rows], RoutingBatch.single(cfg), v2_rule()))
        for i, t in enumerate(rows.tolist()):
            assert mixed[t] == alone[i], (cfg, t)
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    best_groups = probs.view(-1, N_GROUP, E // N_GROUP).amax(-1).topk(TOPK_GROUP).indices  # [T, topk_group]
    top_p = route(logits, RoutingBatch.single(RoutingConfig(policy="top_p", p=0.3)), v2_rule())
    n = top_p.experts_per_token()
    assert n.min() >= 1 and n.float().mean() < TOP_K
    for t, ps in enumerate(pairs(top_p)):
        assert {e // (E // N_GROUP) for e, _ in ps} <= set(best_groups[t].tolist())
        # weights: the unbiased probabilities (no renormalisation) times routed_scaling_factor
        for e, wt in ps:
            assert wt == pytest.approx(SCALE * probs[t, e].item(), rel=1e-5)
    k_big = route(logits, RoutingBatch.single(RoutingConfig(policy="top_k", k=100)), v2_rule())
    assert k_big.experts_per_token().tolist() == [TOPK_GROUP * E // N_GROUP] * len(x)  # the group limit holds


def test_rule_accepts_softmax_groups_and_scaling_but_not_a_softmax_selection_bias():
    assert v2_rule().group_limited and v2_rule(grouped=False).group_limited
    assert not CheckpointRule(num_experts=E, top_k=2).group_limited
    with pytest.raises(NotImplementedError, match="sigmoid"):
        CheckpointRule(num_experts=E, top_k=2, selection_bias=True)
    with pytest.raises(ValueError, match="sigmoid"):
        route(torch.zeros(1, E), RoutingBatch.single(RoutingConfig()), v2_rule(), torch.zeros(E))


# ---------------------------------------------------------------- engine and server


def hf_greedy(path, prompts: list[list[int]]) -> list[list[int]]:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        return [
            hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]


PROMPTS = [prompt(n, 384, 40 + n) for n in (4, 13, 22)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v3_nolora", "deepseek_v2"])
def test_engine_greedy_matches_transformers(arch, checkpoint_factory):
    path = checkpoint_factory(arch)
    llm = LLM(str(path), block_size=4, max_num_batched_tokens=16)  # chunked prefill + paged decode
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, PROMPTS)


def test_v3_top_p_spends_fewer_experts_than_top_k_and_reports_it(checkpoint_factory):
    path = checkpoint_factory("deepseek_v3")
    llm = LLM(str(path), block_size=4)
    sparse = SamplingParams(
        temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, routing=RoutingConfig("top_p", p=0.2)
    )
    # one generate call mixes the checkpoint's rule and top_p requests
    outs = llm.generate(prompt_token_ids=PROMPTS * 2, sampling_params=[GREEDY] * 3 + [sparse] * 3)
    assert [o.outputs[0].token_ids for o in outs[:3]] == hf_greedy(path, PROMPTS)
    for o in outs[:3]:
        assert o.expert_usage.avg_experts_per_token == pytest.approx(V3_TOP_K)
    for o in outs[3:]:
        usage = o.expert_usage
        assert 1 <= usage.avg_experts_per_token < V3_TOP_K
        assert usage.expert_activations == sum(usage.per_layer)
        assert len(usage.per_layer) == 2  # 3 layers, the first dense
        assert all(0 < t < 384 for t in o.outputs[0].token_ids)


@pytest.fixture(scope="module")
def v3_client(checkpoint_factory):
    cfg = EngineConfig.create(str(checkpoint_factory("deepseek_v3")), num_kv_blocks=64, max_num_seqs=4)
    eng = AsyncEngine.from_config(cfg)
    yield TestClient(build_app(eng, ServerSettings(served_model_name="ds", api_key="")), raise_server_exceptions=False)
    eng.shutdown_sync(timeout=0)


def test_server_greedy_matches_offline_and_top_p_usage(v3_client, checkpoint_factory):
    path = checkpoint_factory("deepseek_v3")
    offline = LLM(str(path)).generate(prompt_token_ids=PROMPTS[:2], sampling_params=GREEDY)
    assert [o.outputs[0].token_ids for o in offline] == hf_greedy(path, PROMPTS[:2])
    body = {"model": "ds", "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    for p, o in zip(PROMPTS[:2], offline, strict=True):
        r = v3_client.post("/v1/completions", json={**body, "prompt": p})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["text"] == o.outputs[0].text
        assert out["usage"]["completion_tokens"] == NEW_TOKENS
        assert out["usage"]["avg_experts_per_token"] == pytest.approx(V3_TOP_K)
    routing = {"policy": "top_p", "p": 0.2}
    r = v3_client.post("/v1/completions", json={**body, "prompt": PROMPTS[1], "routing": routing})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert 1 <= usage["avg_experts_per_token"] < V3_TOP_K and usage["expert_activations"] > 0


def test_mla_cache_holds_the_latent_once_per_token(checkpoint_factory):
    # one row per token per layer: latent c (kv_lora_rank 24) + k_rope (8), K and V halves one memory;
    # decompressed, every query head (4) would cache K [k_nope 8 + k_rope 8] and V [12] padded to 16
    from dynserve.engine.model_runner import ModelRunner

    cfg = EngineConfig.create(str(checkpoint_factory("deepseek_v3")), kv_cache_memory_bytes=1 << 20, max_num_seqs=512)
    assert tuple(kv_cache_layout(cfg.model)) == (3, 1, 32, True)
    caches = allocate_kv_caches(cfg.model, 8, 4, "cpu", "float32")
    assert len(caches) == 3 and caches[0].shape == (2, 8, 4, 1, 32) and caches[0].stride(0) == 0
    caches[0][0, 1, 2, 0].fill_(3.0)
    assert caches[0][1, 1, 2, 0].eq(3.0).all()  # V is K
    latent_bytes, decompressed_bytes = 32 * 4, 2 * 4 * 16 * 4  # per token per layer, float32
    assert kv_cache_bytes_per_block(cfg.model, 4, "float32") == 3 * 4 * latent_bytes
    # a fixed --kv-cache-memory holds decompressed/latent = 4x the blocks it would hold decompressed
    runner = ModelRunner(cfg)
    decompressed_blocks = (1 << 20) // (3 * cfg.cache.block_size * decompressed_bytes)
    assert runner.num_kv_blocks == (1 << 20) // (3 * cfg.cache.block_size * latent_bytes) >= 4 * decompressed_blocks


def test_fp8_checkpoint_is_refused_with_the_format_named(checkpoint_factory, tmp_path):
    import json
    import shutil

    src = checkpoint_factory("deepseek_v3")
    dst = tmp_path / "fp8"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="fp8"):
        LLM(str(dst))


def test_kv_layout_bench_reports_the_latent_at_published_shapes(tmp_path, capsys):
    from dynserve.bench import kv_layout

    dirs = kv_layout.published_config_dirs(tmp_path)
    row = kv_layout.kv_row("DeepSeek-V3", dirs["DeepSeek-V3"], "bfloat16", 64 * 1024**3, 4096)
    # kv_lora_rank 512 + qk_rope 64 bf16 values, instead of 128 heads x (K, V) x max(192, 128)
    assert row["bytes_per_token_layer"] == (512 + 64) * 2 and row["decompressed_bytes"] == 2 * 128 * 192 * 2
    assert row["attention_layers"] == 61 and row["seqs"] >= 85 * row["seqs_decompressed"] > 0
    kv_layout.main(["--kv-cache-memory-gib", "1"])
    assert "| DeepSeek-V3 | 61 | 1 x 576 (K = V) | 1,152 | 98,304 | 85.3x |" in capsys.readouterr().out
