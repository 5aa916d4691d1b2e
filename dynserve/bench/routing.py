"""Fewer experts must cost less: MoE-layer time and decode tokens/s, the checkpoint's top-k vs top-p,
relative and entropy routing, in one run.

    python -m dynserve.bench.routing                       # ~100M Mixtral bench checkpoint
    python -m dynserve.bench.routing --model DIR --p 0.3 0.5 0.7 --relative 0.5 0.3 --entropy-scale 1 2
    python -m dynserve.bench.routing --family deepseek_v3 --p 0.2 0.4 0.6 0.8

For each routing setting the same prompts run through the engine (prefix caching off, so every
setting computes every token):
  - prefill: N prompts x L tokens in large steps; MoE-layer time is summed over every MoE block
    (router + routing + dispatch + combine), measured with forward hooks;
  - decode: B sequences generate M tokens; decode tokens/s and MoE time per decode step.
Each row shows the measured average FFN experts per token per MoE layer, its ratio to the
checkpoint's top-k, the MoE-time ratio to top-k (MoE time includes the router and any shared
expert, which do not shrink with k), and cost/experts = (time ratio) / (experts ratio): the target is
<= 1.15 (fewer experts cost proportionally less).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dynserve import LLM, RoutingConfig, SamplingParams
from dynserve.bench.offline import FAMILIES, bench_checkpoint, make_prompts


class MoETimer:
    """Sums wall time spent inside every MoE block of a model (forward hooks, and the fused decode
    block `MoEBlock.forward_block`, which runs outside the module call)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from dynserve.model.moe import MoEBlock

        self.total = 0.0
        self._t0 = 0.0
        self._cuda = next(model.parameters()).is_cuda
        if hasattr(model, "native_decode"):  # one native call for all layers would hide the MoE blocks' time
            model.native_decode = False
        for m in model.modules():
            if isinstance(m, MoEBlock):
                m.register_forward_pre_hook(self._pre)
                m.register_forward_hook(self._post)
                m.forward_block = self._timed(m.forward_block)

    def _timed(self, fn):  # noqa: ANN001, ANN202
        def wrapper(*a, **k):  # noqa: ANN002, ANN003, ANN202
            self._pre()
            try:
                return fn(*a, **k)
            finally:
                self._post()

        return wrapper

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def _pre(self, *_: object) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, *_: object) -> None:
        self._sync()
        self.total += time.perf_counter() - self._t0


def run_setting(llm: LLM, timer: MoETimer, rc: RoutingConfig, prefill_prompts, decode_prompts, new_tokens: int) -> dict:
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, routing=rc)
    # prefill: only the prompt steps run (max_tokens=1 samples from the last prefill step)
    timer.total = 0.0
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prefill_prompts, sampling_params=one)
    prefill_wall = time.perf_counter() - t0
    prefill_moe = timer.total
    prefill_tokens = sum(len(p) for p in prefill_prompts)
    experts = sum(o.expert_usage.expert_activations for o in outs) / max(
        1, sum(o.expert_usage.num_tokens * len(o.expert_usage.per_layer) for o in outs)
    )
    # decode: prefill the decode prompts first (untimed), then time the decode steps alone
    eng = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, routing=rc)
    for i, p in enumerate(decode_prompts):
        eng.add_request(f"dec-{id(rc)}-{i}", None, sp, prompt_token_ids=p)
    while any(s.num_output_tokens == 0 for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    timer.total = 0.0
    steps = 0
    gen0 = eng.get_stats().generation_tokens
    t0 = time.perf_counter()
    dec_usage = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                dec_usage.append(o.expert_usage)
        steps += 1
    decode_wall = time.perf_counter() - t0
    gen = eng.get_stats().generation_tokens - gen0
    return {
        "avg_experts_per_token": experts,
        "prefill_tokens": prefill_tokens,
        "prefill_moe_s": prefill_moe,
        "prefill_wall_s": prefill_wall,
        "decode_tokens": gen,
        "decode_tok_s": gen / decode_wall,
        "decode_moe_ms_per_step": 1e3 * timer.total / max(steps, 1),
        "decode_avg_experts_per_token": sum(u.expert_activations for u in dec_usage)
        / max(1, sum(u.num_tokens * len(u.per_layer) for u in dec_usage)),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the ~100M bench checkpoint of --family)")
    ap.add_argument("--family", default="mixtral", choices=sorted(FAMILIES), help="the bench checkpoint's architecture")
    ap.add_argument("--p", type=float, nargs="+", default=[0.15, 0.25, 0.35, 0.5])
    ap.add_argument(
        "--relative", type=float, nargs="*", default=[], help="relative thresholds (x the token's top probability)"
    )
    ap.add_argument(
        "--entropy-scale",
        type=float,
        nargs="*",
        default=[],
        help="entropy routing with thresholds s x (0.6, 1.2), k = 1, 2, 4 (larger s: fewer experts)",
    )
    ap.add_argument("--prefill-prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="runs per setting; the fastest is kept (less noise)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else bench_checkpoint(family=args.family)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    llm = LLM(
        str(model_dir),
        enable_prefix_caching=False,
        max_num_seqs=max(args.prefill_prompts, args.decode_batch),
        max_num_batched_tokens=args.prefill_prompts * args.prompt_len,
    )
    timer = MoETimer(llm.engine.runner.model)
    prefill = make_prompts(args.prefill_prompts, vocab, args.prompt_len, args.prompt_len, seed=1)
    decode = make_prompts(args.decode_batch, vocab, 16, 16, seed=2)
    top_k = llm.engine.model_config.top_k
    settings = [(f"top_k (k={top_k}, checkpoint)", RoutingConfig())] + [
        (f"top_p p={p}", RoutingConfig(policy="top_p", p=p)) for p in args.p
    ]
    settings += [(f"relative t={t}", RoutingConfig(policy="relative", threshold=t)) for t in args.relative]
    for scale in args.entropy_scale:
        h = (round(0.6 * scale, 4), round(1.2 * scale, 4))
        settings.append(
            (
                f"entropy H<{h[0]}:1 <{h[1]}:2 else 4",
                RoutingConfig(policy="entropy", entropy_thresholds=h, entropy_k=(1, 2, 4)),
            )
        )
    run_setting(llm, timer, settings[0][1], prefill[:2], decode[:1], 4)  # warm-up
    rows = []
    for name, rc in settings:
        runs = [run_setting(llm, timer, rc, prefill, decode, args.new_tokens) for _ in range(max(1, args.repeats))]
        r = dict(runs[0])
        r["prefill_moe_s"] = min(x["prefill_moe_s"] for x in runs)
        r["decode_moe_ms_per_step"] = min(x["decode_moe_ms_per_step"] for x in runs)
        r["decode_tok_s"] = max(x["decode_tok_s"] for x in runs)
        r["setting"] = name
        rows.append(r)
    base = rows[0]
    print(
        f"model {model_dir}  threads={torch.get_num_threads()}  prefill {base['prefill_tokens']} tokens/setting, "
        f"decode batch {args.decode_batch} x {args.new_tokens} tokens"
    )
    print(
        "| setting | experts/token | x top-k | prefill MoE ms | x top-k | cost/experts | decode tok/s | "
        "decode MoE ms/step | x top-k |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        e_ratio = r["avg_experts_per_token"] / base["avg_experts_per_token"]
        t_ratio = r["prefill_moe_s"] / base["prefill_moe_s"]
        d_ratio = r["decode_moe_ms_per_step"] / base["decode_moe_ms_per_step"]
        r.update(
            experts_ratio=e_ratio,
            prefill_moe_ratio=t_ratio,
            cost_per_expert_ratio=t_ratio / e_ratio,
            decode_moe_ratio=d_ratio,
        )
        print(
            f"| {r['setting']} | {r['avg_experts_per_token']:.2f} | {e_ratio:.2f} | {1e3 * r['prefill_moe_s']:.0f} | "
            f"{t_ratio:.2f} | {t_ratio / e_ratio:.2f} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_moe_ms_per_step']:.1f} | {d_ratio:.2f} |"
        )
    if args.json:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
