"""Random-weight checkpoints for load tests whose model shape matters more than its weights.

    python -m loadtests.checkpoints olmoe-64x8 --out /tmp/olmoe-64x8

`olmoe-64x8`: OLMoE architecture with OLMoE's expert layout (64 experts, top-8, softmax router
without renormalisation) at a small width (hidden 256, expert intermediate 256, 4 layers, 4 heads),
53.5M parameters, random weights (seed 0), with the demo model's tokenizer (vocabulary 4096) so
prompts are text and streamed chunks carry text. Its MoE layers are most of a step, as in the
deployed MoE models, unlike the demo model's.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SHAPES = {
    "olmoe-64x8": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=64,
        num_experts_per_tok=8,
        max_position_embeddings=2048,
        norm_topk_prob=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    ),
}


def build(name: str, out: Path, seed: int = 0) -> Path:
    """Write checkpoint `name` (a key of SHAPES) to `out` (config, safetensors, demo tokenizer)."""
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from dynserve.config import default_model_dir

    torch.manual_seed(seed)
    model = OlmoeForCausalLM(OlmoeConfig(**SHAPES[name]))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    demo = Path(default_model_dir())
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(demo / f, out / f)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(SHAPES))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    build(args.name, Path(args.out), args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
