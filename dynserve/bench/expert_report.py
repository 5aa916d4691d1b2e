"""`dynserve expert-report DUMP.json`: read an expert-distribution dump (GET /expert_distribution/dump),
print the most and least used experts of every MoE layer with its balance (mean / max tokens per expert,
1.0 = even), and draw a layer x expert heatmap PNG (matplotlib, `pip install 'dynserve[eval]'`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def load_dump(path: str | Path) -> list[list[int]]:
    """The dump's per-layer per-expert token counts; ValueError when the file is not such a dump."""
    data: Any = json.loads(Path(path).read_text())
    counts = data.get("expert_tokens") if isinstance(data, dict) else None
    if not isinstance(counts, list) or not all(isinstance(r, list) for r in counts):
        raise ValueError(f"{path}: not an expert-distribution dump (no 'expert_tokens' list of lists)")
    return [[int(c) for c in row] for row in counts]


def layer_summary(counts: list[list[int]], top: int = 3) -> list[str]:
    """One line per MoE layer: total, balance, the `top` most and least used experts (id:tokens)."""
    lines = []
    for layer, row in enumerate(counts):
        total = sum(row)
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        balance = (total / len(row)) / max(row) if row and max(row) > 0 else float("nan")
        most = ", ".join(f"{e}:{row[e]}" for e in order[:top])
        least = ", ".join(f"{e}:{row[e]}" for e in reversed(order[-top:]))
        lines.append(f"layer {layer}: {total} tokens, balance {balance:.3f}; most used {most}; least used {least}")
    return lines


def draw_heatmap(counts: list[list[int]], out: str | Path) -> Path | None:
    """Write the layer x expert heatmap of `counts` to `out` (None when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    L = len(counts)
    E = max((len(r) for r in counts), default=0)
    fig, ax = plt.subplots(figsize=(min(16, 3 + 0.25 * E), min(12, 2 + 0.3 * L)))
    img = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("Tokens routed to each expert")
    fig.colorbar(img, ax=ax, label="tokens")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(args: argparse.Namespace) -> int:
    counts = load_dump(args.dump)
    for line in layer_summary(counts, args.top):
        print(line)
    png = draw_heatmap(counts, args.out)
    print(f"wrote {png}" if png else "no heatmap: pip install 'dynserve[eval]' for matplotlib")
    return 0
