"""Several models' `dynserve eval-routing` results in one plot: perplexity vs experts per token.

    python -m dynserve.bench.plot_routing --csv top2/results.csv "top-2 trained" \
        --csv topp/results.csv "top-p trained" --out quality_vs_compute.png

Each model gets one colour; each policy a marker (top_k as loose squares, calibrated settings as
stars); a dotted line marks each model's top-k (checkpoint) perplexity.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dynserve.bench.eval_routing import EvalRow, draw_rows, read_rows


def plot(models: list[tuple[str, list[EvalRow]]], out: str | Path, title: str = "Quality vs expert compute") -> Path:
    """Draw every model's rows on one axis; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows) in enumerate(models):
        color = colors[i % len(colors)]
        draw_rows(ax, rows, label_prefix=f"{label}: ", color=color, annotate=False)
        ref = rows[0]
        ax.axhline(ref.perplexity, color=color, linestyle=":", linewidth=0.8)
    ax.set_xlabel("average FFN experts per token per MoE layer")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--csv", nargs=2, action="append", required=True, metavar=("RESULTS_CSV", "LABEL"), help="one per model"
    )
    p.add_argument("--out", default="quality_vs_compute.png", help="the PNG to write")
    p.add_argument("--title", default="Quality vs expert compute")
    args = p.parse_args(argv)
    png = plot([(label, read_rows(path)) for path, label in args.csv], args.out, args.title)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
