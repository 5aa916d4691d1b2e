"""Expert-parallel benchmark: the same offline workload on 1, 2, 3... ranks on one machine.

Per engine step it prints (from rank 0) the bytes rank 0 exchanged (sent + received: pair counts,
dispatched hidden rows and expert ids, returned results, gathered token slices), the seconds spent in
the exchange and in the local experts, and the whole step time; plus the pairs each rank computed.

    python -m dynserve.bench.expert_parallel                  # random tiny Mixtral, ranks 1 2 3
    python -m dynserve.bench.expert_parallel MODEL_DIR --ranks 1 2 4 --prompts 16 --prompt-len 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dynserve.model.experts import LocalExperts


def make_random_mixtral(path: Path, hidden: int = 256, experts: int = 8, layers: int = 2, seed: int = 0) -> Path:
    """A random-weight Mixtral checkpoint (no tokenizer: the benchmark sends token ids)."""
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


class _TimedLocalExperts(LocalExperts):
    """1-rank executor that times `fused_moe` (no exchange), to compare with ExpertParallelExperts."""

    def __init__(self) -> None:
        self.experts_s = 0.0

    def __call__(self, x, w13, w2, a, backend="torch", **expert_options):  # noqa: ANN001, ANN003, ANN204 - ExpertExecutor signature
        t0 = time.perf_counter()
        out = super().__call__(x, w13, w2, a, backend, **expert_options)  # [T, H]
        self.experts_s += time.perf_counter() - t0
        return out


def run(model_dir: str, ranks: int, prompts: list[list[int]], max_tokens: int, routing: str) -> dict:
    from dynserve import LLM, SamplingParams
    from dynserve.model.experts import use_experts

    llm = LLM(model_dir, num_kv_blocks=256, expert_parallel_size=ranks, routing={"policy": routing})
    try:
        rt = llm.engine.runner.expert_parallel
        local = None
        if rt is None:
            local = _TimedLocalExperts()
            use_experts(llm.engine.runner.model, local)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        llm.generate(prompt_token_ids=prompts[:1], sampling_params=SamplingParams(max_tokens=2))  # warm-up
        if rt is not None:
            rt.experts.stats.reset()
            rt.experts.profile_cuda = True  # synchronize around the expert GEMMs so their time is real
        steps0 = llm.get_stats().num_steps
        t0 = time.perf_counter()
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        wall = time.perf_counter() - t0
        stats = llm.get_stats()
        steps = stats.num_steps - steps0
        tokens = [o.outputs[0].token_ids for o in outs]
        if rt is not None:
            st = rt.experts.stats
            ex_bytes, ex_s, experts_s = st.bytes_sent + st.bytes_received, st.exchange_s, st.experts_s
        else:
            ex_bytes, ex_s, experts_s = 0, 0.0, local.experts_s if local else 0.0
        return {
            "ranks": ranks,
            "steps": steps,
            "step_ms": 1e3 * wall / steps,
            "exchange_bytes_per_step": ex_bytes / steps,
            "exchange_ms_per_step": 1e3 * ex_s / steps,
            "experts_ms_per_step": 1e3 * experts_s / steps,
            "pairs_per_rank": stats.expert_parallel_pairs_per_rank,
            "tokens": tokens,
        }
    finally:
        llm.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=None, help="MoE checkpoint (default: a random tiny Mixtral)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--routing", default="top_p", choices=["top_k", "top_p", "threshold"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(make_random_mixtral(Path(tmp) / "mixtral"))
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(2, 500, (args.prompts, args.prompt_len), generator=g).tolist()
        results = [run(model_dir, n, prompts, args.max_tokens, args.routing) for n in args.ranks]
    same = all(r["tokens"] == results[0]["tokens"] for r in results)
    for r in results:
        r.pop("tokens")
        if args.json:
            print(json.dumps(r))
        else:
            print(
                f"ranks={r['ranks']} steps={r['steps']} step={r['step_ms']:.2f}ms "
                f"exchange={r['exchange_bytes_per_step'] / 1024:.1f}KiB/step {r['exchange_ms_per_step']:.2f}ms/step "
                f"experts={r['experts_ms_per_step']:.2f}ms/step pairs_per_rank={r['pairs_per_rank']}"
            )
    print(f"greedy tokens identical across rank counts: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
