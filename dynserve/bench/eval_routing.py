"""`dynserve eval-routing`: held-out perplexity vs experts per token across routing settings.

For each setting (the checkpoint's top-k, top-1, sweeps of top-p, threshold, relative and entropy,
the checkpoint's own routing.json if it has one, and with `--calibrate-target X` the settings
`dynserve calibrate-routing --target-experts X` finds) the model scores the same held-out tokens in
fixed windows; the table gives perplexity and the measured average number of FFN experts per token
per MoE layer. Every setting sets only its policy's fields: the rest (renormalize, min/max experts)
come from the engine's default routing (the checkpoint's routing.json, --routing flags), so a model
trained with raw top-p weights is scored with raw weights under every policy. Writes results.csv
and plot.png; `python -m dynserve.bench.plot_routing` draws several models' results.csv in one plot.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dynserve.config import EngineConfig, RoutingConfig, checkpoint_routing
from dynserve.routing import RouterRecord

WINDOW = 256


ENTROPY_THRESHOLDS = (0.6, 1.2)  # scaled per setting; k = 1, 2, 4 below, between and above them
ENTROPY_SCALES = (0.5, 1.0, 1.5, 2.0, 3.0)


def default_settings() -> list[tuple[str, RoutingConfig]]:
    """The settings eval-routing scores; the first (the checkpoint's top-k) is the reference."""
    s: list[tuple[str, RoutingConfig]] = [
        ("top_k (checkpoint)", RoutingConfig(policy="top_k", k=None)),
        ("top_k k=1", RoutingConfig(policy="top_k", k=1)),
    ]
    s += [(f"top_p p={p}", RoutingConfig(policy="top_p", p=p)) for p in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
    s += [(f"threshold t={t}", RoutingConfig(policy="threshold", threshold=t)) for t in (0.4, 0.3, 0.2, 0.1)]
    s += [(f"relative t={t}", RoutingConfig(policy="relative", threshold=t)) for t in (0.7, 0.5, 0.3, 0.2, 0.1)]
    for scale in ENTROPY_SCALES:
        h = tuple(round(x * scale, 4) for x in ENTROPY_THRESHOLDS)
        s.append(
            (
                f"entropy H<{h[0]}:1 <{h[1]}:2 else 4",
                RoutingConfig(policy="entropy", entropy_thresholds=h, entropy_k=(1, 2, 4)),
            )
        )
    return s


@dataclass
class EvalRow:
    name: str
    policy: str
    param: float | int | None
    perplexity: float
    avg_experts_per_token: float
    expert_fraction_of_top_k: float = 0.0
    ppl_ratio_to_top_k: float = 0.0


class Scorer:
    """One ModelRunner scoring fixed windows of held-out tokens under any RoutingConfig: perplexity,
    FFN expert activations per token per MoE layer, and (on request) the router outputs."""

    def __init__(self, config: EngineConfig, token_ids: list[int]) -> None:
        from dynserve.engine.model_runner import ModelRunner

        window = min(WINDOW, config.model.max_model_len)
        self.block_size = config.cache.block_size
        config.cache.num_kv_blocks = -(-window // self.block_size)
        self.runner = ModelRunner(config)
        windows = [token_ids[i : i + window] for i in range(0, len(token_ids) - 1, window)]
        self.windows = [w for w in windows if len(w) >= 2]
        self.num_tokens = sum(len(w) for w in self.windows)

    @torch.inference_mode()
    def score(self, rc: RoutingConfig, record: bool = False) -> tuple[float, float, list[RouterRecord]]:
        """(perplexity, average experts per token per MoE layer, router records if `record`: one per
        MoE layer and window)."""
        from dynserve.engine.sequence import Sequence
        from dynserve.sampling_params import SamplingParams

        runner, bs = self.runner, self.block_size
        nll, n_pred, activations, routed = 0.0, 0, 0, 0
        records: list[RouterRecord] = []
        for w in self.windows:
            seq = Sequence("eval", w, SamplingParams(), rc)
            seq.block_table = list(range(-(-len(w) // bs)))
            batch, _ = runner.build_batch([(seq, len(w))])
            if record:
                batch.router_records = records
            hidden = runner.model(batch, runner.kv_caches)  # [T, H]
            logits = runner.model.compute_logits(hidden[:-1])  # [T-1, V]
            target = torch.tensor(w[1:], device=logits.device)
            nll += float(torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum"))
            n_pred += len(w) - 1
            if batch.expert_counts:
                activations += int(torch.stack(batch.expert_counts).sum())
                routed += len(w) * len(batch.expert_counts)
        return math.exp(nll / max(n_pred, 1)), activations / max(routed, 1), records


def setting_param(rc: RoutingConfig) -> float | int | tuple | None:
    """The number a setting's name shows: p (top_p), threshold (threshold, relative), k (top_k)."""
    if rc.policy == "top_p":
        return rc.p
    if rc.policy in ("threshold", "relative"):
        return rc.threshold
    if rc.policy == "entropy":
        return rc.entropy_thresholds
    return rc.k


def evaluate(
    config: EngineConfig,
    token_ids: list[int],
    settings: list[tuple[str, RoutingConfig]],
    calibrate_targets: list[float] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[EvalRow]:
    """Score `token_ids` under each routing setting (its fields over `config.routing`), then, for each
    of `calibrate_targets`, under the settings calibrate-routing finds for every calibrated policy;
    return one row per setting (rows[0]: the reference, `settings[0]`)."""
    scorer = Scorer(config, token_ids)
    base_rc = config.routing
    rows: list[EvalRow] = []
    for name, rc in settings:
        rc = base_rc.overlay(rc)
        ppl, avg, _ = scorer.score(rc)
        param = setting_param(rc)
        rows.append(EvalRow(name, rc.policy, param, ppl, avg))  # type: ignore[arg-type]
        if log:
            log(f"{name}: {avg:.3f} experts/token, perplexity {ppl:.3f}")
    for target in calibrate_targets or []:
        from dynserve.bench.calibrate_routing import CALIBRATED_POLICIES, calibrate

        cands, _, _ = calibrate(scorer, base_rc, target, list(CALIBRATED_POLICIES), False, log or (lambda m: None))
        for c in cands:
            rows.append(
                EvalRow(
                    f"calibrated {c.policy} {c.param_text()} (target {target:g})",
                    f"calibrated {c.policy}",
                    setting_param(c.routing),  # type: ignore[arg-type]
                    c.perplexity,
                    c.measured,
                )
            )
    base = rows[0]
    for r in rows:
        r.expert_fraction_of_top_k = (
            r.avg_experts_per_token / base.avg_experts_per_token if base.avg_experts_per_token else 0
        )
        r.ppl_ratio_to_top_k = r.perplexity / base.perplexity
    return rows


def write_outputs(rows: list[EvalRow], out_dir: str | os.PathLike) -> tuple[Path, Path | None]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "setting",
                "policy",
                "param",
                "perplexity",
                "avg_experts_per_token",
                "expert_fraction_of_top_k",
                "ppl_ratio_to_top_k",
            ]
        )
        for r in rows:
            w.writerow(
                [
                    r.name,
                    r.policy,
                    r.param,
                    f"{r.perplexity:.4f}",
                    f"{r.avg_experts_per_token:.4f}",
                    f"{r.expert_fraction_of_top_k:.4f}",
                    f"{r.ppl_ratio_to_top_k:.4f}",
                ]
            )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return csv_path, None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # label offsets per policy: settings of different policies often land on the same x (e.g. 1.0)
    draw_rows(ax, rows)
    ax.set_xlabel("average FFN experts per token per MoE layer")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Quality vs expert compute")
    ax.grid(alpha=0.3)
    ax.legend()
    png = out / "plot.png"
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return csv_path, png


# per policy: marker, label offset (settings of different policies often land on the same x, e.g. 1.0)
POLICY_STYLES: dict[str, tuple[str, tuple[int, int]]] = {
    "top_k": ("s", (4, 4)),
    "top_p": ("o", (4, -10)),
    "threshold": ("^", (-14, 6)),
    "relative": ("v", (4, 6)),
    "entropy": ("D", (-14, -10)),
    "calibrated": ("*", (4, 4)),
}


def draw_rows(ax, rows: list[EvalRow], label_prefix: str = "", color: str | None = None, annotate: bool = True) -> None:
    """One line per policy (top_k as loose points; calibrated settings as stars) on a matplotlib axis;
    labels that would overlap move apart (`_place_labels`)."""
    labels: list[tuple[str, float, float, tuple[int, int]]] = []
    for policy, (marker, offset) in POLICY_STYLES.items():
        pts = sorted((r for r in rows if r.policy.split()[0] == policy), key=lambda r: r.avg_experts_per_token)
        if not pts:
            continue
        ax.plot(
            [r.avg_experts_per_token for r in pts],
            [r.perplexity for r in pts],
            marker=marker,
            markersize=9 if policy == "calibrated" else 5,
            linestyle="-" if policy not in ("top_k", "calibrated") else "none",
            label=f"{label_prefix}{policy}",
            **({"color": color} if color else {}),
        )
        if annotate:
            for r in pts:
                text = "ckpt" if r.param is None else r.policy.split()[-1] if policy == "calibrated" else str(r.param)
                labels.append((text, r.avg_experts_per_token, r.perplexity, offset))
    if labels:
        ax.margins(x=0.08, y=0.1)  # labels of the outermost points stay inside the frame
        ax.figure.canvas.draw()  # fixes the axes limits, so label positions compare in display units
        _place_labels(ax, labels)


def read_rows(csv_path: str | os.PathLike) -> list[EvalRow]:
    """The rows of a results.csv written by `write_outputs`."""
    rows = []
    with Path(csv_path).open(newline="") as f:
        for d in csv.DictReader(f):
            rows.append(
                EvalRow(
                    d["setting"],
                    d["policy"],
                    d["param"] or None,  # type: ignore[arg-type]
                    float(d["perplexity"]),
                    float(d["avg_experts_per_token"]),
                    float(d["expert_fraction_of_top_k"]),
                    float(d["ppl_ratio_to_top_k"]),
                )
            )
    return rows


def _place_labels(ax, labels: list[tuple[str, float, float, tuple[int, int]]]) -> None:  # noqa: ANN001
    """Annotate each point, moving a label down (then up) in 9-point steps while its box would
    overlap a label already placed: settings of several policies often share a point (x = 1.0)."""
    placed: list[tuple[float, float]] = []  # label anchors in points
    to_pt = 72.0 / ax.figure.dpi
    for text, x, y, (dx, dy) in labels:
        px, py = (v * to_pt for v in ax.transData.transform((x, y)))
        w = 4.2 * len(text) + 2  # ~7-point font
        for step in (0, -1, 1, -2, 2, -3, 3, -4, 4):
            oy = dy + 9 * step
            if all(abs(px + dx - qx) > w or abs(py + oy - qy) > 8 for qx, qy in placed):
                break
        placed.append((px + dx, py + oy))
        ax.annotate(text, (x, y), fontsize=6, xytext=(dx, oy), textcoords="offset points")


def format_table(rows: list[EvalRow]) -> str:
    lines = ["| setting | avg experts/token | x top-k compute | perplexity | x top-k ppl |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.avg_experts_per_token:.3f} | {r.expert_fraction_of_top_k:.2f} | "
            f"{r.perplexity:.3f} | {r.ppl_ratio_to_top_k:.3f} |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace, config: EngineConfig) -> int:
    from dynserve.tokenizer import Tokenizer

    text_file = Path(args.text_file) if args.text_file else Path(config.model.model_dir) / "heldout.txt"
    if not text_file.is_file():
        raise FileNotFoundError(f"no held-out text: {text_file} (pass --text-file)")
    tok = Tokenizer.from_dir(config.model.model_dir)
    ids = tok.encode(text_file.read_text(errors="replace"), add_special_tokens=False)[: args.max_tokens]
    settings = default_settings()
    ckpt = checkpoint_routing(config.model.model_dir)
    if ckpt is not None:
        settings.append((f"checkpoint routing.json ({ckpt.policy} {setting_param(ckpt)})", ckpt))
    targets = list(getattr(args, "calibrate_target", None) or [])
    rows = evaluate(config, ids, settings, targets, lambda m: print(m, flush=True))
    csv_path, png = write_outputs(rows, args.out_dir)
    print(f"{len(ids)} held-out tokens from {text_file}")
    print(format_table(rows))
    print(f"wrote {csv_path}" + (f" and {png}" if png else " (no plot: pip install 'dynserve[eval]' for matplotlib)"))
    return 0
