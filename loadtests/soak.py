"""Soak: mixed streaming / non-streaming load with random client disconnects for a fixed time,
then checks that the server came back to rest and did not grow.

    # against a server this script starts (so it can watch the server's memory)
    python -m loadtests.soak --launch-model /path/to/checkpoint --duration 300 --concurrency 8
    # against a running server (memory checked only with --server-pid)
    python -m loadtests.soak --base-url http://127.0.0.1:8000 --server-pid 12345 --duration 300

Checks, after the load stops and the server has had --settle-timeout seconds to drain:
  - running requests == 0 and waiting requests == 0 (dynserve_* or vllm:* gauges),
  - the KV pool is full again: usage 0 and, on dynserve, free blocks == total blocks,
  - the server's resident memory grew by at most --max-rss-growth-mb since the end of warm-up.
Exit code 0 when every check passes, 1 otherwise; --result-file gets the full JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from loadtests.loadgen import (
    LoadConfig,
    add_load_args,
    build_requests,
    check_target,
    config_from_args,
    run_load,
    write_result,
)
from loadtests.server import ServerProcess, dynserve_command, free_port, rss_bytes, scrape

MiB = 1024 * 1024


@dataclass
class SoakConfig:
    """A soak run: the load (its num_requests is only an upper bound), how long, and the limits."""

    load: LoadConfig
    duration: float = 60.0
    settle_timeout: float = 30.0
    max_rss_growth_mb: float = 256.0
    warmup_requests: int = 8
    server_pid: int | None = None
    sample_interval: float = 1.0


def _gauge(m: dict[str, float], *names: str) -> float | None:
    for n in names:
        if n in m:
            return m[n]
    return None


def rest_state(metrics: dict[str, float]) -> dict[str, Any]:
    """Running/waiting requests and KV pool state from a /metrics scrape (dynserve or vLLM names)."""
    return {
        "running": _gauge(metrics, "dynserve_num_requests_running", "vllm:num_requests_running"),
        "waiting": _gauge(metrics, "dynserve_num_requests_waiting", "vllm:num_requests_waiting"),
        "kv_usage": _gauge(
            metrics, "dynserve_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"
        ),
        "kv_blocks": metrics.get("dynserve_kv_cache_blocks"),
        "kv_free_blocks": metrics.get("dynserve_kv_cache_free_blocks"),
    }


def at_rest(state: dict[str, Any]) -> bool:
    if state["running"] != 0 or state["waiting"] != 0 or state["kv_usage"] != 0:
        return False
    if state["kv_blocks"] is not None and state["kv_free_blocks"] != state["kv_blocks"]:
        return False
    return True


async def _wait_rest(base_url: str, api_key: str | None, timeout: float) -> tuple[dict[str, Any], float]:
    t0 = time.monotonic()
    while True:
        state = rest_state(await asyncio.to_thread(scrape, base_url, api_key))
        if at_rest(state) or time.monotonic() - t0 > timeout:
            return state, time.monotonic() - t0
        await asyncio.sleep(0.2)


async def _sample_rss(pid: int, interval: float, out: list[tuple[float, int]], stop: asyncio.Event) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        out.append((round(time.monotonic() - t0, 2), rss_bytes(pid)))
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass


async def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    """Warm up, run the load for cfg.duration, let the server drain, and check it is at rest."""
    load = cfg.load
    base_url = check_target(load.base_url, load.allow_remote)
    if cfg.warmup_requests > 0:  # the same mix (streaming, disconnects) so allocator pools fill first
        await run_load(
            replace(
                load,
                num_requests=cfg.warmup_requests,
                max_duration=max(30.0, cfg.duration),
                seed=load.seed + 7919,
                warmup_requests=0,
            )
        )
        await _wait_rest(base_url, load.api_key, cfg.settle_timeout)
    before = await asyncio.to_thread(scrape, base_url, load.api_key)
    rss0 = rss_bytes(cfg.server_pid) if cfg.server_pid else None
    samples: list[tuple[float, int]] = []
    stop = asyncio.Event()
    sampler = (
        asyncio.ensure_future(_sample_rss(cfg.server_pid, cfg.sample_interval, samples, stop))
        if cfg.server_pid
        else None
    )
    soak_load = replace(load, max_duration=cfg.duration, warmup_requests=0)
    try:
        summary = await run_load(soak_load)
    finally:
        stop.set()
        if sampler is not None:
            await sampler
    state, settle_s = await _wait_rest(base_url, load.api_key, cfg.settle_timeout)
    after = await asyncio.to_thread(scrape, base_url, load.api_key)
    rss1 = rss_bytes(cfg.server_pid) if cfg.server_pid else None

    checks: dict[str, dict[str, Any]] = {
        "no_running_requests": {"ok": state["running"] == 0, "value": state["running"]},
        "no_waiting_requests": {"ok": state["waiting"] == 0, "value": state["waiting"]},
        "kv_pool_full": {
            "ok": state["kv_usage"] == 0
            and (state["kv_blocks"] is None or state["kv_free_blocks"] == state["kv_blocks"]),
            "kv_usage": state["kv_usage"],
            "free_blocks": state["kv_free_blocks"],
            "blocks": state["kv_blocks"],
        },
        "no_failed_requests": {
            "ok": summary["failed"] == 0,
            "value": summary["failed"],
            "errors": summary["errors"],
        },
    }
    if rss0 is not None and rss1 is not None:
        growth = (rss1 - rss0) / MiB
        checks["rss_growth_bounded"] = {
            "ok": growth <= cfg.max_rss_growth_mb,
            "growth_mb": round(growth, 1),
            "limit_mb": cfg.max_rss_growth_mb,
            "start_mb": round(rss0 / MiB, 1),
            "end_mb": round(rss1 / MiB, 1),
            "peak_mb": round(max(r for _, r in samples) / MiB, 1) if samples else None,
        }
    aborted_key = 'dynserve_request_success_total{finished_reason="abort"}'
    result = {
        "ok": all(c["ok"] for c in checks.values()),
        "checks": checks,
        "settle_seconds": round(settle_s, 2),
        "load": summary,
        "server_aborted_requests": (after.get(aborted_key, 0.0) - before.get(aborted_key, 0.0))
        if aborted_key in after
        else None,
        "rss_samples_mb": [(t, round(r / MiB, 1)) for t, r in samples],
    }
    return result


def format_report(r: dict[str, Any]) -> str:
    s = r["load"]
    lines = [
        f"soak: {'PASS' if r['ok'] else 'FAIL'}  ({s['duration']:.1f}s, completed={s['completed']} "
        f"failed={s['failed']} disconnected={s['disconnected']} cut-at-end={s['incomplete']}, "
        f"server aborts={r['server_aborted_requests']}, settled in {r['settle_seconds']}s)"
    ]
    for name, c in r["checks"].items():
        detail = {k: v for k, v in c.items() if k != "ok"}
        lines.append(f"  [{'ok' if c['ok'] else 'FAIL'}] {name}: {detail}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n\n")[0])
    add_load_args(p)
    p.set_defaults(num_requests=20000, concurrency=8, stream_ratio=0.5, disconnect_prob=0.2, range_ratio=0.5)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--settle-timeout", type=float, default=30.0)
    p.add_argument("--max-rss-growth-mb", type=float, default=256.0)
    p.add_argument("--soak-warmup-requests", type=int, default=8)
    p.add_argument("--server-pid", type=int, default=None, help="pid of the server (for the memory check)")
    p.add_argument(
        "--launch-model",
        default=None,
        help="start `dynserve serve` on this checkpoint on a free loopback port (and stop it after)",
    )
    p.add_argument("--launch-args", default="", help="extra `dynserve serve` flags for --launch-model")
    p.add_argument("--result-file", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load = config_from_args(args)
    if not math.isfinite(args.duration) or args.duration <= 0:
        print("soak: error: --duration must be a positive number of seconds", file=sys.stderr)
        return 2
    server: ServerProcess | None = None
    if args.launch_model:
        port = free_port()
        log = Path(tempfile.mkdtemp(prefix="dynserve-soak-")) / "server.log"
        server = ServerProcess(dynserve_command(args.launch_model, port, args.launch_args.split()), port, log)
        load = replace(load, base_url=server.base_url)
    try:
        load.validate()
        check_target(load.base_url, load.allow_remote)
        build_requests(replace(load, num_requests=1))
    except ValueError as e:
        print(f"soak: error: {e}", file=sys.stderr)
        return 2
    cfg = SoakConfig(
        load=load,
        duration=args.duration,
        settle_timeout=args.settle_timeout,
        max_rss_growth_mb=args.max_rss_growth_mb,
        warmup_requests=args.soak_warmup_requests,
        server_pid=args.server_pid,
    )
    try:
        if server is not None:
            server.start()
            cfg.server_pid = server.pid
            print(f"soak: started dynserve (pid {server.pid}) at {server.base_url}, log {server.log_path}")
        result = asyncio.run(run_soak(cfg))
    except (httpx.HTTPError, RuntimeError, TimeoutError) as e:
        print(f"soak: error: {e}", file=sys.stderr)
        if server is not None:
            print(server.log_tail(), file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
    print(format_report(result))
    if args.result_file:
        write_result(args.result_file, result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
