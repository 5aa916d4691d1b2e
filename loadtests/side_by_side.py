"""Side by side: the same load scenario against dynserve and against vLLM (its CPU build) serving
the same checkpoint, one server at a time on loopback, then the ratios dynserve / vLLM.

    python -m loadtests.side_by_side --model-dir /tmp/dynserve-bench/mixtral-100m \\
        --vllm-python /tmp/vllm-venv/bin/python --num-requests 32 --concurrency 4 \\
        --input-len 128 --output-len 64 --result-file side_by_side.json

vLLM lives in its own virtual environment (see loadtests/README.md); --vllm-python is that
environment's interpreter. Either server can instead be one already running (--dynserve-url / --vllm-url). A
checkpoint without a tokenizer (like the random-weight benchmark checkpoint) is served through a
directory of symlinks plus a generated word-level tokenizer covering the whole vocabulary, so both
servers tokenize and detokenize the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtests.loadgen import (
    WORDS,
    LoadConfig,
    add_load_args,
    config_from_args,
    format_summary,
    run_load,
    write_result,
)
from loadtests.server import ServerProcess, dynserve_command, free_port, scrape, vllm_command, wait_healthy

SERVED_NAME = "side-by-side"
# (summary key, label, True when higher is better)
COMPARED = (
    ("request_throughput", "request throughput (req/s)", True),
    ("output_throughput", "output throughput (tok/s)", True),
    ("total_token_throughput", "total throughput (tok/s)", True),
    ("mean_ttft_ms", "mean TTFT (ms)", False),
    ("p99_ttft_ms", "p99 TTFT (ms)", False),
    ("mean_tpot_ms", "mean TPOT (ms)", False),
    ("p99_tpot_ms", "p99 TPOT (ms)", False),
    ("mean_itl_ms", "mean ITL (ms)", False),
    ("p99_itl_ms", "p99 ITL (ms)", False),
    ("mean_e2el_ms", "mean E2EL (ms)", False),
    ("p99_e2el_ms", "p99 E2EL (ms)", False),
)
SPECIALS = ("<unk>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def word_level_tokenizer(vocab_size: int, bos_id: int = 1, eos_id: int = 2) -> tuple[str, dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config.json object) of a whitespace word-level tokenizer
    with exactly vocab_size tokens: the loadgen's words are single tokens, every id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab: dict[str, int] = {}
    names = list(SPECIALS) + ["user", "assistant", "system", ":"] + [w for w in WORDS]
    for w in names:
        if w not in vocab and len(vocab) < vocab_size:
            vocab[w] = len(vocab)
    i = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    inv = {v: k for k, v in vocab.items()}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([s for s in SPECIALS])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": inv.get(bos_id, "<s>"),
        "eos_token": inv.get(eos_id, "</s>"),
        "unk_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }
    return tok.to_str(), config


def prepare_model_dir(src: str | os.PathLike, work_dir: str | os.PathLike) -> Path:
    """`src` itself if it has a tokenizer; else a directory of symlinks to its files plus a
    generated word-level tokenizer sized to the model's vocabulary."""
    src = Path(src).resolve()
    if (src / "tokenizer.json").is_file() or (src / "tokenizer.model").is_file():
        return src
    cfg = json.loads((src / "config.json").read_text())
    dst = Path(work_dir) / f"{src.name}-with-tokenizer"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        link = dst / f.name
        if not link.exists():
            link.symlink_to(f)
    tok_json, tok_cfg = word_level_tokenizer(
        int(cfg["vocab_size"]), cfg.get("bos_token_id") or 1, cfg.get("eos_token_id") or 2
    )
    (dst / "tokenizer.json").write_text(tok_json)
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
    return dst


def ratios(dyn: dict[str, Any], ref: dict[str, Any]) -> dict[str, float | None]:
    """dynserve / vLLM for each compared field (None where vLLM's value is 0 or missing)."""
    out: dict[str, float | None] = {}
    for key, _, _ in COMPARED:
        a, b = dyn.get(key), ref.get(key)
        out[key] = (a / b) if (a is not None and b) else None
    return out


def format_comparison(dyn: dict[str, Any], ref: dict[str, Any]) -> str:
    r = ratios(dyn, ref)
    lines = [f"{'metric':<30}{'dynserve':>12}{'vLLM':>12}{'dynserve/vLLM':>15}  better"]
    lines.append("-" * len(lines[0]))
    for key, label, higher in COMPARED:
        ratio = r[key]
        better = "" if ratio is None else ("dynserve" if (ratio > 1) == higher and ratio != 1 else "vLLM")
        rs = "n/a" if ratio is None else f"{ratio:.2f}x"
        lines.append(f"{label:<30}{dyn.get(key, 0):>12.2f}{ref.get(key, 0):>12.2f}{rs:>15}  {better}")
    lines.append(
        f"{'completed / failed':<30}{str(dyn['completed']) + '/' + str(dyn['failed']):>12}"
        f"{str(ref['completed']) + '/' + str(ref['failed']):>12}"
    )
    return "\n".join(lines)


async def _measure(load: LoadConfig, warmup: int) -> dict[str, Any]:
    if warmup:
        await run_load(
            replace(
                load,
                num_requests=warmup,
                concurrency=load.concurrency or 1,
                seed=load.seed + 4242,
                warmup_requests=0,
            )
        )
    return await run_load(replace(load, warmup_requests=0))


def run_one(
    name: str,
    load: LoadConfig,
    cmd: list[str] | None,
    port: int | None,
    url: str | None,
    log_dir: Path,
    startup_timeout: float,
    warmup: int,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start the server (unless url is given), run the scenario, stop it; the summary plus the
    command line and a /metrics scrape."""
    if url is not None:
        wait_healthy(url, 30.0)
        summary = asyncio.run(_measure(replace(load, base_url=url), warmup))
        summary["server_cmd"] = None
        return summary
    assert cmd is not None and port is not None
    log = log_dir / f"{name}.log"
    print(f"[{name}] starting: {shlex.join(cmd)}  (log {log})", flush=True)
    server = ServerProcess(cmd, port, log, env=env, startup_timeout=startup_timeout, stop_timeout=60.0)
    try:
        server.start()
    except (RuntimeError, TimeoutError) as e:
        raise RuntimeError(f"{name} did not start: {e}\n--- log tail ---\n{server.log_tail()}") from None
    try:
        print(f"[{name}] healthy at {server.base_url}; running the scenario", flush=True)
        summary = asyncio.run(_measure(replace(load, base_url=server.base_url), warmup))
        try:
            m = scrape(server.base_url)
            summary["server_metrics"] = {k: v for k, v in m.items() if "{" not in k and not k.endswith("_created")}
        except Exception as e:  # noqa: BLE001 - metrics are extra information only
            summary["server_metrics"] = {"error": str(e)}
    finally:
        server.stop()
    summary["server_cmd"] = cmd
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.side_by_side", description=__doc__.split("\n\n")[0])
    add_load_args(p)
    p.set_defaults(num_requests=32, concurrency=4, input_len=128, output_len=64, model=SERVED_NAME)
    p.add_argument("--model-dir", required=True, help="the checkpoint both servers load")
    p.add_argument("--dtype", default="float32", help="passed to both servers")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument(
        "--vllm-python",
        default=os.environ.get("VLLM_PYTHON", "/tmp/vllm-venv/bin/python"),
        help="the python of the virtual environment vLLM's CPU build is installed in",
    )
    p.add_argument(
        "--vllm-args",
        default="--gpu-memory-utilization 0.3",
        help="extra `vllm serve` flags (default suits a 2-core, 24 GiB machine)",
    )
    p.add_argument("--dynserve-args", default="", help="extra `dynserve serve` flags")
    p.add_argument("--dynserve-url", default=None, help="use this running dynserve instead of starting one")
    p.add_argument("--vllm-url", default=None, help="use this running vLLM instead of starting one")
    p.add_argument("--only", choices=["dynserve", "vllm"], default=None, help="run one side only")
    p.add_argument("--warmup", type=int, default=4, help="warm-up requests per server (not measured)")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--work-dir", default=None, help="logs and the tokenizer overlay (default: a temp dir)")
    p.add_argument("--result-file", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load = config_from_args(args)
    try:
        load.validate()
    except ValueError as e:
        print(f"side_by_side: error: {e}", file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dynserve-sbs-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model_dir(args.model_dir, work)
    common = [
        "--served-model-name",
        SERVED_NAME,
        "--dtype",
        args.dtype,
        "--max-model-len",
        str(args.max_model_len),
        "--max-num-seqs",
        str(args.max_num_seqs),
    ]
    results: dict[str, Any] = {"model_dir": str(model_dir), "scenario": {}}
    sides = [s for s in ("dynserve", "vllm") if args.only in (None, s)]
    for side in sides:
        url = args.dynserve_url if side == "dynserve" else args.vllm_url
        port = None if url else free_port()
        cmd = None
        env = None
        if url is None and side == "dynserve":
            cmd = dynserve_command(str(model_dir), port, [*common, *shlex.split(args.dynserve_args)])
        elif url is None:
            if not Path(args.vllm_python).exists():
                print(
                    f"side_by_side: {args.vllm_python} not found (see loadtests/README.md to install "
                    "vLLM's CPU build into its own virtual environment)",
                    file=sys.stderr,
                )
                return 2
            cmd = vllm_command(args.vllm_python, str(model_dir), port, [*common, *shlex.split(args.vllm_args)])
            env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
        try:
            summary = run_one(side, load, cmd, port, url, work, args.startup_timeout, args.warmup, env)
        except RuntimeError as e:
            print(f"side_by_side: {e}", file=sys.stderr)
            results[side] = {"error": str(e)}
            if args.result_file:
                write_result(args.result_file, results)
            return 1
        results[side] = summary
        results["scenario"] = summary.get("config", {})
        print(format_summary(summary, title=side), flush=True)
    if len(sides) == 2:
        results["ratios_dynserve_over_vllm"] = ratios(results["dynserve"], results["vllm"])
        print()
        print(format_comparison(results["dynserve"], results["vllm"]))
    if args.result_file:
        write_result(args.result_file, results)
    ok = all(results[s]["failed"] == 0 for s in sides)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
