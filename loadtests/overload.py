"""Overload: the same Poisson load at ~1.5x what the server sustains, against static routing and against
the load-adaptive expert budget (`--expert-budget auto`), one server after the other.

    python -m loadtests.overload [--model DIR] [--overload 1.5] [--duration 60] [--out-dir overload]
    python -m loadtests.overload --model /tmp/dynserve-bench/mixtral-100m --prompt-format token-ids

Steps, per mode (static, then auto), each on a fresh server with the same flags otherwise:
  1. unloaded: `--probe-requests` requests one at a time (the unloaded TTFT);
  2. capacity (static only): a closed loop of `--max-num-seqs` clients; its request throughput is
     what the server sustains, R;
  3. overload: Poisson arrivals at `--overload` x R for `--duration` seconds (the same seed, so the
     same prompts and arrival times in both modes), while a sampler reads /metrics every 0.5 s
     (waiting requests, the expert budget b).
Prints throughput, p50/p99 TTFT and ITL, average experts per token and the largest queue per mode,
and writes results.json and a plot of waiting requests and b over time (PNG, with matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from loadtests.loadgen import LoadConfig, run_load
from loadtests.server import ServerProcess, dynserve_command, free_port, scrape


async def sample_metrics(base_url: str, stop: asyncio.Event, period: float = 0.5) -> list[dict[str, float]]:
    """/metrics every `period` seconds until `stop`: [{"t", waiting, running, budget}]."""
    samples: list[dict[str, float]] = []
    t0 = time.perf_counter()
    while not stop.is_set():
        try:
            m = await asyncio.to_thread(scrape, base_url)
            samples.append(
                {
                    "t": time.perf_counter() - t0,
                    "waiting": m.get("dynserve_num_requests_waiting", 0.0),
                    "running": m.get("dynserve_num_requests_running", 0.0),
                    "budget": m.get("dynserve_expert_budget", 1.0),
                }
            )
        except httpx.HTTPError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), period)
        except TimeoutError:
            pass
    return samples


async def overload_run(cfg: LoadConfig) -> tuple[dict[str, Any], list[dict[str, float]]]:
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_metrics(cfg.base_url, stop))
    try:
        summary = await run_load(cfg)
    finally:
        stop.set()
    return summary, await sampler


def run_mode(args: argparse.Namespace, mode: str, capacity: float | None) -> dict[str, Any]:
    port = free_port()
    extra = ["--max-num-seqs", str(args.max_num_seqs), "--dtype", args.dtype]
    if mode == "auto":
        extra += ["--expert-budget", "auto", "--expert-budget-floor", str(args.floor)]
    log = Path(args.out_dir) / f"server-{mode}.log"
    with ServerProcess(dynserve_command(args.model, port, extra), port, log) as server:
        base = LoadConfig(
            base_url=server.base_url,
            input_len=args.input_len,
            output_len=args.output_len,
            seed=args.seed,
            prompt_format=args.prompt_format,
            token_id_range=(100, 1000),
            max_duration=args.duration * 3,
            warmup_requests=2,
        )
        print(f"[{mode}] unloaded: {args.probe_requests} requests one at a time", flush=True)
        unloaded = asyncio.run(run_load(replace(base, num_requests=args.probe_requests, concurrency=1)))
        if capacity is None:
            print(f"[{mode}] capacity: closed loop of {args.max_num_seqs} clients", flush=True)
            closed = replace(
                base, num_requests=args.max_num_seqs * 4, concurrency=args.max_num_seqs, seed=args.seed + 1
            )
            capacity = asyncio.run(run_load(closed))["request_throughput"]
        rate = args.overload * capacity
        n = max(1, int(rate * args.duration))
        print(
            f"[{mode}] overload: {n} requests, Poisson at {rate:.2f} req/s ({args.overload}x {capacity:.2f})",
            flush=True,
        )
        cfg = replace(base, num_requests=n, request_rate=rate, seed=args.seed + 2, warmup_requests=0)
        summary, samples = asyncio.run(overload_run(cfg))
    return {
        "mode": mode,
        "capacity": capacity,
        "rate": rate,
        "unloaded": unloaded,
        "overload": summary,
        "samples": samples,
    }


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| mode | req/s | output tok/s | TTFT p50 / p99 ms (unloaded p99) | ITL p50 / p99 ms | experts/token | "
        "max waiting | min b |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, u = r["overload"], r["unloaded"]
        waits = [x["waiting"] for x in r["samples"]] or [0.0]
        b = min((x["budget"] for x in r["samples"]), default=1.0)
        lines.append(
            f"| {r['mode']} | {s['request_throughput']:.2f} | {s['output_throughput']:.1f} | "
            f"{s['median_ttft_ms']:.0f} / {s['p99_ttft_ms']:.0f} ({u['p99_ttft_ms']:.0f}) | "
            f"{s['median_itl_ms']:.0f} / {s['p99_itl_ms']:.0f} | {s['avg_experts_per_token'] or 0:.2f} | "
            f"{max(waits):.0f} | {b:.2f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax2 = ax.twinx()
    for r in results:
        t = [x["t"] for x in r["samples"]]
        ax.plot(t, [x["waiting"] for x in r["samples"]], label=f"waiting ({r['mode']})")
        if r["mode"] == "auto":
            ax2.plot(t, [x["budget"] for x in r["samples"]], "k--", label="expert budget b (auto)")
    ax.set_xlabel("seconds into the overload run")
    ax.set_ylabel("waiting requests")
    ax2.set_ylabel("expert budget b")
    ax2.set_ylim(0, 1.05)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="upper left")
    ax.set_title("Overload: static routing vs load-adaptive expert budget")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint dir (default: the demo model)")
    p.add_argument("--overload", type=float, default=1.5, help="arrival rate as a multiple of the capacity")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of overload arrivals per mode")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--floor", type=float, default=0.5, help="--expert-budget-floor of the auto server")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--probe-requests", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-format", default="text", choices=["text", "token-ids"], help="token-ids: no tokenizer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="overload")
    args = p.parse_args(argv)
    if not (args.overload > 0 and math.isfinite(args.duration) and args.duration > 0):
        p.error("--overload and --duration must be positive")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    static = run_mode(args, "static", None)
    auto = run_mode(args, "auto", static["capacity"])
    results = [static, auto]
    print(table(results))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    png = plot(results, out / "overload.png")
    print(f"wrote {out / 'results.json'}" + (f" and {png}" if png else " (no plot: pip install matplotlib)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
