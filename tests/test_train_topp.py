"""Top-p training (dynserve.bench.train_demo --routing top_p) and serving what it trained.

The training script's MoE forward (Huang et al. 2024's top-p, raw probabilities) and dynserve's
`top_p` policy with renormalize=false must be the same function: a checkpoint carrying that routing
in its routing.json is served with exactly the logits it was trained with.

Also the stochastic expert count (`--k-drop Q`, `KDropRouting`): Q = 0 is plain top-2 training,
Q = 1 is top-1 training (and no gradient to the dropped experts), eval stays top-2, draws are seeded.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from dynserve.bench.train_demo import (
    KDropRouting,
    TopPRouting,
    build_model,
    checkpoint_routing,
    load_balancing_loss,
    load_balancing_loss_masks,
    router_entropy_loss,
    top_p_mask,
)
from dynserve.cli import build_parser, engine_config_from_args
from dynserve.config import EngineConfig, RoutingConfig

P = 0.4


def _topp_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of a tiny checkpoint with the routing.json train_demo writes for a top-p model."""
    shutil.copytree(src, dst)
    args = argparse.Namespace(top_p=P, entropy_coef=0.01, aux_coef=0.02)
    (dst / "routing.json").write_text(json.dumps(checkpoint_routing(args)))
    return dst


def _engine_logits(config: EngineConfig, ids: list[int]) -> tuple[torch.Tensor, float]:
    """dynserve's logits [S, V] for one prompt under the engine's default routing, and the experts per
    token per MoE layer it used."""
    from dynserve.engine.model_runner import ModelRunner
    from dynserve.engine.sequence import Sequence
    from dynserve.sampling_params import SamplingParams

    config.cache.num_kv_blocks = -(-len(ids) // config.cache.block_size)
    runner = ModelRunner(config)
    seq = Sequence("t", ids, SamplingParams(), config.routing)
    seq.block_table = list(range(config.cache.num_kv_blocks))
    batch, _ = runner.build_batch([(seq, len(ids))])
    with torch.inference_mode():
        hidden = runner.model(batch, runner.kv_caches)  # [S, H]
        logits = runner.model.compute_logits(hidden)  # [S, V]
    experts = float(torch.stack(batch.expert_counts).sum()) / (len(ids) * len(batch.expert_counts))
    return logits.float(), experts


def _training_logits(path: Path, ids: list[int], renormalize: bool = False) -> tuple[torch.Tensor, float]:
    """The training script's forward (transformers' Mixtral with TopPRouting patched in)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    routing = TopPRouting(model, P)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # [S, V]
    experts = sum(float(m.sum()) for m in routing.masks) / sum(m.size(0) for m in routing.masks)
    return logits.float(), experts


def _prompt(vocab: int, n: int = 40) -> list[int]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def test_top_p_mask_is_the_papers_rule():
    probs = torch.tensor(
        [
            [0.5, 0.3, 0.1, 0.1],  # top-1 alone reaches 0.4
            [0.1, 0.35, 0.3, 0.25],  # 0.35 < 0.4 -> add 0.3; 0.65 >= 0.4 -> stop
            [0.25, 0.25, 0.25, 0.25],  # 0, .25 < .4; .5 >= .4 -> two
            [0.05, 0.05, 0.1, 0.8],  # the top one is always kept
        ]
    )
    mask = top_p_mask(probs, P)
    assert mask.tolist() == [
        [True, False, False, False],
        [False, True, True, False],
        [True, True, False, False],
        [False, False, False, True],
    ]


def test_training_losses_behave():
    uniform = [torch.full((6, 4), 0.25)]
    peaked = [torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 6)]
    # entropy: ln 4 for uniform routers, near 0 for confident ones
    assert router_entropy_loss(uniform).item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=1e-6)
    assert router_entropy_loss(peaked).item() < 0.2
    # balancing: 1.0 when balanced, larger when every token goes to expert 0
    balanced_mask = [
        torch.eye(4, dtype=torch.bool).repeat(2, 1)[:6] | torch.eye(4, dtype=torch.bool)[[1, 2, 3, 0, 1, 2]]
    ]
    assert load_balancing_loss_masks(uniform, balanced_mask).item() == pytest.approx(1.0, rel=1e-6)
    collapsed = [torch.tensor([[True, False, False, False]] * 6)]
    assert load_balancing_loss_masks(peaked, collapsed).item() > 3.5


def test_served_top_p_logits_equal_the_training_forward(checkpoint_factory, tmp_path):
    src = checkpoint_factory("mixtral", seed=3, num_local_experts=8, num_experts_per_tok=2)
    path = _topp_checkpoint(src, tmp_path / "topp")
    config = EngineConfig.create(path)
    # the checkpoint's routing.json is the engine's default: top_p, p=0.4, raw probabilities
    assert (config.routing.policy, config.routing.p, config.routing.renormalize) == ("top_p", P, False)
    ids = _prompt(config.model.vocab_size)
    served, served_experts = _engine_logits(config, ids)
    trained, trained_experts = _training_logits(path, ids)
    assert served_experts == pytest.approx(trained_experts, abs=1e-9)
    # a meaningful case: neither top-1 nor top-2 everywhere
    assert 1.2 < trained_experts and trained_experts != 2.0
    tol = 1e-4 * trained.abs().max().item()
    assert (served - trained).abs().max().item() <= tol
    # and the weighting matters: renormalised top-p (Mixtral's default rule) gives other logits
    renorm_cfg = EngineConfig.create(path, routing=RoutingConfig(renormalize=True))
    renormed, _ = _engine_logits(renorm_cfg, ids)
    assert (renormed - trained).abs().max().item() > 100 * tol


def test_checkpoint_routing_json_is_the_default(checkpoint_factory, tmp_path):
    src = checkpoint_factory("mixtral")
    plain = EngineConfig.create(src)
    assert plain.routing == RoutingConfig()  # no routing.json: top_k, the checkpoint's rule
    path = _topp_checkpoint(src, tmp_path / "topp")
    parser = build_parser()
    # CLI: no routing flag -> the file's routing
    rc = engine_config_from_args(parser.parse_args(["generate", str(path), "--prompt", "x"])).routing
    assert (rc.policy, rc.p, rc.renormalize) == ("top_p", P, False)
    # a flag overrides that field only; the file's raw weights stay
    rc = engine_config_from_args(
        parser.parse_args(["generate", str(path), "--prompt", "x", "--routing-p", "0.6"])
    ).routing
    assert (rc.policy, rc.p, rc.renormalize) == ("top_p", 0.6, False)
    rc = engine_config_from_args(
        parser.parse_args(["generate", str(path), "--prompt", "x", "--routing", "top_k"])
    ).routing
    assert (rc.policy, rc.renormalize) == ("top_k", False)
    # Python: LLM(routing=...) overlays the same way
    rc = EngineConfig.create(path, routing={"policy": "threshold", "threshold": 0.3}).routing
    assert (rc.policy, rc.threshold, rc.renormalize) == ("threshold", 0.3, False)
    # a broken routing.json is an error naming the file, not a silent fallback
    (path / "routing.json").write_text("{not json")
    with pytest.raises(ValueError, match="routing.json"):
        EngineConfig.create(path)


def test_llm_serves_a_top_p_checkpoint_with_its_routing(checkpoint_factory, tmp_path):
    from dynserve import LLM, SamplingParams

    src = checkpoint_factory("mixtral", seed=3, num_local_experts=8, num_experts_per_tok=2)
    path = _topp_checkpoint(src, tmp_path / "topp")
    params = SamplingParams(max_tokens=4, temperature=0.0)
    out_topp = LLM(str(path), num_kv_blocks=64).generate([_prompt(100, 12)], params)[0]
    out_top2 = LLM(str(src), num_kv_blocks=64).generate([_prompt(100, 12)], params)[0]
    # same weights; the top-p checkpoint spends a varying number of experts per token, not 2
    assert out_top2.expert_usage.avg_experts_per_token == pytest.approx(2.0)
    assert out_topp.expert_usage.avg_experts_per_token != pytest.approx(2.0)


# --- stochastic expert count (train_demo --k-drop Q) ---


def _tiny_demo_model(seed: int = 0):
    """A randomly initialised demo-architecture model (train_demo's build_model), small."""
    args = argparse.Namespace(
        hidden=32, intermediate=48, layers=2, heads=2, kv_heads=1, max_position=64, experts=8, top_k=2,
        aux_coef=0.02, tie=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return build_model(100, args, 0)


def _batch() -> torch.Tensor:
    return torch.randint(1, 100, (2, 24), generator=torch.Generator().manual_seed(5))  # [B, S]


def test_k_drop_zero_is_plain_top2_training():
    plain, patched = _tiny_demo_model(), _tiny_demo_model()
    kdrop = KDropRouting(patched, 0.0, seed=1)
    plain.train(), patched.train()
    ids = _batch()
    ref = plain(input_ids=ids, output_router_logits=True)
    out = patched(input_ids=ids, output_router_logits=True)
    assert torch.equal(out.logits, ref.logits)
    # every token keeps its top-2 and the balancing loss over the selected pairs is the top-2 one
    assert all(int(m.sum(-1).min()) == 2 == int(m.sum(-1).max()) for m in kdrop.masks)
    assert load_balancing_loss_masks(kdrop.probs, kdrop.masks).item() == pytest.approx(
        load_balancing_loss(ref.router_logits, 2).item(), rel=1e-6
    )
    # and the same gradients
    ref.logits.sum().backward()
    out.logits.sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), patched.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name


def test_k_drop_one_trains_top1_and_eval_stays_top2():
    model, top1 = _tiny_demo_model(), _tiny_demo_model()
    kdrop = KDropRouting(model, 1.0, seed=1)
    for block in top1.model.layers:
        block.mlp.gate.top_k = 1  # Mixtral's own top-1: softmax renormalised over one expert = weight 1.0
    model.train(), top1.train()
    ids = _batch()
    logits = model(input_ids=ids).logits
    assert all(int(m.sum(-1).min()) == 1 == int(m.sum(-1).max()) for m in kdrop.masks)
    assert all(torch.equal(m, torch.zeros_like(m).scatter_(1, p.argmax(-1, keepdim=True), True))
               for m, p in zip(kdrop.masks, kdrop.probs, strict=True))  # fmt: skip
    ref = top1(input_ids=ids).logits
    assert torch.allclose(logits, ref, rtol=1e-5, atol=1e-5)
    # and the gradients of top-1 training: the dropped second experts (weight 0) get none
    logits.sum().backward()
    ref.sum().backward()
    for (name, a), (_, b) in zip(model.named_parameters(), top1.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
    # eval mode: the checkpoint's top-2, as served
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert all(int(m.sum(-1).min()) == 2 for m in kdrop.masks)


def test_k_drop_is_stochastic_per_token_and_seeded():
    ids = _batch()
    runs = []
    for _ in range(2):
        model = _tiny_demo_model()
        kdrop = KDropRouting(model, 0.5, seed=3)
        model.train()
        model(input_ids=ids)
        runs.append([m.clone() for m in kdrop.masks])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))  # deterministic given the seed
    counts = torch.cat([m.sum(-1) for m in runs[0]])  # [layers * T]
    assert set(counts.tolist()) == {1, 2}
    assert 0.3 < float((counts == 1).float().mean()) < 0.7
