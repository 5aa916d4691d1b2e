"""Decode-step time of kernel variants, A/B in one process on the same batch.

    python -m dynserve.bench.decode_step --variants torch cpu-no-hugepages cpu --threads 1
    python -m dynserve.bench.decode_step --variants torch cpu --dtype bfloat16

Builds one engine per variant on the same checkpoint (default: the ~100M Mixtral bench
checkpoint), admits the same prompts to each, runs their prefill, then steps the engines in
turn, one decode step each, so drifts in machine speed hit every variant alike. Prints the median
and best decode-step time per variant, the ratio to the first, and whether every variant decoded
the same greedy tokens.

Variants: `torch` (plain-torch references), `cpu` (native CPU kernels where they apply; the
default on CPU), `cpu-no-hugepages` (the same with weights and KV cache in ordinary 4 KB pages),
`cpu-unfused` (the native kernels called one by one: no fused decode attention or MoE block).
`--dtype` (float32 or bfloat16) applies to every variant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from dynserve.bench.offline import FAMILIES, bench_checkpoint, make_prompts

VARIANTS = {
    "torch": {"DYNSERVE_KERNEL_BACKEND": "torch", "DYNSERVE_HUGEPAGES": "1"},
    "cpu": {"DYNSERVE_KERNEL_BACKEND": "cpu", "DYNSERVE_HUGEPAGES": "1"},
    "cpu-no-hugepages": {"DYNSERVE_KERNEL_BACKEND": "cpu", "DYNSERVE_HUGEPAGES": "0"},
    "cpu-unfused": {"DYNSERVE_KERNEL_BACKEND": "cpu", "DYNSERVE_HUGEPAGES": "1", "DYNSERVE_FUSED_BLOCKS": "0"},
}


@contextlib.contextmanager
def _env(env: dict[str, str]) -> Iterator[None]:
    """`env` set in os.environ for the block (the variant's knobs, read while the model is built),
    the previous values restored after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _build(model_dir: Path, env: dict[str, str], num_kv_blocks: int, max_num_seqs: int, dtype: str = "float32"):  # noqa: ANN202
    from dynserve import LLM

    with _env(env):
        return LLM(str(model_dir), num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs, dtype=dtype).engine


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the ~100M bench checkpoint of --family)")
    ap.add_argument("--family", default="mixtral", choices=sorted(FAMILIES), help="the bench checkpoint's architecture")
    ap.add_argument("--variants", nargs="+", default=["torch", "cpu"], choices=sorted(VARIANTS))
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30, help="timed decode steps per variant")
    ap.add_argument("--min-prompt-len", type=int, default=32)
    ap.add_argument("--max-prompt-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="for every variant")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-roofline", action="store_true", help="skip measuring bandwidth and peak GFLOP/s")
    ap.add_argument(
        "--phase-steps", type=int, default=10, help="steps per variant timed phase by phase after the A/B (0: none)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from dynserve import SamplingParams

    model_dir = Path(args.model) if args.model else bench_checkpoint(family=args.family)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(args.num_prompts, vocab, args.min_prompt_len, args.max_prompt_len)
    new_tokens = args.steps + args.phase_steps + 4
    blocks = sum(-(-(len(p) + new_tokens) // 16) for p in prompts) + 16
    sp = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    engines = {}
    for name in args.variants:
        eng = _build(model_dir, VARIANTS[name], blocks, max(args.num_prompts, 1), args.dtype)
        for i, p in enumerate(prompts):
            eng.add_request(f"{name}-{i}", None, sp, prompt_token_ids=p)
        produced: set[str] = set()
        while len(produced) < len(prompts):  # prefill (chunked by the token budget) and a first token each
            with _env(VARIANTS[name]):
                produced.update(o.request_id for o in eng.step())
        engines[name] = eng
    times: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, dict[str, list[int]]] = {name: {} for name in engines}  # variant -> prompt -> tokens
    experts: dict[str, list[float]] = {name: [] for name in engines}  # avg experts/token per request
    for _ in range(args.steps):
        for name, eng in engines.items():
            with _env(VARIANTS[name]):
                t0 = time.perf_counter()
                outs = eng.step()
                times[name].append(time.perf_counter() - t0)
            for o in outs:
                tokens[name][o.request_id.split("-")[-1]] = list(o.outputs[0].token_ids)
                if o.expert_usage.num_tokens:
                    experts[name].append(o.expert_usage.avg_experts_per_token)
    first = statistics.median(times[args.variants[0]])
    same = all(tokens[name] == tokens[args.variants[0]] for name in engines)
    res: dict = {
        "threads": torch.get_num_threads(),
        "batch": args.num_prompts,
        "dtype": args.dtype,
        "same_tokens": same,
        "variants": {},
    }
    print(
        f"decode step, {args.dtype}, batch {args.num_prompts}, {torch.get_num_threads()} thread(s), "
        f"{args.steps} steps each"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        res["variants"][name] = {"median_ms": 1000 * med, "best_ms": 1000 * min(ts), "x_first": med / first}
        best = 1000 * min(ts)
        print(f"{name:18s} median {1000 * med:7.1f} ms  best {best:7.1f} ms  x {args.variants[0]}: {med / first:.2f}")
    print(f"greedy tokens identical across variants: {same}")
    if not args.no_roofline:
        context = statistics.mean(len(p) for p in prompts) + 2 + args.steps / 2
        res["roofline"] = _roofline(engines, times, experts, args.num_prompts, context)
    if args.phase_steps > 0:
        res["phases"] = {name: _phases(eng, VARIANTS[name], args.phase_steps) for name, eng in engines.items()}
        print("where a step's time goes (ms/step; native kernels timed at their Python entry points):")
        for name, ph in res["phases"].items():
            print(f"{name:18s} " + " | ".join(f"{k} {v:.2f}" for k, v in ph.items()))
    for eng in engines.values():
        eng.close()
    if args.json:
        print(json.dumps(res))
    return res


# the native kernels' Python entry points (kernels/cpu_native.py): time inside them is kernel time
_NATIVE = (
    "moe_block",
    "fused_moe",
    "gemm_nt",
    "attention_block",
    "paged_decode_attention",
    "rms_norm",
    "rope",
    "write_kv",
)


def _phases(eng, env: dict[str, str], steps: int) -> dict[str, float]:  # noqa: ANN001
    """`steps` more decode steps of engine `eng` with timers around its phases: ms per step spent in
    the engine outside the model runner (scheduler, outputs, detokenisation), building the batch, the
    model's forward in native kernels and in Python (norms, routing, module calls, glue), the LM head,
    sampling, and the runner's per-step expert accounting (the rest of `execute`)."""
    from dynserve_kernels import cpu_native

    runner = eng.runner
    acc = dict.fromkeys(("execute", "build", "forward", "logits", "sample", "native_forward", "native"), 0.0)
    state = {"in_forward": False}

    def timed(fn, key: str, on_enter=None):  # noqa: ANN001, ANN202
        def wrapper(*a, **k):  # noqa: ANN002, ANN003, ANN202
            if on_enter is not None:
                on_enter(True)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                acc[key] += dt
                if key == "native" and state["in_forward"]:
                    acc["native_forward"] += dt
                if on_enter is not None:
                    on_enter(False)

        return wrapper

    patched = {"execute": runner.execute, "build_batch": runner.build_batch}
    saved_native = {n: getattr(cpu_native, n) for n in _NATIVE if hasattr(cpu_native, n)}
    saved_run = cpu_native.DecodeLayers.run  # every decode layer in one native call
    model, sampler = runner.model, runner.sampler
    try:
        runner.execute = timed(patched["execute"], "execute")
        runner.build_batch = timed(patched["build_batch"], "build")
        model.forward = timed(model.forward, "forward", lambda on: state.update(in_forward=on))
        model.compute_logits = timed(model.compute_logits, "logits")
        sampler.sample = timed(sampler.sample, "sample")
        for n, fn in saved_native.items():
            setattr(cpu_native, n, timed(fn, "native"))
        cpu_native.DecodeLayers.run = timed(saved_run, "native")
        total = 0.0
        with _env(env):
            for _ in range(steps):
                t0 = time.perf_counter()
                eng.step()
                total += time.perf_counter() - t0
    finally:
        del runner.execute, runner.build_batch, model.forward, model.compute_logits, sampler.sample
        for n, fn in saved_native.items():
            setattr(cpu_native, n, fn)
        cpu_native.DecodeLayers.run = saved_run
    ms = {k: 1000 * v / steps for k, v in acc.items()}
    return {
        "step": 1000 * total / steps,
        "engine": 1000 * total / steps - ms["execute"],
        "batch building": ms["build"],
        "forward kernels": ms["native_forward"],
        "forward Python": ms["forward"] - ms["native_forward"],
        "LM head": ms["logits"],
        "sampling": ms["sample"],
        "expert accounting": ms["execute"] - ms["build"] - ms["forward"] - ms["logits"] - ms["sample"],
    }


def _roofline(engines: dict, times: dict, experts: dict, batch: int, context: float) -> dict:
    """Each variant's median step against the machine's measured read bandwidth and matmul peak."""
    from dynserve.bench.roofline import ModelCost, measure_peak_gflops, measure_read_bandwidth, report

    bw = measure_read_bandwidth()
    out: dict = {"bandwidth_gb_s": bw, "variants": {}}
    print(f"roofline: read bandwidth {bw:.1f} GB/s (1 GiB float32 sum), ", end="")
    peak = None
    for name, eng in engines.items():
        model = eng.runner.model
        if peak is None:  # float32 FMA peak: the bf16 kernels also compute in float32 (no bf16 dot on AVX2)
            peak = measure_peak_gflops(dtype=torch.float32)
            out["peak_gflops"] = peak
            print(f"matmul peak {peak:.1f} GFLOP/s (2048^3 float32)")
        k = statistics.mean(experts[name]) if experts[name] else 0.0
        r = report(ModelCost.of(model), statistics.median(times[name]), batch, k, context, bw, peak)
        out["variants"][name] = r
        print(
            f"{name:18s} {r['weight_mb_per_step']:.1f} MB weights/step (k={k:.2f}): "
            f"{r['achieved_gb_s']:.1f} GB/s = {r['bandwidth_ratio']:.0%} of bandwidth; "
            f"{r['achieved_gflops']:.1f} GFLOP/s = {r['peak_ratio']:.0%} of peak; "
            f"outside weight reads {r['outside_weight_reads_ms']:.1f} ms "
            f"({r['outside_weight_reads_share']:.0%} of the step)"
        )
    return out


if __name__ == "__main__":
    main()
