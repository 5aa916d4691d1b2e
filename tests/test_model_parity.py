"""Model parity: dynserve's paged-KV forward reproduces transformers' logits for every supported family.

References are `AutoModelForCausalLM.from_pretrained(..., attn_implementation="eager")` run one-shot
on the whole prompt; dynserve runs the same prompt as a single prefill, as chunked prefill over a
cached prefix followed by token-by-token decode, and batched with other sequences.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint

from dynserve.config import EngineConfig
from dynserve.model.base import ForwardBatch
from dynserve.model.kv_cache import allocate_kv_caches
from dynserve.model.layers import RotaryEmbedding, apply_rope
from dynserve.model.loader import load_model
from dynserve.model.moe import MoEBlock
from dynserve.routing import Assignment, CheckpointRule

DEEPSEEK_ARCHS = ["deepseek_v3", "deepseek_v3_nolora", "deepseek_v2"]
ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama", "qwen3", "glm4_moe", *DEEPSEEK_ARCHS, "gpt_oss"]
MOE_ARCHS = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", *DEEPSEEK_ARCHS, "gpt_oss"}
# first_k_dense_replace in tests/checkpoints.py's tiny configs
DENSE_FIRST_LAYERS = {"glm4_moe": 1, "deepseek_v3": 1, "deepseek_v3_nolora": 2, "deepseek_v2": 1}
# routers whose weight (and selection bias) stay float32 in a bfloat16 model, as transformers computes them
FP32_ROUTER_ARCHS = {"glm4_moe", *DEEPSEEK_ARCHS}
LENGTHS = (5, 17, 33)
BLOCK_SIZE = 4
NUM_BLOCKS = 64


# ---------------------------------------------------------------------------------------------- helpers


class BlockPool:
    """Hands out blocks in a scrambled order, so sequences use non-consecutive, interleaved blocks."""

    def __init__(self, num_blocks: int = NUM_BLOCKS, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=g).tolist()

    def take(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // BLOCK_SIZE)
        out, self.free = self.free[:n], self.free[n:]
        return out


def make_batch(seqs: list[tuple[list[int], int, list[int]]], block_size: int = BLOCK_SIZE) -> ForwardBatch:
    """seqs: (new token ids, number of tokens already in the cache, block table) per sequence."""
    ids, pos, slots, qsl, lens = [], [], [], [0], []
    for new, cached, blocks in seqs:
        for i, tok in enumerate(new):
            p = cached + i
            ids.append(tok)
            pos.append(p)
            slots.append(blocks[p // block_size] * block_size + p % block_size)
        qsl.append(qsl[-1] + len(new))
        lens.append(cached + len(new))
    width = max(len(b) for _, _, b in seqs)
    table = [b + [0] * (width - len(b)) for _, _, b in seqs]
    T = len(ids)
    return ForwardBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        positions=torch.tensor(pos, dtype=torch.int64),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(qsl, dtype=torch.int64),
        seq_lens=torch.tensor(lens, dtype=torch.int64),
        block_tables=torch.tensor(table, dtype=torch.int64),
        max_query_len=max(len(n) for n, _, _ in seqs),
        max_seq_len=max(lens),
        block_size=block_size,
        logits_indices=torch.arange(T),
        query_start_loc_host=qsl,
        seq_lens_host=lens,
    )


def run(model, kv, seqs) -> tuple[torch.Tensor, ForwardBatch]:
    batch = make_batch(seqs)
    with torch.inference_mode():
        hidden = model(batch, kv)
        logits = model.compute_logits(hidden[batch.logits_indices])
    return logits, batch


def prompt(length: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def assert_close_logits(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == torch.float32
    assert got.shape == ref.shape
    tol = 1e-4 * ref.abs().max().item()
    diff = (got - ref).abs().max().item()
    assert diff <= tol, f"max |diff| {diff:.3g} > {tol:.3g}"


class Setup:
    """A loaded dynserve model for one checkpoint plus transformers' one-shot logits for test prompts."""

    def __init__(self, path: Path, dtype: str = "float32") -> None:
        import transformers

        self.cfg = EngineConfig.create(path, dtype=dtype)
        self.model = load_model(self.cfg)
        vocab = self.cfg.model.vocab_size
        self.prompts = [prompt(n, vocab, i) for i, n in enumerate(LENGTHS)]
        self.ref: list[torch.Tensor] = []
        if dtype != "float32":
            return  # compared against the float32 setup's references
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        with torch.inference_mode():
            self.ref = [ref(torch.tensor([p])).logits[0].float() for p in self.prompts]

    def kv(self) -> list[torch.Tensor]:
        return allocate_kv_caches(self.cfg.model, NUM_BLOCKS, BLOCK_SIZE, "cpu", self.cfg.model.dtype)


_SETUPS: dict[tuple, Setup] = {}


@pytest.fixture
def setup_for(checkpoint_factory):
    def get(arch: str, dtype: str = "float32", **overrides) -> Setup:
        key = (arch, dtype, tuple(sorted(overrides.items())))
        if key not in _SETUPS:
            _SETUPS[key] = Setup(checkpoint_factory(arch, **overrides), dtype)
        return _SETUPS[key]

    return get


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_matches_transformers(arch, setup_for):
    s = setup_for(arch)
    for p, ref in zip(s.prompts, s.ref, strict=True):
        pool = BlockPool()
        logits, batch = run(s.model, s.kv(), [(p, 0, pool.take(len(p)))])
        assert_close_logits(logits, ref)
        if arch in MOE_ARCHS:
            top_k = s.cfg.model.top_k
            assert s.model.num_moe_layers == s.cfg.model.num_layers - DENSE_FIRST_LAYERS.get(arch, 0)
            assert len(batch.expert_counts) == s.model.num_moe_layers
            for counts in batch.expert_counts:
                assert counts.tolist() == [top_k] * len(p)
        else:
            assert s.model.num_moe_layers == 0 and batch.expert_counts == []


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_then_decode_through_paged_cache(arch, setup_for):
    s = setup_for(arch)
    p, ref = s.prompts[2], s.ref[2]  # 33 tokens
    kv = s.kv()
    blocks = BlockPool(seed=1).take(len(p))
    out = []
    # two prefill chunks (the second attends to the first through the cache), then one token per step
    cuts = [0, 12, 21] + list(range(22, len(p) + 1))
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        logits, _ = run(s.model, kv, [(p[a:b], a, blocks)])
        out.append(logits)
    assert_close_logits(torch.cat(out), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_sequences_match_transformers(arch, setup_for):
    s = setup_for(arch)
    kv = s.kv()
    pool = BlockPool(seed=2)
    blocks = [pool.take(len(p)) for p in s.prompts]
    # step 1: all three prompts (minus a tail) prefilled in one batch
    cut = [len(p) - 3 for p in s.prompts]
    logits, batch = run(s.model, kv, [(p[:c], 0, b) for p, c, b in zip(s.prompts, cut, blocks, strict=True)])
    starts = batch.query_start_loc_host
    for i, (ref, c) in enumerate(zip(s.ref, cut, strict=True)):
        assert_close_logits(logits[starts[i] : starts[i + 1]], ref[:c])
    # step 2: a mixed batch: seq 0 decodes one token, seq 1 prefills a 2-token chunk, seq 2 decodes
    steps = [(0, 1), (1, 2), (2, 1)]
    logits, batch = run(s.model, kv, [(s.prompts[i][cut[i] : cut[i] + n], cut[i], blocks[i]) for i, n in steps])
    starts = batch.query_start_loc_host
    for j, (i, n) in enumerate(steps):
        assert_close_logits(logits[starts[j] : starts[j + 1]], s.ref[i][cut[i] : cut[i] + n])
        cut[i] += n
    # step 3: decode-only batch of the three sequences
    logits, _ = run(s.model, kv, [(s.prompts[i][cut[i] : cut[i] + 1], cut[i], blocks[i]) for i in range(3)])
    for i in range(3):
        assert_close_logits(logits[i : i + 1], s.ref[i][cut[i] : cut[i] + 1])


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_loads_and_tracks_float32(arch, setup_for):
    s32 = setup_for(arch)
    s = setup_for(arch, dtype="bfloat16")
    for name, prm in s.model.named_parameters():
        fp32 = arch in FP32_ROUTER_ARCHS and (name.endswith("gate.weight") or "e_score_correction_bias" in name)
        assert prm.dtype == (torch.float32 if fp32 else torch.bfloat16), name
    p, ref = s32.prompts[2], s32.ref[2]
    logits, _ = run(s.model, s.kv(), [(p, 0, BlockPool().take(len(p)))])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    cos = torch.nn.functional.cosine_similarity(logits, ref, dim=-1).min().item()
    assert agree >= 0.8, agree
    assert cos >= 0.98, cos


def test_qwen2_moe_sparse_step_uses_dense_layers(setup_for):
    # decoder_sparse_step=2: layer 0 is a dense MLP of intermediate_size, layer 1 is MoE
    s = setup_for("qwen2_moe", decoder_sparse_step=2)
    assert s.model.num_moe_layers == 1
    p, ref = s.prompts[1], s.ref[1]
    logits, batch = run(s.model, s.kv(), [(p, 0, BlockPool().take(len(p)))])
    assert_close_logits(logits, ref)
    assert len(batch.expert_counts) == 1


def test_qwen3_moe_mlp_only_layers(tmp_path):
    # layer 1 listed in mlp_only_layers: a dense MLP of intermediate_size instead of experts
    s = Setup(make_checkpoint(tmp_path / "q3", "qwen3_moe", mlp_only_layers=[1]))
    assert s.model.num_moe_layers == 1 and not s.model.layers[1].is_moe
    p, ref = s.prompts[0], s.ref[0]
    logits, _ = run(s.model, s.kv(), [(p, 0, BlockPool().take(len(p)))])
    assert_close_logits(logits, ref)


def test_tied_embeddings(setup_for):
    s = setup_for("llama", tie_word_embeddings=True)
    assert s.model.lm_head.weight.data_ptr() == s.model.embed_tokens.weight.data_ptr()
    p, ref = s.prompts[1], s.ref[1]
    logits, _ = run(s.model, s.kv(), [(p, 0, BlockPool().take(len(p)))])
    assert_close_logits(logits, ref)


def test_olmoe_clip_qkv(setup_for):
    s = setup_for("olmoe", clip_qkv=0.3)
    p, ref = s.prompts[2], s.ref[2]
    logits, _ = run(s.model, s.kv(), [(p, 0, BlockPool().take(len(p)))])
    assert_close_logits(logits, ref)


def test_llama3_rope_scaling_new_and_legacy_config(tmp_path):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    path = make_checkpoint(tmp_path / "l3", "llama", rope_parameters=rope)
    s = Setup(path)
    p, ref = s.prompts[2], s.ref[2]
    logits, _ = run(s.model, s.kv(), [(p, 0, BlockPool().take(len(p)))])
    assert_close_logits(logits, ref)
    # the same checkpoint described the transformers-4 way: top-level rope_theta + rope_scaling
    legacy = tmp_path / "legacy"
    shutil.copytree(path, legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    (legacy / "config.json").write_text(json.dumps(cfg))
    model = load_model(EngineConfig.create(legacy))
    logits2, _ = run(model, s.kv(), [(p, 0, BlockPool().take(len(p)))])
    assert_close_logits(logits2, ref)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 500000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128},
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
            "beta_fast": 16,
        },
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_frequencies_match_transformers(rope):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=512, rope_parameters=dict(rope)
    )
    theirs = LlamaRotaryEmbedding(cfg)
    ours = RotaryEmbedding(cfg.to_dict(), head_dim=16)
    pos = torch.tensor([0, 1, 7, 100, 511])
    cos, sin = ours(pos, torch.float32)  # [5, 16]
    ref_cos, ref_sin = theirs(torch.zeros(1), pos[None])  # [1, 5, 16]
    torch.testing.assert_close(cos, ref_cos[0], rtol=0, atol=1e-6)
    x = torch.randn(5, 2, 16)
    rot_half = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)
    expect = x * ref_cos[0][:, None] + rot_half * ref_sin[0][:, None]
    torch.testing.assert_close(apply_rope(x, cos, sin), expect, rtol=0, atol=1e-6)


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="longrope"):
        RotaryEmbedding({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, head_dim=16)


def test_expert_token_counts_recorded_per_moe_layer(setup_for):
    s = setup_for("mixtral")
    p = s.prompts[1]
    batch = make_batch([(p, 0, BlockPool().take(len(p)))])
    batch.expert_token_counts = []
    with torch.inference_mode():
        s.model(batch, s.kv())
    E, k = s.cfg.model.num_experts, s.cfg.model.top_k
    assert len(batch.expert_token_counts) == s.model.num_moe_layers
    for counts in batch.expert_token_counts:
        assert counts.shape == (E,)
        assert int(counts.sum()) == k * len(p)


def test_moe_block_variable_k_and_identity_weight(monkeypatch):
    """Tokens with 0, 1 or 3 experts and an identity (copy) weight: out = sum w * expert(x) + w_id * x."""
    torch.manual_seed(0)
    H, inter, E = 16, 24, 4
    block = MoEBlock(H, inter, CheckpointRule(num_experts=E, top_k=2))
    with torch.no_grad():
        block.w13.normal_(0, 0.2)
        block.w2.normal_(0, 0.2)
    x = torch.randn(3, H)
    mask = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    weights = torch.rand(3, E)
    ident = torch.tensor([0.5, 0.0, 0.25])
    assignment = Assignment.from_mask(mask, weights, identity_weight=ident)
    monkeypatch.setattr("dynserve.model.moe.route", lambda logits, routing, rule, *_, **__: assignment)
    batch = make_batch([([5, 6, 7], 0, [0])])
    out = block(x, batch)
    expect = ident[:, None] * x
    for t in range(3):
        for e in range(E):
            if mask[t, e]:
                gu = block.w13[e] @ x[t]
                h = torch.nn.functional.silu(gu[:inter]) * gu[inter:]
                expect[t] += weights[t, e] * (block.w2[e] @ h)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    assert batch.expert_counts[0].tolist() == [0, 1, 3]


def test_glm4_moe_qk_norm_and_full_rotary(tmp_path):
    # GLM-4.5's optional per-head q/k RMSNorm, with rotary over the whole head this time
    s = Setup(make_checkpoint(tmp_path / "glm", "glm4_moe", use_qk_norm=True, partial_rotary_factor=1.0))
    assert s.model.spec.qk_norm == "head" and s.model.spec.rotary_dim == 16
    p, ref = s.prompts[2], s.ref[2]
    logits, _ = run(s.model, s.kv(), [(p, 0, BlockPool().take(len(p)))])
    assert_close_logits(logits, ref)


def test_partial_rotary_matches_transformers():
    from transformers.models.glm4_moe.modeling_glm4_moe import apply_rotary_pos_emb

    hf = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}
    ours = RotaryEmbedding(hf, head_dim=16, rotary_dim=8)
    pos = torch.tensor([0, 3, 40, 511])
    cos, sin = ours(pos, torch.float32)  # [4, 8]
    q, k = torch.randn(4, 2, 16), torch.randn(4, 1, 16)  # [T, heads, D]
    inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))  # [4]
    freqs = pos.float()[:, None] * inv  # [T, 4]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, 8]
    # transformers' layout: [batch, heads, T, D] with cos/sin [batch, T, R]
    ref_q, ref_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos()[None], emb.sin()[None]
    )
    torch.testing.assert_close(apply_rope(q, cos, sin), ref_q[0].transpose(0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, cos, sin), ref_k[0].transpose(0, 1), rtol=0, atol=1e-6)
    assert torch.equal(apply_rope(q, cos, sin)[..., 8:], q[..., 8:])  # the last half passes through


def test_glm4_moe_engine_greedy_matches_transformers_and_top_p_spends_fewer_experts(checkpoint_factory):
    import transformers

    from dynserve import LLM, RoutingConfig, SamplingParams

    path = checkpoint_factory("glm4_moe")
    new = 6
    prompts = [prompt(n, 384, 20 + n) for n in (4, 13)]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        expected = [
            hf.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]
    llm = LLM(str(path), block_size=4, max_num_batched_tokens=16)  # chunked prefill + paged decode
    greedy = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    sparse = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, routing=RoutingConfig("top_p", p=0.2))
    # one generate call mixes the checkpoint's rule and top_p requests
    outs = llm.generate(prompt_token_ids=prompts * 2, sampling_params=[greedy, greedy, sparse, sparse])
    assert [o.outputs[0].token_ids for o in outs[:2]] == expected
    top_k = 4  # num_experts_per_tok
    for o in outs[:2]:
        assert o.expert_usage.avg_experts_per_token == pytest.approx(top_k)
    for o in outs[2:]:
        assert 1 <= o.expert_usage.avg_experts_per_token < top_k
        assert all(0 < t < 384 for t in o.outputs[0].token_ids)


@pytest.mark.parametrize(
    "arch, override",
    [("deepseek_v2", ("topk_method", "greedy")), ("deepseek_v3", ("rope_interleave", False))],
    ids=["v2-greedy", "v3-rope-not-interleaved"],
)
def test_deepseek_variants_chunked_prefill_then_decode(arch, override, setup_for):
    s = setup_for(arch, **dict([override]))
    p, ref = s.prompts[2], s.ref[2]
    kv = s.kv()
    blocks = BlockPool(seed=3).take(len(p))
    cuts = [0, 20] + list(range(21, len(p) + 1))
    out = [run(s.model, kv, [(p[a:b], a, blocks)])[0] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    assert_close_logits(torch.cat(out), ref)
