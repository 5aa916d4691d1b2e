"""Batch-aware expert selection (`--max-active-experts N`): decode speed and the quality it costs.

    python -m dynserve.bench.active_experts [--n 6 4 2] [--batch 64] [--quality-batches 8 32 64]

Speed: the ~100M Mixtral bench checkpoint (8 experts, top-2), `--batch` sequences decoding
`--new-tokens` greedy tokens, one engine per setting, decode tok/s side by side (best of
`--repeats`). Quality: the demo model's held-out text, cut into B windows that are decoded
teacher-forced in lockstep (each step feeds one token of every window, as a decode step of batch B
does), perplexity of the next tokens under each N, for each B in `--quality-batches`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from dynserve.config import EngineConfig, RoutingConfig, default_model_dir


def decode_tok_s(model_dir: Path, n: int | None, batch: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(decode tok/s, distinct experts per step per MoE layer) of `batch` greedy sequences under
    max_active_experts n (the distinct count includes the prefill step)."""
    from dynserve import LLM, SamplingParams
    from dynserve.bench.offline import make_prompts

    vocab = int(__import__("json").loads((model_dir / "config.json").read_text())["vocab_size"])
    llm = LLM(str(model_dir), max_num_seqs=batch, max_active_experts=n, enable_prefix_caching=False)
    prompts = make_prompts(batch, vocab, 32, 32, seed=3)
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(max_tokens=2))  # warm-up
    best, distinct = 0.0, 0.0
    for _ in range(repeats):
        # prefill alone first, so the timed part is decode
        sp1 = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        t_prefill = time.perf_counter()
        llm.generate(prompt_token_ids=prompts, sampling_params=sp1)
        prefill_s = time.perf_counter() - t_prefill
        sp = SamplingParams(max_tokens=new_tokens + 1, temperature=0, ignore_eos=True)
        before = llm.engine.get_stats().experts_touched_histogram
        t0 = time.perf_counter()
        llm.generate(prompt_token_ids=prompts, sampling_params=sp)
        dt = time.perf_counter() - t0 - prefill_s
        best = max(best, batch * new_tokens / max(dt, 1e-9))
        distinct = mean_distinct(before, llm.engine.get_stats().experts_touched_histogram)
    return best, distinct


def mean_distinct(before: list[list[int]], after: list[list[int]]) -> float:
    """Average distinct experts a step touched per MoE layer between two histogram snapshots."""
    total = steps = 0
    for b, a in zip(before, after, strict=True):
        for j, (x, y) in enumerate(zip(b, a, strict=True)):
            total += j * (y - x)
            steps += y - x
    return total / max(steps, 1)


@torch.inference_mode()
def lockstep_perplexity(config: EngineConfig, ids: list[int], batch: int, window: int) -> tuple[float, float]:
    """(perplexity, distinct experts per step per MoE layer) of `batch` windows of `window` tokens decoded
    teacher-forced in lockstep: step t computes token t of every window, a decode step of `batch`."""
    from dynserve.engine.model_runner import ModelRunner
    from dynserve.engine.sequence import Sequence
    from dynserve.sampling_params import SamplingParams

    bs = config.cache.block_size
    per_seq = -(-window // bs)
    config.cache.num_kv_blocks = per_seq * batch
    runner = ModelRunner(config)
    wins = [ids[i * window : (i + 1) * window] for i in range(batch)]
    seqs = []
    for b, w in enumerate(wins):
        seq = Sequence(f"w{b}", w[:1], SamplingParams(), config.routing)
        seq.block_table = list(range(b * per_seq, (b + 1) * per_seq))
        seqs.append(seq)
    nll, n, distinct, layer_steps = 0.0, 0, 0, 0
    for t in range(window - 1):
        batch_t, rows = runner.build_batch([(s, 1) for s in seqs])
        hidden = runner.model(batch_t, runner.kv_caches)  # [B, H]
        logits = runner.model.compute_logits(hidden[batch_t.logits_indices])  # [B, V]
        target = torch.tensor([w[t + 1] for w in wins], device=logits.device)
        nll += float(torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum"))
        n += len(wins)
        for a in batch_t.assignments:
            distinct += int(torch.unique(a.expert_ids).numel())
            layer_steps += 1
        for s, w in zip(seqs, wins, strict=True):
            s.num_computed_tokens += 1
            s.append_token(w[t + 1])
    return math.exp(nll / max(n, 1)), distinct / max(layer_steps, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[6, 4, 2], help="max active experts settings to compare")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quality-batches", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--window", type=int, default=48, help="tokens per window of the quality run")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args(argv)
    settings: list[int | None] = [None, *args.n]
    if not args.skip_speed:
        from dynserve.bench.offline import bench_checkpoint

        model_dir = bench_checkpoint()
        print(f"decode: {model_dir}, batch {args.batch}, {args.new_tokens} tokens, best of {args.repeats}", flush=True)
        print("| max active experts | decode tok/s | x unconstrained | distinct experts / step / layer |")
        print("|---|---|---|---|")
        base = None
        for n in settings:
            tok_s, distinct = decode_tok_s(model_dir, n, args.batch, args.new_tokens, args.repeats)
            base = base or tok_s
            print(f"| {n or 'off (8)'} | {tok_s:.1f} | {tok_s / base:.2f} | {distinct:.2f} |", flush=True)
    from dynserve.tokenizer import Tokenizer

    demo = default_model_dir()
    tok = Tokenizer.from_dir(demo)
    ids = tok.encode((Path(demo) / "heldout.txt").read_text(errors="replace"), add_special_tokens=False)
    print(f"\nquality: demo model, lockstep teacher-forced decode, windows of {args.window} tokens", flush=True)
    print("| batch | max active experts | perplexity | x unconstrained | distinct experts / step / layer |")
    print("|---|---|---|---|---|")
    for b in args.quality_batches:
        base_ppl = None
        for n in settings:
            cfg = EngineConfig.create(demo, max_active_experts=n, routing=RoutingConfig())
            ppl, distinct = lockstep_perplexity(cfg, ids, b, args.window)
            base_ppl = base_ppl or ppl
            print(f"| {b} | {n or 'off (8)'} | {ppl:.3f} | {ppl / base_ppl:.4f} | {distinct:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
