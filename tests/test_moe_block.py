"""The fused decode MoE block (`cpu_native.moe_block`): router, softmax, per-token routing, experts and
the residual add in one native call, against its op-by-op reference (`moe_ref.moe_block_ref` with the
torch routing policies), and in the engine against the op-by-op path."""

from __future__ import annotations

import dynserve_kernels
import pytest
import torch
from dynserve_kernels import cpu_native
from dynserve_kernels.moe_ref import moe_block_ref

from dynserve.config import RoutingConfig
from dynserve.routing import CheckpointRule, RoutingBatch, route_probs
from dynserve.routing.policies import fused_route_rows

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="native CPU kernels unavailable")

# (T, H, I, E, checkpoint top_k, renormalize): batch 1, odd sizes, more experts than tokens (idle
# experts), a decode batch
SHAPES = [(1, 64, 32, 8, 2, True), (3, 40, 24, 5, 1, False), (17, 48, 20, 6, 2, True), (64, 32, 16, 16, 4, True)]

# per-token routing configs; several per case make a mixed batch (config_index)
POLICIES = {
    "top_k": [RoutingConfig()],
    "top_k1": [RoutingConfig(k=1)],
    "top_p": [RoutingConfig(policy="top_p", p=0.6)],
    "threshold_zero_experts": [RoutingConfig(policy="threshold", threshold=0.3, min_experts=0)],
    "relative": [RoutingConfig(policy="relative", threshold=0.5, max_experts=3)],
    "entropy": [RoutingConfig(policy="entropy", entropy_thresholds=(0.5, 1.2), entropy_k=(1, 2, 3))],
    "mixed": [RoutingConfig(), RoutingConfig(policy="top_p", p=0.3), RoutingConfig(policy="threshold", min_experts=0)],
}


def _problem(T, H, I, E, dtype, seed=0):  # noqa: E741
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(T, H, generator=gen)  # [T, H]
    h = torch.randn(T, H, generator=gen)  # [T, H]
    w_router = torch.randn(E, H, generator=gen) * (2.0 / H**0.5)  # [E, H]: peaked enough to vary the counts
    w13 = torch.randn(E, 2 * I, H, generator=gen) / H**0.5  # [E, 2I, H]
    w2 = torch.randn(E, H, I, generator=gen) / I**0.5  # [E, H, I]
    return [t.to(dtype).contiguous() for t in (y, h, w_router, w13, w2)]


def _routing(configs, T, seed=0):
    if len(configs) == 1:
        return RoutingBatch(list(configs))
    gen = torch.Generator().manual_seed(seed)
    return RoutingBatch(list(configs), torch.randint(0, len(configs), (T,), generator=gen))


def _torch_route(batch, rule):
    return lambda probs: route_probs(probs, batch, rule)  # the torch policies (no native selector)


def _ambiguous_top_k(y, w_router, batch, rule):
    """Whether some top_k token's k-th and (k+1)-th probabilities are within the kernel's margin."""
    probs = torch.softmax(torch.nn.functional.linear(y, w_router).float(), -1)  # [T, E]
    sp = probs.sort(-1, descending=True).values
    for t in range(y.shape[0]):
        c = batch.configs[0 if batch.config_index is None else int(batch.config_index[t])]
        if c.policy != "top_k":
            continue
        k = c.k or rule.top_k
        if k < rule.num_experts and sp[t, k - 1] - sp[t, k] <= 1e-5 * sp[t, k - 1]:
            return True
    return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_moe_block_matches_the_op_by_op_reference(shape, policy, dtype):
    T, H, I, E, k, renorm = shape  # noqa: E741
    y, h, w_router, w13, w2 = _problem(T, H, I, E, dtype, seed=T + E)
    rule = CheckpointRule(num_experts=E, top_k=k, renormalize=renorm)
    batch = _routing(POLICIES[policy], T, seed=T)
    assert cpu_native.takes_moe_block(y, h, w_router, w13, w2)
    rows = fused_route_rows(batch, rule)
    got = cpu_native.moe_block(y, h, w_router, w13, w2, rows, batch.config_index)
    if got is None:  # only where torch.topk's pick is a float32 near-tie
        assert _ambiguous_top_k(y, w_router, batch, rule)
        return
    out_ref, a = moe_block_ref(y, h, w_router, w13, w2, _torch_route(batch, rule))
    # the same experts per token in the same order, weights to float32 rounding
    assert torch.equal(got.offsets, a.token_offsets)
    assert torch.equal(got.expert_ids, a.expert_ids) and torch.equal(got.token_ids, a.token_ids)
    torch.testing.assert_close(got.weights, a.weights, rtol=2e-6, atol=1e-7)
    assert torch.equal(got.token_counts, a.experts_per_token())
    assert torch.equal(got.expert_counts, torch.bincount(a.expert_ids, minlength=E))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.out, out_ref, **tol)
    assert got.out.dtype == dtype
    idle = got.token_counts == 0  # tokens with no expert pass the residual stream through
    assert torch.equal(got.out[idle], h[idle])


def _tied_router(E, H, dtype, gen):
    """A router whose experts 1 and 2 have identical weights: their logits tie for every token."""
    w = torch.randn(E, H, generator=gen) / H**0.5
    w[2] = w[1]
    w[1] += 0.0  # noqa: B018 (same values, separate rows)
    return w.to(dtype)


def test_a_tie_at_the_top_k_boundary_sends_the_layer_op_by_op():
    gen = torch.Generator().manual_seed(3)
    T, H, I, E = 4, 32, 16, 6  # noqa: E741
    y, h, _, w13, w2 = _problem(T, H, I, E, torch.float32)
    w_router = _tied_router(E, H, torch.float32, gen)
    probs = torch.softmax(y @ w_router.T, -1)
    rank = probs.argsort(-1, descending=True)
    # pick k per token so that experts 1 and 2 (tied) straddle the k-th place of token 0
    pos = int((rank[0] == 1).nonzero()) if (rank[0] == 1).nonzero().numel() else 0
    pos = min(pos, int((rank[0] == 2).nonzero()))
    rule = CheckpointRule(num_experts=E, top_k=pos + 1, renormalize=True)
    batch = RoutingBatch([RoutingConfig()])
    assert cpu_native.moe_block(y, h, w_router, w13, w2, fused_route_rows(batch, rule), None) is None
    # the native rules of the other policies break ties by the lower expert id: no fallback
    top_p = RoutingBatch([RoutingConfig(policy="top_p", p=0.99)])
    assert cpu_native.moe_block(y, h, w_router, w13, w2, fused_route_rows(top_p, rule), None) is not None


def test_nan_router_input_falls_back_and_leaves_no_nan_in_other_tokens():
    T, H, I, E = 3, 32, 16, 8  # noqa: E741
    y, h, w_router, w13, w2 = _problem(T, H, I, E, torch.float32)
    y[1, 0] = float("nan")  # token 1's logits are NaN: its probabilities become 0 (all tied)
    rule = CheckpointRule(num_experts=E, top_k=2, renormalize=True)
    topk = RoutingBatch([RoutingConfig()])
    assert cpu_native.moe_block(y, h, w_router, w13, w2, fused_route_rows(topk, rule), None) is None
    thr = RoutingBatch([RoutingConfig(policy="threshold", threshold=0.2, min_experts=0)])
    got = cpu_native.moe_block(y, h, w_router, w13, w2, fused_route_rows(thr, rule), None)
    assert got is not None and int(got.token_counts[1]) == 0  # no expert passes a 0 probability
    assert torch.isfinite(got.out[[0, 2]]).all()


def test_what_the_fused_block_does_not_take():
    y, h, w_router, w13, w2 = _problem(2, 32, 16, 4, torch.float32)
    assert cpu_native.takes_moe_block(y, h, w_router, w13, w2)
    assert not cpu_native.takes_moe_block(y.half(), h.half(), w_router.half(), w13.half(), w2.half())
    assert not cpu_native.takes_moe_block(y, h, w_router.bfloat16(), w13, w2)  # mixed dtypes
    assert not cpu_native.takes_moe_block(y, h[:, :16], w_router, w13, w2)
    big = torch.randn(cpu_native.NATIVE_MOE_MAX_ROWS + 1, 32)
    assert not cpu_native.takes_moe_block(big, big, w_router, w13, w2)  # float32 prefill: torch + MKL
    assert cpu_native.takes_moe_block(big.bfloat16(), big.bfloat16(), *(t.bfloat16() for t in (w_router, w13, w2)))
    rule = CheckpointRule(num_experts=4, top_k=2)
    rows = fused_route_rows(RoutingBatch([RoutingConfig()]), rule)
    assert dynserve_kernels.moe_block(y, h, w_router, w13, w2, rows, None, "torch") is None
    # routing the fused kernel does not follow: group-limited / sigmoid rules, steering, batch-aware limits
    assert fused_route_rows(RoutingBatch([RoutingConfig()]), CheckpointRule(num_experts=4, top_k=2, n_group=2)) is None
    assert fused_route_rows(RoutingBatch([RoutingConfig(exclude_experts=(1,))]), rule) is None
    assert fused_route_rows(RoutingBatch([RoutingConfig()], max_active_experts=2), rule) is None
    with pytest.raises(ValueError, match="config_index"):
        cpu_native.moe_block(y, h, w_router, w13, w2, rows, torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_decodes_and_accounts_the_same_with_the_fused_moe_block(dtype, checkpoint_factory, monkeypatch):
    from dynserve import LLM, SamplingParams
    from dynserve.model import moe
    from dynserve.model.decoder import DecoderForCausalLM

    path = checkpoint_factory("mixtral")
    calls = []
    real = cpu_native.moe_block
    monkeypatch.setattr(cpu_native, "moe_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(DecoderForCausalLM, "native_decode", False)  # the blocks layer by layer
    common = dict(temperature=0.0, max_tokens=12, ignore_eos=True, return_routed_experts=True)
    greedy = SamplingParams(**common)
    top_p = SamplingParams(**common, routing=RoutingConfig(policy="top_p", p=0.5))
    prompts = [{"prompt_token_ids": [1 + i, 5, 9, 2 + 3 * i, 7][: 2 + i]} for i in range(4)]
    params = [greedy, top_p, greedy, top_p]  # a mixed decode batch

    def run():
        outs = LLM(str(path), dtype=dtype).generate(prompts, params)
        # tokens, per-layer expert activations, and which experts each generated token used
        rows = []
        for o in outs:
            r = o.outputs[0].routed_experts
            rows.append((o.outputs[0].token_ids, o.expert_usage.per_layer, r.counts.tolist(), r.ids.tolist()))
        return rows

    fused = run()
    assert calls  # the decode steps went through the fused block
    monkeypatch.setattr(moe.MoEBlock, "forward_block", lambda *a, **k: None)
    plain = run()
    assert fused == plain


def test_fused_blocks_switch_is_read_when_the_model_is_built(checkpoint_factory, monkeypatch):
    """DYNSERVE_FUSED_BLOCKS=0 (the decode benchmark's `cpu-unfused` A/B variant): an engine built
    with it runs every decode block op by op, and decodes the same tokens."""
    from dynserve import LLM, SamplingParams

    path = checkpoint_factory("mixtral")
    calls = []
    for name in ("moe_block", "attention_block"):
        real = getattr(cpu_native, name)
        monkeypatch.setattr(cpu_native, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    real_run = cpu_native.DecodeLayers.run
    monkeypatch.setattr(
        cpu_native.DecodeLayers, "run", lambda *a, **k: calls.append("decode_layers") or real_run(*a, **k)
    )
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": [3, 1, 4, 1, 5]}, {"prompt_token_ids": [9, 2, 6]}]
    monkeypatch.setenv("DYNSERVE_FUSED_BLOCKS", "0")
    unfused = LLM(str(path))
    monkeypatch.delenv("DYNSERVE_FUSED_BLOCKS")
    plain = [o.outputs[0].token_ids for o in unfused.generate(prompts, sp)]
    assert calls == []
    fused = [o.outputs[0].token_ids for o in LLM(str(path)).generate(prompts, sp)]
    # every decode step's layers in one native call (prefill steps' MoE blocks: `moe_block`)
    assert "decode_layers" in calls and "attention_block" not in calls
    assert fused == plain


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_decode_layers_equal_the_blocks_layer_by_layer(dtype, checkpoint_factory, monkeypatch):
    """The whole decode step's layers in one native call (`cpu_native.DecodeLayers`) against the same
    fused blocks called layer by layer: the same tokens, expert usage and routed experts, for a mixed
    batch; with one layer whose router ties every expert (every step's top_k pick there is torch's:
    the native call stops before that layer's MoE, which runs op by op, and resumes after it)."""
    from dynserve import LLM, SamplingParams
    from dynserve.model.decoder import DecoderForCausalLM

    path = checkpoint_factory("mixtral")
    runs = []
    real_run = cpu_native.DecodeLayers.run
    monkeypatch.setattr(
        cpu_native.DecodeLayers,
        "run",
        lambda *a, **k: runs.append(a[-1] if len(a) > 8 else k.get("start", 0)) or real_run(*a, **k),
    )
    common = dict(temperature=0.0, max_tokens=10, ignore_eos=True, return_routed_experts=True)
    params = [SamplingParams(**common), SamplingParams(**common, routing=RoutingConfig(policy="top_p", p=0.5))] * 2
    prompts = [{"prompt_token_ids": [2 + i, 7, 1, 8, 2, 8][: 3 + i]} for i in range(4)]

    def run(tie_layer=None):
        llm = LLM(str(path), dtype=dtype)
        if tie_layer is not None:
            gate = llm.engine.runner.model.layers[tie_layer].mlp.gate.weight
            gate.copy_(gate[:1].expand_as(gate))  # every expert the same logit: all tied
        outs = llm.generate(prompts, params)
        return [(o.outputs[0].token_ids, o.expert_usage.per_layer, o.outputs[0].routed_experts.counts.tolist(),
                 o.outputs[0].routed_experts.ids.tolist()) for o in outs]  # fmt: skip

    for tie_layer in (None, 0):
        runs.clear()
        native = run(tie_layer)
        assert runs and (tie_layer is None or max(runs) == tie_layer + 1)  # resumed after the tied layer
        monkeypatch.setattr(DecoderForCausalLM, "native_decode", False)
        runs.clear()
        layered = run(tie_layer)
        assert not runs
        monkeypatch.setattr(DecoderForCausalLM, "native_decode", True)
        assert native == layered
