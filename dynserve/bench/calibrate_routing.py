"""`dynserve calibrate-routing`: the routing setting that reaches a target average number of experts
per token (within 2%) on held-out text with the lowest perplexity, written as a RoutingConfig file.

The search is cheap: one forward pass records every MoE layer's router logits (`RouterRecord`); a
policy's single parameter (top_p's p, threshold's and relative's threshold, a scale on entropy's
thresholds) is then bisected on those recorded logits, re-routing them without running the model,
globally or per MoE layer (`--per-layer`). Each candidate is then scored for real (perplexity and
measured experts per token); since earlier layers' routing moves later layers' inputs, a candidate
that misses the target by more than 2% is re-recorded under its own routing and bisected again
(at most `ROUNDS` times).

    dynserve calibrate-routing [MODEL_DIR] --target-experts 1.5 [--policy top_p threshold relative entropy]
                               [--per-layer] [--text-file F] [--eval-text-file G] [--max-tokens 4096]
                               [--out routing.json]

Load the result with `dynserve serve --routing-config routing.json` or `RoutingConfig.from_file`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import dynserve_kernels
import torch

from dynserve.config import EngineConfig, RoutingConfig
from dynserve.routing import RouterRecord, RoutingBatch, route

TOLERANCE = 0.02  # relative distance to the target that counts as reached
ROUNDS = 3  # re-record-and-bisect rounds per candidate
CALIBRATED_POLICIES = ("top_p", "threshold", "relative", "entropy")


@dataclass(frozen=True)
class PolicySearch:
    """How one policy's parameter maps to a RoutingConfig: the search interval, whether experts per
    token grow with the parameter, and whether to bisect in log space."""

    lo: float
    hi: float
    increasing: bool
    log: bool
    make: Callable[[RoutingConfig, float | tuple[float, ...]], RoutingConfig]


def _entropy(base: RoutingConfig, scale: float | tuple[float, ...]) -> RoutingConfig:
    """Entropy thresholds scaled by `scale` (a larger scale moves tokens to the smaller k bins)."""
    s = scale[0] if isinstance(scale, tuple) else scale  # one scale: thresholds are not per layer
    return replace(base, policy="entropy", entropy_thresholds=tuple(h * s for h in base.entropy_thresholds))


SEARCHES: dict[str, PolicySearch] = {
    "top_p": PolicySearch(1e-4, 1.0, True, False, lambda b, v: replace(b, policy="top_p", p=v)),
    "threshold": PolicySearch(0.0, 1.0, False, False, lambda b, v: replace(b, policy="threshold", threshold=v)),
    "relative": PolicySearch(0.0, 1.0, False, False, lambda b, v: replace(b, policy="relative", threshold=v)),
    "entropy": PolicySearch(1e-3, 1e3, False, True, _entropy),
}


def layer_experts(records: list[RouterRecord], rc: RoutingConfig) -> dict[int, float]:
    """Average experts per token of each MoE layer when the recorded logits are routed by `rc`."""
    pairs: dict[int, int] = {}
    tokens: dict[int, int] = {}
    batch = RoutingBatch.single(rc)
    select = dynserve_kernels.route_selector("cpu")  # the native pass where it takes the logits
    for r in records:
        a = route(r.logits, batch, r.rule, r.score_bias, layer=r.moe_layer, select=select)
        pairs[r.moe_layer] = pairs.get(r.moe_layer, 0) + int(a.num_pairs)
        tokens[r.moe_layer] = tokens.get(r.moe_layer, 0) + int(a.num_tokens)
    return {layer: pairs[layer] / max(tokens[layer], 1) for layer in sorted(pairs)}


def bisect(f: Callable[[float], float], target: float, search: PolicySearch, iters: int = 30) -> float:
    """The parameter whose f is closest to `target` (f monotone in the direction `search` says)."""
    lo, hi = search.lo, search.hi
    best, best_err = lo, math.inf
    for _ in range(iters):
        mid = math.sqrt(lo * hi) if search.log else (lo + hi) / 2
        y = f(mid)
        if abs(y - target) < best_err:
            best, best_err = mid, abs(y - target)
        if (y < target) == search.increasing:
            lo = mid
        else:
            hi = mid
    for end in (search.lo, search.hi):  # the interval's ends may be closer than any midpoint
        if abs(f(end) - target) < best_err:
            best, best_err = end, abs(f(end) - target)
    return best


def solve(
    records: list[RouterRecord], base: RoutingConfig, policy: str, target: float, per_layer: bool
) -> tuple[RoutingConfig, float]:
    """The `policy` setting whose recorded-logit routing is closest to `target` experts per token
    (one value, or with `per_layer` one per MoE layer); returns it and its predicted average."""
    search = SEARCHES[policy]
    layers = sorted({r.moe_layer for r in records})
    if per_layer and policy != "entropy":
        values: list[float] = []
        for layer in layers:
            mine = [r for r in records if r.moe_layer == layer]
            values.append(bisect(lambda v, m=mine: _mean(layer_experts(m, search.make(base, v))), target, search))
        rc = search.make(base, tuple(values))
    else:
        rc = search.make(base, bisect(lambda v: _mean(layer_experts(records, search.make(base, v))), target, search))
    return rc, _mean(layer_experts(records, rc))


def _mean(per_layer: dict[int, float]) -> float:
    return sum(per_layer.values()) / max(len(per_layer), 1)


@dataclass
class Candidate:
    policy: str
    per_layer: bool
    routing: RoutingConfig
    predicted: float  # experts per token from the recorded logits
    measured: float  # experts per token of the real pass
    perplexity: float
    rounds: int
    eval_measured: float | None = None  # experts per token on the --eval-text-file text
    eval_perplexity: float | None = None

    def reached(self, target: float) -> bool:
        return abs(self.measured - target) <= TOLERANCE * target

    def param_text(self) -> str:
        rc = self.routing
        v = rc.p if self.policy == "top_p" else rc.entropy_thresholds if self.policy == "entropy" else rc.threshold
        vals = v if isinstance(v, tuple) else (v,)
        text = ", ".join(f"{x:.4g}" for x in vals)
        return f"[{text}]" if isinstance(v, tuple) else text


def calibrate(
    scorer: object, base: RoutingConfig, target: float, policies: list[str], per_layer: bool, log: Callable[[str], None]
) -> tuple[list[Candidate], float, float]:
    """Every candidate (policy x global / per layer), and the checkpoint's own (perplexity, experts)."""
    # the reference: the checkpoint's top-k, weighted as `base` weights (a top-p-trained checkpoint's
    # routing.json says renormalize=false)
    ref = base if base.policy == "top_k" else RoutingConfig(renormalize=base.renormalize)
    ref_ppl, ref_experts, records = scorer.score(ref, record=True)  # type: ignore[attr-defined]
    if not records:
        raise ValueError("this model routes by its own rule (no RoutingConfig policy applies): nothing to calibrate")
    log(f"checkpoint routing: {ref_experts:.3f} experts/token, perplexity {ref_ppl:.3f} (router logits recorded)")
    out: list[Candidate] = []
    for policy in policies:
        for layered in (False, True) if per_layer and policy != "entropy" else (False,):
            recs, rc, predicted = records, base, 0.0
            for rounds in range(1, ROUNDS + 1):
                rc, predicted = solve(recs, base, policy, target, layered)
                ppl, measured, recs = scorer.score(rc, record=True)  # type: ignore[attr-defined]
                cand = Candidate(policy, layered, rc, predicted, measured, ppl, rounds)
                log(
                    f"{policy}{' per layer' if layered else ''} round {rounds}: {cand.param_text()} -> "
                    f"predicted {predicted:.3f}, measured {measured:.3f} experts/token, perplexity {ppl:.3f}"
                )
                if cand.reached(target):
                    break
            out.append(cand)
    return out, ref_ppl, ref_experts


def format_table(cands: list[Candidate], target: float, ref_ppl: float, ref_experts: float) -> str:
    held = any(c.eval_measured is not None for c in cands)
    lines = [
        f"target {target:g} experts/token (checkpoint: {ref_experts:.3f}, perplexity {ref_ppl:.3f})",
        "",
        "| policy | per layer | setting | predicted experts | measured experts | within 2% | perplexity "
        "| x checkpoint ppl |" + (" unseen text: experts | off target | perplexity |" if held else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if held else ""),
    ]
    for c in cands:
        row = (
            f"| {c.policy} | {'yes' if c.per_layer else 'no'} | {c.param_text()} | {c.predicted:.3f} | "
            f"{c.measured:.3f} | {'yes' if c.reached(target) else 'no'} | {c.perplexity:.3f} | "
            f"{c.perplexity / ref_ppl:.3f} |"
        )
        if held and c.eval_measured is not None:
            off = (c.eval_measured - target) / target
            row += f" {c.eval_measured:.3f} | {off:+.1%} | {c.eval_perplexity:.3f} |"
        lines.append(row)
    return "\n".join(lines)


def best(cands: list[Candidate], target: float) -> Candidate:
    """The lowest perplexity among candidates within 2% of the target (else the closest one)."""
    ok = [c for c in cands if c.reached(target)]
    if ok:
        return min(ok, key=lambda c: c.perplexity)
    return min(cands, key=lambda c: abs(c.measured - target))


def main(args: argparse.Namespace, config: EngineConfig) -> int:
    from dynserve.bench.eval_routing import Scorer
    from dynserve.tokenizer import Tokenizer

    if not args.target_experts > 0 or not math.isfinite(args.target_experts):
        raise ValueError(f"--target-experts must be a positive number, got {args.target_experts}")
    text_file = Path(args.text_file) if args.text_file else Path(config.model.model_dir) / "heldout.txt"
    if not text_file.is_file():
        raise FileNotFoundError(f"no held-out text: {text_file} (pass --text-file)")
    tok = Tokenizer.from_dir(config.model.model_dir)
    ids = tok.encode(text_file.read_text(errors="replace"), add_special_tokens=False)[: args.max_tokens]
    torch.manual_seed(0)
    scorer = Scorer(config, ids)
    print(f"{scorer.num_tokens} held-out tokens from {text_file}", flush=True)
    cands, ref_ppl, ref_experts = calibrate(
        scorer, config.routing, args.target_experts, list(args.policy), args.per_layer, lambda m: print(m, flush=True)
    )
    held: dict[str, object] = {}
    if args.eval_text_file:  # how the settings hold on text the search never saw
        eval_ids = tok.encode(Path(args.eval_text_file).read_text(errors="replace"), add_special_tokens=False)
        unseen = Scorer(config, eval_ids[: args.max_tokens])
        print(f"scoring every candidate on {unseen.num_tokens} unseen tokens from {args.eval_text_file}", flush=True)
        for c in cands:
            c.eval_perplexity, c.eval_measured, _ = unseen.score(c.routing)
        held = {"eval_text_file": str(args.eval_text_file), "eval_tokens": unseen.num_tokens}
    print()
    print(format_table(cands, args.target_experts, ref_ppl, ref_experts))
    chosen = best(cands, args.target_experts)
    if chosen.eval_measured is not None:
        held.update(eval_experts_per_token=chosen.eval_measured, eval_perplexity=chosen.eval_perplexity)
    out = Path(args.out)
    out.write_text(
        json.dumps(
            {
                "routing": chosen.routing.to_dict(),
                "calibration": {
                    "model": config.model_name,  # the served id: dynserve-demo for the embedded model
                    "text_file": str(text_file),
                    "tokens": scorer.num_tokens,
                    "target_experts_per_token": args.target_experts,
                    "measured_experts_per_token": chosen.measured,
                    "perplexity": chosen.perplexity,
                    "checkpoint_perplexity": ref_ppl,
                    "checkpoint_experts_per_token": ref_experts,
                    "within_tolerance": chosen.reached(args.target_experts),
                    **held,
                },
            },
            indent=2,
        )
        + "\n"
    )
    verdict = "" if chosen.reached(args.target_experts) else " (no candidate reached the target within 2%: closest)"
    print(f"\nchose {chosen.policy}{' per layer' if chosen.per_layer else ''} {chosen.param_text()}{verdict}")
    print(f"wrote {out}; serve it with: dynserve serve --routing-config {out}")
    return 0
