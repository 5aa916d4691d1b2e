"""Native dynamic routing: LongCat-Flash's zero-computation (identity) experts, end to end.

A tiny random LongCat-Flash checkpoint (transformers `LongcatFlashForCausalLM`, saved offline) is
served by dynserve and compared with transformers: prefill logits, chunked prefill + decode through
the paged cache, a mixed batch, greedy generation through `LLM.generate`; and the routing itself:
zero-expert picks never reach the expert kernel (fewer pairs than top_k per token), and the usage
reported is the FFN experts only.
"""

from __future__ import annotations

import json
from pathlib import Path

import dynserve_kernels
import pytest
import torch
from checkpoints import save_tokenizer
from test_model_parity import BlockPool, assert_close_logits, prompt, run

from dynserve import LLM, RoutingConfig, SamplingParams
from dynserve.config import EngineConfig
from dynserve.model.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block
from dynserve.model.loader import load_model

N_EXPERTS, N_ZERO, TOP_K = 4, 3, 3
LONGCAT = dict(
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    ffn_hidden_size=96,
    q_lora_rank=32,
    kv_lora_rank=24,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    head_dim=8,  # transformers' rotary reads head_dim: it must equal qk_rope_head_dim
    v_head_dim=12,  # < qk_head_dim 16: V is zero-padded to 16 in the cache
    moe_topk=TOP_K,
    n_routed_experts=N_EXPERTS,
    zero_expert_num=N_ZERO,
    expert_ffn_hidden_size=40,
    routed_scaling_factor=2.0,
    max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    tie_word_embeddings=False,
)
LENGTHS = (5, 17, 33)
BLOCK_SIZE, NUM_BLOCKS = 4, 64
NEW_TOKENS = 16


def make_longcat(path: Path, seed: int = 0, **overrides: object) -> Path:
    """Save a tiny random LongCat-Flash checkpoint (config.json, safetensors, tokenizer) to `path`."""
    import transformers

    vocab = save_tokenizer(path)
    config = transformers.LongcatFlashConfig(vocab_size=vocab, **{**LONGCAT, **overrides})
    torch.manual_seed(seed)
    model = transformers.LongcatFlashForCausalLM(config).eval()
    with torch.no_grad():  # widen the random init so logits and routing are decisive
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 if "embed" in name else 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
        for layer in model.model.layers:  # a selection bias that actually changes picks
            layer.mlp.router.e_score_correction_bias.uniform_(-0.1, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    # transformers derives num_hidden_layers (= 2 x num_layers, the attention sublayers) and does not
    # write it; dynserve's ModelConfig reads num_hidden_layers, so the checkpoint states it too.
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 2 * cfg["num_layers"]
    (path / "config.json").write_text(json.dumps(cfg))
    return path


class LongcatSetup:
    """dynserve's model for one checkpoint plus transformers' model and one-shot logits."""

    def __init__(self, path: Path) -> None:
        import transformers

        self.path = path
        self.cfg = EngineConfig.create(path)
        self.model = load_model(self.cfg)
        self.prompts = [prompt(n, self.cfg.model.vocab_size, i) for i, n in enumerate(LENGTHS)]
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        with torch.inference_mode():
            self.ref = [self.hf(torch.tensor([p])).logits[0].float() for p in self.prompts]

    def kv(self) -> list[torch.Tensor]:
        return allocate_kv_caches(self.cfg.model, NUM_BLOCKS, BLOCK_SIZE, "cpu", self.cfg.model.dtype)


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """Tiny shapes: on a shared, loaded CPU, intra-op threads only spin-wait (30x slower runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def longcat(tmp_path_factory) -> LongcatSetup:
    return LongcatSetup(make_longcat(tmp_path_factory.mktemp("longcat")))


# ---------------------------------------------------------------------------------------------- parity


def test_prefill_matches_transformers(longcat):
    s = longcat
    bias = s.hf.model.layers[0].mlp.router.e_score_correction_bias
    assert bias.abs().max() > 0  # the checkpoint's selection bias reached transformers (and us)
    for p, ref in zip(s.prompts, s.ref, strict=True):
        logits, batch = run(s.model, s.kv(), [(p, 0, BlockPool().take(len(p)))])
        assert_close_logits(logits, ref)
        assert len(batch.expert_counts) == s.model.num_moe_layers == LONGCAT["num_layers"]


def test_chunked_prefill_then_decode_through_paged_cache(longcat):
    s = longcat
    p, ref = s.prompts[2], s.ref[2]  # 33 tokens
    kv = s.kv()
    blocks = BlockPool(seed=1).take(len(p))
    cuts = [0, 12, 21] + list(range(22, len(p) + 1))  # two prefill chunks, then one token per step
    out = [run(s.model, kv, [(p[a:b], a, blocks)])[0] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    assert_close_logits(torch.cat(out), ref)


def test_mixed_batch_matches_transformers(longcat):
    s = longcat
    kv = s.kv()
    pool = BlockPool(seed=2)
    blocks = [pool.take(len(p)) for p in s.prompts]
    cut = [len(p) - 2 for p in s.prompts]
    run(s.model, kv, [(p[:c], 0, b) for p, c, b in zip(s.prompts, cut, blocks, strict=True)])
    # seq 0 decodes one token, seq 1 prefills its last 2 tokens, seq 2 decodes one token
    steps = [(0, 1), (1, 2), (2, 1)]
    seqs = [(s.prompts[i][cut[i] : cut[i] + n], cut[i], blocks[i]) for i, n in steps]
    logits, batch = run(s.model, kv, seqs)
    starts = batch.query_start_loc_host
    for j, (i, n) in enumerate(steps):
        assert_close_logits(logits[starts[j] : starts[j + 1]], s.ref[i][cut[i] : cut[i] + n])


def test_v_head_dim_larger_than_qk_and_attention_bias(tmp_path):
    # v_head_dim 20 > qk_head_dim 12 (the absorbed value is read from the latent, then W_UV gives 20);
    # attention_bias adds biases to q_a / kv_a (whose rotary rows are permuted at load) and o_proj
    path = make_longcat(
        tmp_path / "lc",
        seed=3,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        head_dim=4,
        v_head_dim=20,
        attention_bias=True,
        tie_word_embeddings=True,
    )
    s = LongcatSetup(path)
    assert s.kv()[0].shape[-2:] == (1, 24 + 4)  # one cached row per token: latent + k_rope
    p, ref = s.prompts[2], s.ref[2]
    kv = s.kv()
    blocks = BlockPool().take(len(p))
    out = [run(s.model, kv, [(p[:30], 0, blocks)])[0]]
    out += [run(s.model, kv, [(p[i : i + 1], i, blocks)])[0] for i in range(30, len(p))]
    assert_close_logits(torch.cat(out), ref)


def test_triton_kernels_match_transformers(longcat):
    # Triton attention over the padded 16-dim heads and the variable-k Triton MoE (the interpreter on
    # CPU: TRITON_INTERPRET=1 from conftest), prefill then decode
    cfg = EngineConfig.create(longcat.path, use_triton=True)
    model = load_model(cfg)
    assert model.layers[0].mlp.backend == "triton"
    p = longcat.prompts[0]  # 5 tokens
    kv = allocate_kv_caches(cfg.model, 8, BLOCK_SIZE, "cpu", "float32")
    blocks = BlockPool(num_blocks=8).take(len(p))
    out = [run(model, kv, [(p[:3], 0, blocks)])[0]]
    out += [run(model, kv, [(p[i : i + 1], i, blocks)])[0] for i in (3, 4)]
    assert_close_logits(torch.cat(out), longcat.ref[0])


def test_kv_cache_counts_two_attention_sublayers_per_layer(longcat):
    mc = longcat.cfg.model
    caches = allocate_kv_caches(mc, num_blocks=3, block_size=4, device="cpu", dtype="float32")
    # 2 layers x 2 MLA sublayers; one latent row of kv_lora_rank 24 + k_rope 8 = 32 dims, K and V one memory
    assert len(caches) == 4 == longcat.model.num_attention_layers
    assert all(c.shape == (2, 3, 4, 1, 32) and c.stride(0) == 0 for c in caches)
    assert kv_cache_bytes_per_block(mc, 4, "float32") * 3 == sum(c[0].numel() * 4 for c in caches)


def test_bfloat16_keeps_router_in_float32_and_tracks_float32(longcat, tmp_path):
    cfg = EngineConfig.create(longcat.path, dtype="bfloat16")
    model = load_model(cfg)
    moe = model.layers[0].mlp
    assert moe.gate.weight.dtype == torch.float32 and moe.e_score_correction_bias.dtype == torch.float32
    assert model.layers[0].self_attn[0].q_b_proj.weight.dtype == torch.bfloat16
    p, ref = longcat.prompts[2], longcat.ref[2]
    kv = allocate_kv_caches(cfg.model, NUM_BLOCKS, BLOCK_SIZE, "cpu", "bfloat16")
    logits, _ = run(model, kv, [(p, 0, BlockPool().take(len(p)))])
    assert torch.isfinite(logits).all()
    assert torch.nn.functional.cosine_similarity(logits, ref, dim=-1).min() >= 0.98


# ---------------------------------------------------------------------------------------------- routing


def _hf_router_picks(hf_model, ids: list[int]) -> list[torch.Tensor]:
    """Per MoE layer, transformers' top-k expert indices [T, k] for one forward over `ids`."""
    picks: list[torch.Tensor] = []
    hooks = [
        layer.mlp.router.register_forward_hook(lambda mod, inp, out: picks.append(out[2].clone()))
        for layer in hf_model.model.layers
    ]
    try:
        with torch.inference_mode():
            hf_model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return picks


def test_zero_expert_picks_are_not_dispatched(longcat, monkeypatch):
    s = longcat
    p = s.prompts[2]
    dispatched = []  # (pairs, experts per token) of each fused_moe call
    real = dynserve_kernels.fused_moe

    def counting_fused_moe(x, w13, w2, assignment, backend="torch"):
        assert int(assignment.expert_ids.max()) < N_EXPERTS  # only FFN expert ids reach the kernel
        dispatched.append((assignment.num_pairs, assignment.experts_per_token().clone()))
        return real(x, w13, w2, assignment, backend)

    monkeypatch.setattr(dynserve_kernels, "fused_moe", counting_fused_moe)
    logits, batch = run(s.model, s.kv(), [(p, 0, BlockPool().take(len(p)))])
    assert_close_logits(logits, s.ref[2])
    hf_picks = _hf_router_picks(s.hf, p)
    assert len(dispatched) == len(hf_picks) == s.model.num_moe_layers
    total_ffn = 0
    for (pairs, per_token), picks, counts in zip(dispatched, hf_picks, batch.expert_counts, strict=True):
        ffn_per_token = (picks < N_EXPERTS).sum(dim=-1)  # [T] FFN experts transformers picked
        assert per_token.tolist() == ffn_per_token.tolist() == counts.tolist()
        assert pairs == int(ffn_per_token.sum()) < TOP_K * len(p)  # zero-expert picks cost no pair
        total_ffn += pairs
    # some tokens picked only zero experts or a mix: the per-token count really varies
    all_counts = torch.cat(batch.expert_counts)
    assert all_counts.min() < all_counts.max()
    assert total_ffn < TOP_K * len(p) * s.model.num_moe_layers


def test_greedy_generate_matches_transformers_and_reports_ffn_usage(longcat):
    s = longcat
    prompts = [prompt(n, s.cfg.model.vocab_size, 10 + n) for n in (3, 14, 27)]
    s.hf.generation_config.eos_token_id = None
    s.hf.generation_config.pad_token_id = 0
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = s.hf.generate(
                torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )
            expected.append(out[0, len(p) :].tolist())
    llm = LLM(str(s.path), block_size=4, max_num_batched_tokens=16)  # chunked prefill + paged decode
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy)
    assert [o.outputs[0].token_ids for o in outs] == expected
    for o, p in zip(outs, prompts, strict=True):
        usage = o.expert_usage
        # positions computed: the prompt and every generated token but the last; 2 MoE layers each
        assert usage.num_tokens == len(p) + NEW_TOKENS - 1
        assert 0 < usage.avg_experts_per_token < TOP_K
        assert usage.expert_activations == sum(usage.per_layer)
        assert usage.avg_experts_per_token == pytest.approx(usage.expert_activations / (usage.num_tokens * 2))
    # the checkpoint's routing rule is native: a request's routing policy does not change it
    top_p = RoutingConfig("top_p", p=0.3)
    top_p = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, routing=top_p)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=top_p)
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_routed_experts_report_zero_expert_picks(longcat):
    """Routed experts (for RL replay) carry every pick: zero-computation experts as their router columns
    (ids >= the FFN expert count); the FFN ids alone add up to usage."""
    llm = LLM(str(longcat.path), block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, return_routed_experts=True)
    out = llm.generate(prompt_token_ids=[prompt(12, longcat.cfg.model.vocab_size, 3)], sampling_params=params)[0]
    rows = out.prompt_routed_experts.tolist() + out.outputs[0].routed_experts.tolist()
    assert rows[-1] is None and None not in rows[:-1]
    assert all(len(layer) == TOP_K for row in rows[:-1] for layer in row)  # every pick, zero experts too
    ids = [e for row in rows[:-1] for layer in row for e in layer]
    assert any(e >= N_EXPERTS for e in ids) and max(ids) < N_EXPERTS + N_ZERO
    assert sum(e < N_EXPERTS for e in ids) == out.expert_usage.expert_activations
    # steering reaches the FFN experts of this family too: an excluded expert is never picked
    used = {e for e in ids if e < N_EXPERTS}
    banned = min(used)
    steered = SamplingParams(
        temperature=0.0,
        max_tokens=4,
        ignore_eos=True,
        return_routed_experts=True,
        routing=RoutingConfig(exclude_experts=[banned]),
    )
    out = llm.generate(prompt_token_ids=[prompt(12, longcat.cfg.model.vocab_size, 3)], sampling_params=steered)[0]
    rows = out.prompt_routed_experts.tolist() + out.outputs[0].routed_experts.tolist()
    assert not any(banned in layer for row in rows[:-1] for layer in row)
