"""Rooflines for the decode benchmarks: what the machine can do, measured on the spot, and what a
model's decode step must at least cost.

- `measure_read_bandwidth`: GB/s of streaming a buffer much larger than the caches (a float32 sum,
  with torch's intra-op threads), the ceiling of a weight-bound batch-1 decode step;
- `measure_peak_gflops`: GFLOP/s of a large matmul through torch (MKL/oneDNN on a CPU), the
  ceiling of a compute-bound batch-64 step;
- `ModelCost.of(model)`: bytes of weights and FLOPs per decode step, from the model's parameters
  (MoE experts counted per expert actually used; the embedding table as the one row it reads).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-`repeats` GB/s of reading `nbytes` of float32 once (torch.sum)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)  # touched, so pages are resident
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def measure_peak_gflops(n: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of an n x n x n matmul in `dtype`."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm-up (library init, packing buffers)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


@dataclass(frozen=True)
class ModelCost:
    """Weights and FLOPs of one decode step of a (MoE) decoder."""

    dense_bytes: int  # every non-expert weight read per step (the embedding as one row per token)
    dense_params: int  # multiply-accumulates per token outside the experts (embedding excluded)
    expert_bytes: int  # one expert of one MoE layer (w13 + w2)
    expert_params: int
    num_moe_layers: int
    num_experts: int
    attn_layers: int
    q_heads_x_dim: int  # Hq * D: attention FLOPs per token per context position are 4 * this

    @classmethod
    def of(cls, model: nn.Module) -> ModelCost:
        dense_bytes = dense_params = expert_bytes = expert_params = moe_layers = experts = 0
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() == 3 and leaf in ("w13", "w2"):  # stacked experts [E, ., .]
                expert_bytes += p[0].numel() * p.element_size()
                expert_params += p[0].numel()
                if leaf == "w13":
                    moe_layers += 1
                    experts = p.shape[0]
            elif "embed" in name:
                dense_bytes += p.shape[-1] * p.element_size()  # one row per token
            else:
                dense_bytes += p.numel() * p.element_size()
                dense_params += p.numel()
        moe_layers = max(moe_layers, 1)
        cfg = getattr(model, "config", None)
        layers = int(getattr(cfg, "num_layers", 0) or 0)
        hq_d = int(getattr(cfg, "num_heads", 0) or 0) * int(getattr(cfg, "head_dim", 0) or 0)
        return cls(
            dense_bytes,
            dense_params,
            expert_bytes // moe_layers,
            expert_params // moe_layers,
            moe_layers if experts else 0,
            experts,
            layers,
            hq_d,
        )

    def experts_touched(self, batch: int, experts_per_token: float) -> float:
        """Expected distinct experts per MoE layer in a step of `batch` tokens, under uniform routing."""
        if not self.num_experts:
            return 0.0
        share = min(experts_per_token / self.num_experts, 1.0)
        return self.num_experts * (1.0 - (1.0 - share) ** batch)

    def step_bytes(self, batch: int, experts_per_token: float) -> float:
        """Bytes of weights one decode step of `batch` sequences must read at least once."""
        experts = self.num_moe_layers * self.experts_touched(batch, experts_per_token) * self.expert_bytes
        return self.dense_bytes + experts

    def token_flops(self, experts_per_token: float, context: float) -> float:
        """FLOPs of one token: 2 per weight multiply-accumulate, plus attention over `context` positions."""
        weights = self.dense_params + self.num_moe_layers * experts_per_token * self.expert_params
        return 2.0 * weights + 4.0 * self.attn_layers * self.q_heads_x_dim * context


def report(
    cost: ModelCost,
    step_s: float,
    batch: int,
    experts_per_token: float,
    context: float,
    bandwidth_gb_s: float,
    peak_gflops: float,
) -> dict[str, float]:
    """Achieved GB/s and GFLOP/s of a decode step against the measured ceilings."""
    nbytes = cost.step_bytes(batch, experts_per_token)
    flops = batch * cost.token_flops(experts_per_token, context)
    stream_s = nbytes / (bandwidth_gb_s * 1e9)
    return {
        "weight_mb_per_step": nbytes / 1e6,
        "achieved_gb_s": nbytes / step_s / 1e9,
        "bandwidth_ratio": stream_s / step_s,
        "achieved_gflops": flops / step_s / 1e9,
        "peak_ratio": flops / step_s / 1e9 / peak_gflops,
        "outside_weight_reads_ms": max(step_s - stream_s, 0.0) * 1e3,
        "outside_weight_reads_share": max(step_s - stream_s, 0.0) / step_s,
    }
