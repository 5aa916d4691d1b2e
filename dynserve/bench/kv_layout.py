"""KV cache bytes per token per attention layer, and the sequences a fixed cache memory holds, for the
latent-attention families at their published shapes (configs only: transformers' default configs of
DeepSeek-V3, DeepSeek-V2 and LongCat-Flash are the released models' dimensions; no weights).

`compressed` is what dynserve allocates (`kv_cache_bytes_per_block`: one latent row [c, k_rope] per
token per layer); `decompressed` is per-head K and V (every query head caches K [k_nope, k_rope] and V,
padded to one width, as dynserve did before the compressed cache).

    python -m dynserve.bench.kv_layout [--dtype bfloat16] [--kv-cache-memory-gib 16] [--seq-len 4096] [MODEL_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from dynserve.config import ModelConfig
from dynserve.model.kv_cache import kv_cache_bytes_per_block, kv_cache_layout
from dynserve.model.mla import qk_head_dim

BLOCK_SIZE = 16
PUBLISHED = {
    "DeepSeek-V3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "DeepSeek-V2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "LongCat-Flash": ("LongcatFlashConfig", "LongcatFlashForCausalLM"),
}


def published_config_dirs(root: Path) -> dict[str, Path]:
    """config.json of each published shape (transformers' defaults) under `root`."""
    import transformers

    out = {}
    for name, (cfg_cls, arch) in PUBLISHED.items():
        hf = getattr(transformers, cfg_cls)().to_dict()
        hf["architectures"] = [arch]
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(hf))
        out[name] = d
    return out


def kv_row(name: str, model_dir: Path, dtype: str, memory_bytes: int, seq_len: int) -> dict[str, object]:
    mc = ModelConfig.from_dir(model_dir, dtype=dtype)
    layers, heads, width, shared = kv_cache_layout(mc)
    elem = 2 if dtype in ("bfloat16", "float16") else 4
    per_token_layer = kv_cache_bytes_per_block(mc, BLOCK_SIZE, dtype) // (BLOCK_SIZE * layers)
    hf = mc.hf
    if "kv_lora_rank" in hf:  # the per-head K/V the latent replaces
        decompressed = 2 * mc.num_heads * max(qk_head_dim(hf), int(hf["v_head_dim"])) * elem
    else:
        decompressed = per_token_layer
    blocks_per_seq = -(-seq_len // BLOCK_SIZE)
    seqs = memory_bytes // kv_cache_bytes_per_block(mc, BLOCK_SIZE, dtype) // blocks_per_seq
    seqs_before = memory_bytes // (decompressed * layers * BLOCK_SIZE) // blocks_per_seq
    return {
        "model": name,
        "attention_layers": layers,
        "cached_row": f"{heads} x {width}" + (" (K = V)" if shared else " (K, V)"),
        "bytes_per_token_layer": per_token_layer,
        "decompressed_bytes": decompressed,
        "ratio": decompressed / per_token_layer,
        "seqs": seqs,
        "seqs_decompressed": seqs_before,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dirs", nargs="*", help="more checkpoints (only config.json is read)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--kv-cache-memory-gib", type=float, default=16.0)
    ap.add_argument("--seq-len", type=int, default=4096)
    args = ap.parse_args(argv)
    memory = int(args.kv_cache_memory_gib * 1024**3)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = published_config_dirs(Path(tmp))
        dirs.update({Path(d).name: Path(d) for d in args.model_dirs})
        rows = [kv_row(name, d, args.dtype, memory, args.seq_len) for name, d in dirs.items()]
    print(
        f"KV cache per token per attention layer ({args.dtype}); sequences of {args.seq_len} tokens in "
        f"{args.kv_cache_memory_gib:g} GiB of cache\n"
    )
    head = ("model", "attention layers", "cached per token", "bytes/token/layer", "decompressed", "ratio", "sequences")
    print("| " + " | ".join((*head, "decompressed")) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['attention_layers']} | {r['cached_row']} | {r['bytes_per_token_layer']:,} | "
            f"{r['decompressed_bytes']:,} | {r['ratio']:.1f}x | {r['seqs']:,} | {r['seqs_decompressed']:,} |"
        )


if __name__ == "__main__":
    main()
