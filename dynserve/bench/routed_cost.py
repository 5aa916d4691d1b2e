"""Decode-step cost of routed experts (issue 15), A/B in one process on the same batch.

    python -m dynserve.bench.routed_cost --batch 16 --steps 40

Builds three engines on the same checkpoint (default: the ~100M Mixtral bench checkpoint) with the
same prompts: `plain` and `plain2` (nobody asks for routed experts: what every other request pays,
i.e. the default-on expert-load metrics) and `routed` (every request asks), runs their prefill, then
steps them in turn, one decode step each. Times are the engine thread's CPU time per step (robust to
other processes on a shared machine); prints median and best per variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dynserve.bench.offline import bench_checkpoint, make_prompts


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the ~100M Mixtral bench checkpoint)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dynserve import LLM, SamplingParams

    model_dir = args.model or bench_checkpoint()
    with open(f"{model_dir}/config.json") as f:
        vocab = json.load(f)["vocab_size"]
    prompts = make_prompts(args.batch, vocab, 32, 64)
    engines = {}
    for name in ("plain", "routed", "plain2"):
        sp = SamplingParams(
            temperature=0.0, max_tokens=args.steps + 8, ignore_eos=True, return_routed_experts=name == "routed"
        )
        eng = LLM(str(model_dir), num_kv_blocks=args.batch * 8 + 16, max_num_seqs=args.batch).engine
        for i, p in enumerate(prompts):
            eng.add_request(f"{name}-{i}", None, sp, prompt_token_ids=p)
        done: set[str] = set()
        while len(done) < len(prompts):  # prefill and a first token each
            done.update(o.request_id for o in eng.step())
        engines[name] = eng
    times: dict[str, list[float]] = {n: [] for n in engines}
    for _ in range(args.steps):
        for n, eng in engines.items():
            t0 = time.thread_time()
            eng.step()
            times[n].append(time.thread_time() - t0)
    out = {}
    base = statistics.median(times["plain"])
    for n, ts in times.items():
        med = statistics.median(ts)
        out[n] = {"median_ms": 1000 * med, "best_ms": 1000 * min(ts), "x_plain": med / base}
        best = 1000 * min(ts)
        print(f"{n:7s} batch {args.batch}: median {1000 * med:6.2f} ms  best {best:6.2f} ms  x plain {med / base:.3f}")
    for eng in engines.values():
        eng.close()
    return out


if __name__ == "__main__":
    main()
