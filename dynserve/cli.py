"""The `dynserve` command: serve (OpenAI server), generate (offline), eval-routing, calibrate-routing,
expert-report.

Flags use vLLM's names where the meaning is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from dynserve.config import ROUTING_POLICIES, EngineConfig, RoutingConfig

CALIBRATED_POLICIES = ("top_p", "threshold", "relative", "entropy")  # dynserve.bench.calibrate_routing's


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", default=None, help="HF checkpoint directory (default: embedded demo model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (default: from memory)")
    p.add_argument("--kv-cache-memory", type=float, default=2.0, help="KV cache budget in GiB (if no --num-kv-blocks)")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    p.add_argument(
        "--use-triton",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force the Triton kernels on/off (default: Triton on CUDA, torch on CPU)",
    )
    # routing flags default to None = not given: the fields given override the checkpoint's default
    # routing (its routing.json, else top_k with the checkpoint's k); RoutingConfig's defaults fill the rest
    p.add_argument(
        "--routing",
        default=None,
        choices=list(ROUTING_POLICIES),
        help="default expert routing policy (default: the checkpoint's routing.json, else top_k)",
    )
    p.add_argument("--routing-p", type=float, default=None, help="top_p: cumulative probability to reach (0.5)")
    p.add_argument(
        "--routing-threshold",
        type=float,
        default=None,
        help="threshold: minimum probability; relative: x the top one (0.2)",
    )
    p.add_argument(
        "--routing-entropy-thresholds",
        type=float,
        nargs="+",
        default=None,
        help="entropy: ascending H bounds (0.6 1.2)",
    )
    p.add_argument("--routing-entropy-k", type=int, nargs="+", default=None, help="entropy: k per H bin (1 2 4)")
    p.add_argument(
        "--expert-budget",
        default="off",
        choices=["off", "auto"],
        help="auto: under load, admit requests with fewer experts per token (load-adaptive expert budget)",
    )
    p.add_argument("--expert-budget-floor", type=float, default=0.5, help="smallest budget factor (0.5: halve)")
    p.add_argument("--target-itl-ms", type=float, default=None, help="expert budget: decode step time target")
    p.add_argument(
        "--max-active-experts", type=int, default=None, help="at most N distinct experts per MoE layer per step"
    )
    p.add_argument(
        "--routing-config",
        default=None,
        help="routing file (calibrate-routing --out): replaces the --routing flags; its fields override the "
        "checkpoint's routing.json",
    )
    p.add_argument("--routing-k", type=int, default=None, help="top_k: experts per token (default: checkpoint's)")
    p.add_argument("--min-experts", type=int, default=None, help="at least this many experts per token (1)")
    p.add_argument("--max-experts", type=int, default=None)
    p.add_argument(
        "--expert-parallel-size", type=int, default=1, help="ranks sharing each MoE layer's experts (torch.distributed)"
    )
    p.add_argument("--nnodes", type=int, default=1, help="machines of an expert-parallel job")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's index (0 serves; others run workers)")
    p.add_argument("--dist-init-addr", default=None, help="HOST:PORT where rank 0 rendezvous (multi-node)")
    p.add_argument(
        "--expert-parallel-heartbeat-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a worker rank silent this long (died, frozen) fails the engine; workers exit when rank 0 is "
        "(same value on every node)",
    )


def engine_config_from_args(args: argparse.Namespace, **extra: Any) -> EngineConfig:
    if args.routing_config:
        routing = RoutingConfig.from_file(args.routing_config)
    else:
        routing = _routing_from_flags(args)
    return _engine_config(args, routing, **extra)


def _routing_from_flags(args: argparse.Namespace) -> RoutingConfig:
    """A RoutingConfig with the routing flags that were given as its explicit fields (EngineConfig.create
    overlays them on the checkpoint's routing.json; without one, RoutingConfig's defaults fill the rest)."""
    given = {
        "policy": args.routing,
        "p": args.routing_p,
        "threshold": args.routing_threshold,
        "k": args.routing_k,
        "min_experts": args.min_experts,
        "max_experts": args.max_experts,
        "entropy_thresholds": args.routing_entropy_thresholds,
        "entropy_k": args.routing_entropy_k,
    }
    return RoutingConfig(**{name: v for name, v in given.items() if v is not None})


def _engine_config(args: argparse.Namespace, routing: RoutingConfig, **extra: Any) -> EngineConfig:
    return EngineConfig.create(
        args.model_dir,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_bytes=int(args.kv_cache_memory * 1024**3),
        enable_prefix_caching=args.enable_prefix_caching,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=args.enable_chunked_prefill,
        routing=routing,
        use_triton=args.use_triton,
        expert_parallel_size=args.expert_parallel_size,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        dist_init_addr=args.dist_init_addr,
        expert_parallel_heartbeat_timeout=args.expert_parallel_heartbeat_timeout,
        expert_budget=args.expert_budget,
        expert_budget_floor=args.expert_budget_floor,
        target_itl_ms=args.target_itl_ms,
        max_active_experts=args.max_active_experts,
        **extra,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    _add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--served-model-name",
        default=None,
        help="model id in the API (default: the model directory's name; dynserve-demo for the embedded model)",
    )
    serve.add_argument("--api-key", default=None, help="require this bearer token (or env DYNSERVE_API_KEY)")
    serve.add_argument("--max-queued-requests", type=int, default=None, help="503 beyond this many waiting requests")
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may run on after SIGTERM; then they are aborted (streams get an error event)",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=int,
        default=8 * 1024 * 1024,
        help="largest request body accepted (413 beyond it; default 8 MiB)",
    )
    serve.add_argument(
        "--max-prompts-per-request",
        type=int,
        default=256,
        help="most prompts one /v1/completions request may carry (400 beyond it)",
    )
    serve.add_argument(
        "--public-docs",
        action="store_true",
        help="serve /docs, /redoc and /openapi.json without the API key (default: they need it)",
    )
    serve.add_argument(
        "--enable-expert-token-metrics",
        action="store_true",
        help="export per-(layer, expert) token counts (high cardinality)",
    )
    serve.add_argument("--log-level", default="info")

    gen = sub.add_parser("generate", help="generate text offline")
    _add_engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")

    ev = sub.add_parser("eval-routing", help="held-out perplexity vs experts per token across routing settings")
    _add_engine_args(ev)
    ev.add_argument("--text-file", default=None, help="held-out text (default: the model dir's heldout.txt)")
    ev.add_argument("--out-dir", default="eval_routing", help="where to write results.csv and plot.png")
    ev.add_argument("--max-tokens", type=int, default=20000, help="held-out tokens to score")
    ev.add_argument(
        "--calibrate-target",
        type=float,
        nargs="+",
        default=None,
        metavar="X",
        help="also score the settings calibrate-routing finds for X experts per token (each policy)",
    )

    cal = sub.add_parser(
        "calibrate-routing", help="the routing setting reaching a target experts/token with the lowest perplexity"
    )
    _add_engine_args(cal)
    cal.add_argument("--target-experts", type=float, required=True, help="average FFN experts per token per MoE layer")
    cal.add_argument("--policy", nargs="+", default=list(CALIBRATED_POLICIES), choices=list(CALIBRATED_POLICIES))
    cal.add_argument("--per-layer", action="store_true", help="also search one value per MoE layer")
    cal.add_argument("--text-file", default=None, help="held-out text (default: the model dir's heldout.txt)")
    cal.add_argument("--eval-text-file", default=None, help="other text to check the settings on (not searched)")
    cal.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens to score")
    cal.add_argument("--out", default="routing.json", help="the RoutingConfig file to write")

    rep = sub.add_parser("expert-report", help="heatmap and most/least used experts from an expert-distribution dump")
    rep.add_argument("dump", help="JSON from GET /expert_distribution/dump")
    rep.add_argument("--out", default="expert_heatmap.png", help="where to write the layer x expert heatmap PNG")
    rep.add_argument("--top", type=int, default=3, help="most / least used experts to print per layer")
    return parser


def _generate(args: argparse.Namespace) -> int:
    from dynserve.llm import LLM
    from dynserve.sampling_params import SamplingParams

    llm = LLM.from_config(engine_config_from_args(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, n=args.n)
    try:
        outs = llm.generate(args.prompt, params)
    finally:
        llm.close()  # stops expert-parallel workers, if any
    for out in outs:
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": out.prompt,
                        "outputs": [{"text": o.text, "finish_reason": o.finish_reason} for o in out.outputs],
                        "expert_activations": out.expert_usage.expert_activations,
                        "avg_experts_per_token": round(out.expert_usage.avg_experts_per_token, 4),
                    }
                )
            )
        else:
            for o in out.outputs:
                print(f"{out.prompt}{o.text}")
                print(
                    f"--- finish_reason={o.finish_reason} avg_experts_per_token="
                    f"{out.expert_usage.avg_experts_per_token:.3f}"
                )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from dynserve.engine import EngineDeadError
    from dynserve.server.run import ServerSettings, run_server

    config = engine_config_from_args(
        args,
        served_model_name=args.served_model_name,
        max_queued_requests=args.max_queued_requests,
        record_expert_token_counts=args.enable_expert_token_metrics,
    )
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("DYNSERVE_API_KEY"),
        served_model_name=args.served_model_name,
        max_queued_requests=args.max_queued_requests,
        shutdown_timeout=args.shutdown_timeout,
        enable_expert_token_metrics=args.enable_expert_token_metrics,
        log_level=args.log_level,
        max_request_bytes=args.max_request_bytes,
        max_prompts_per_request=args.max_prompts_per_request,
        public_docs=args.public_docs,
    )
    try:
        run_server(config, settings)
    except EngineDeadError as e:  # exit non-zero, so that an orchestrator restarts the server
        print(f"dynserve: error: {e}", file=sys.stderr)
        return 1
    return 0


def _calibrate_routing(args: argparse.Namespace) -> int:
    from dynserve.bench.calibrate_routing import main as calibrate_main

    return calibrate_main(args, engine_config_from_args(args))


def _eval_routing(args: argparse.Namespace) -> int:
    from dynserve.bench.eval_routing import main as eval_main

    return eval_main(args, engine_config_from_args(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "expert-report":
            from dynserve.bench.expert_report import main as report_main

            return report_main(args)
        if getattr(args, "node_rank", 0) > 0:  # a non-head machine of an expert-parallel job: workers only
            from dynserve.engine import run_worker_node

            rc = run_worker_node(engine_config_from_args(args))
            # leave like the spawned workers do: interpreter teardown with gloo's threads still alive
            # can abort the process ("terminate called without an active exception")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        if args.command == "serve":
            return _serve(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "eval-routing":
            return _eval_routing(args)
        if args.command == "calibrate-routing":
            return _calibrate_routing(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"dynserve: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
