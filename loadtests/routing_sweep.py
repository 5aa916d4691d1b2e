"""Routing sweep: the same load at top-k and at several top-p thresholds, sent to one server via the
per-request `routing` field; throughput and latency beside the average experts per token.

    python -m loadtests.routing_sweep --base-url http://127.0.0.1:8000 --num-requests 64 \\
        --concurrency 8 --top-p 0.3 0.5 0.7 0.9 --result-file sweep.json

Every setting gets the identical workload (same seed, so the same prompts, lengths and arrival
times). The server keys its prefix cache by routing config, so one setting never reuses another's
KV blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace
from typing import Any

import httpx

from loadtests.loadgen import (
    LoadConfig,
    add_load_args,
    check_target,
    config_from_args,
    run_load,
    write_result,
)

DEFAULT_TOP_P = (0.3, 0.5, 0.7, 0.9)
# (header, width, format of a value, summary key)
COLUMNS = (
    ("req/s", 8, "{:.2f}", "request_throughput"),
    ("out tok/s", 10, "{:.1f}", "output_throughput"),
    ("mean TTFT ms", 13, "{:.1f}", "mean_ttft_ms"),
    ("p99 TTFT ms", 12, "{:.1f}", "p99_ttft_ms"),
    ("mean TPOT ms", 13, "{:.2f}", "mean_tpot_ms"),
    ("p99 ITL ms", 11, "{:.1f}", "p99_itl_ms"),
    ("p99 E2EL ms", 12, "{:.1f}", "p99_e2el_ms"),
    ("experts/tok", 12, "{:.3f}", "avg_experts_per_token"),
    ("failed", 7, "{}", "failed"),
)


def sweep_settings(
    top_p: list[float] | tuple[float, ...] = DEFAULT_TOP_P,
    include_top_k: bool = True,
    extra: dict[str, Any] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """(label, routing JSON) pairs: top_k (the checkpoint's rule), then top_p at each threshold.
    `extra` (e.g. {"min_experts": 1, "max_experts": 4}) is merged into every routing object."""
    extra = extra or {}
    out: list[tuple[str, dict[str, Any]]] = []
    if include_top_k:
        out.append(("top_k", {"policy": "top_k", **extra}))
    for p in top_p:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top-p thresholds must be in (0, 1], got {p}")
        out.append((f"top_p={p:g}", {"policy": "top_p", "p": p, **extra}))
    return out


async def run_sweep(base: LoadConfig, settings: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run the same load once per routing setting (in order); one summary per setting."""
    rows = []
    for label, routing in settings:
        summary = await run_load(replace(base, routing=routing))
        summary["setting"] = label
        summary["routing"] = routing
        rows.append(summary)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table: one row per routing setting."""
    header = f"{'setting':<14}" + "".join(f"{name:>{w + 1}}" for name, w, _, _ in COLUMNS)
    lines = [header, "-" * len(header)]
    for r in rows:
        cells = [f"{r.get('setting', ''):<14}"]
        for _, w, fmt, key in COLUMNS:
            v = r.get(key)
            cells.append(f"{'n/a' if v is None else fmt.format(v):>{w + 1}}")
        lines.append("".join(cells))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.routing_sweep", description=__doc__.split("\n\n")[0])
    add_load_args(p)
    p.set_defaults(warmup_requests=2)  # per setting, so no setting pays for the others' cold start
    p.add_argument("--top-p", type=float, nargs="*", default=list(DEFAULT_TOP_P), help="top-p thresholds to try")
    p.add_argument("--no-top-k", dest="include_top_k", action="store_false", help="skip the top-k baseline")
    p.add_argument("--min-experts", type=int, default=None)
    p.add_argument("--max-experts", type=int, default=None)
    p.add_argument("--result-file", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    base = config_from_args(args)
    extra = {k: v for k, v in (("min_experts", args.min_experts), ("max_experts", args.max_experts)) if v is not None}
    try:
        base.validate()
        check_target(base.base_url, base.allow_remote)
        settings = sweep_settings(args.top_p, args.include_top_k, extra)
    except ValueError as e:
        print(f"routing_sweep: error: {e}", file=sys.stderr)
        return 2
    try:
        rows = asyncio.run(run_sweep(base, settings))
    except httpx.HTTPError as e:
        print(f"routing_sweep: cannot reach {base.base_url}: {e}", file=sys.stderr)
        return 1
    print(format_table(rows))
    if args.result_file:
        write_result(args.result_file, {"settings": rows})
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
