"""The sparse MoE block: router -> routing policy -> Assignment -> fused expert kernel.

Owns the stacked expert weights of one layer (w13 [E, 2I, H] with gate rows then up rows,
w2 [E, H, I]), the router linear, the optional shared expert, the per-token expert-count
bookkeeping on the ForwardBatch, and the mapping from Hugging Face expert tensor names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynserve.model.base import ForwardBatch
from dynserve.model.experts import LOCAL_EXPERTS, ExpertExecutor
from dynserve.model.layers import GatedMLP, Linear, WeightSource, assign_param
from dynserve.routing import Assignment, CheckpointRule, route


@dataclass(frozen=True)
class ExpertNames:
    """How a family names one expert's tensors under `<moe prefix>.experts.{e}.`."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


MIXTRAL_EXPERT_NAMES = ExpertNames("w1", "w3", "w2")
QWEN_EXPERT_NAMES = ExpertNames()


def _maybe_transposed(t: torch.Tensor, want: tuple[int, ...]) -> torch.Tensor:
    """`t` if it has shape `want`, its last-two-dims transpose if that has; else `t` (shape check later)."""
    if tuple(t.shape) != want and tuple(t.shape) == (want[0], want[2], want[1]):
        return t.transpose(1, 2)
    return t


class MoEBlock(nn.Module):
    """One sparse MoE layer: router logits [T, E] -> `route` -> Assignment -> `fused_moe`.

    Appends its Assignment to `batch.assignments`, each token's FFN expert count to
    `batch.expert_counts` (and per-expert token counts to
    `batch.expert_token_counts` when that list is present). A shared expert, if configured, is
    added as sigmoid(shared_expert_gate(x)) * shared_expert(x) (Qwen2-MoE), or ungated when
    `shared_gate` is False (DeepSeek-V3 / GLM-4.5 `shared_experts`); zero-computation identity
    experts in the Assignment add identity_weight * x. Sigmoid routers (DeepSeek-V3 / GLM-4.5)
    keep the router weight and the per-expert selection bias `e_score_correction_bias` [E] in
    float32 and compute their logits in float32, as transformers does.
    """

    # how the routed experts run (dynserve.model.experts): set by `use_experts` when the model is
    # built; under expert parallelism w13/w2 hold only this rank's experts
    experts: ExpertExecutor = LOCAL_EXPERTS

    backend: str = "torch"  # set by `set_backend`

    def __init__(
        self,
        hidden: int,
        moe_inter: int,
        rule: CheckpointRule,
        *,
        shared_inter: int = 0,
        shared_gate: bool = True,
        shared_prefix: str = "shared_expert",
        router_fp32: bool | None = None,
    ) -> None:
        super().__init__()
        E = rule.num_experts
        self.rule = rule
        self.num_experts = E
        self.router_fp32 = rule.scoring == "sigmoid" if router_fp32 is None else router_fp32
        self.gate = Linear(hidden, E, bias=False, dtype=torch.float32 if self.router_fp32 else None)  # router
        self.e_score_correction_bias: nn.Parameter | None = None
        if rule.selection_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(E, dtype=torch.float32), requires_grad=False)
        self.shared_prefix = shared_prefix
        self.w13 = nn.Parameter(torch.empty(E, 2 * moe_inter, hidden), requires_grad=False)  # [E, 2I, H]
        self.w2 = nn.Parameter(torch.empty(E, hidden, moe_inter), requires_grad=False)  # [E, H, I]
        self.shared_expert = GatedMLP(hidden, shared_inter) if shared_inter > 0 else None
        self.shared_expert_gate = Linear(hidden, 1, bias=False) if shared_inter > 0 and shared_gate else None

    def assign(self, x: torch.Tensor, batch: ForwardBatch) -> Assignment:
        """Router logits [T, E] -> Assignment by each token's RoutingConfig; families with native
        dynamic routing (ReLU routers, zero-computation experts) override this."""
        layer = batch.moe_layer_index
        if self.router_fp32:
            logits = F.linear(x.float(), self.gate.weight)  # [T, E] float32
            return route(logits, batch.routing, self.rule, self.e_score_correction_bias, layer)
        return route(self.gate(x), batch.routing, self.rule, layer=layer)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        assignment = self.assign(x, batch)
        out = self.experts(x, self.w13, self.w2, assignment, self.backend)  # [T, H]
        batch.assignments.append(assignment)
        batch.expert_counts.append(assignment.experts_per_token())
        if batch.expert_token_counts is not None:
            batch.expert_token_counts.append(torch.bincount(assignment.expert_ids, minlength=self.num_experts))
        if assignment.identity_weight is not None:
            out = out + assignment.identity_weight.to(x.dtype)[:, None] * x
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # [T, H]
            if self.shared_expert_gate is not None:
                shared = F.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out

    def load_hf(self, ws: WeightSource, prefix: str, device: torch.device | str, names: ExpertNames) -> None:
        """Router `<prefix>.gate.weight`; experts either per expert (`<prefix>.experts.{e}.<name>.weight`)
        or already fused (`<prefix>.experts.gate_up_proj` [E, 2I, H], `<prefix>.experts.down_proj` [E, H, I])."""
        name = f"{prefix}.gate.weight"
        gate_w = ws.weights[name].float() if self.router_fp32 and ws.has(name) else ws.get(name)
        assign_param(self.gate, "weight", gate_w, device, name)
        if self.e_score_correction_bias is not None:
            name = f"{prefix}.gate.e_score_correction_bias"
            ws.get(name)  # KeyError naming it when missing
            assign_param(self, "e_score_correction_bias", ws.weights[name].float(), device, name)
        E = self.num_experts
        fused_gu = f"{prefix}.experts.gate_up_proj"
        if ws.has(fused_gu):
            w13 = ws.get(fused_gu)
            w2 = ws.get(f"{prefix}.experts.down_proj")
            # some exporters store the transposed [E, H, 2I] / [E, I, H] layouts
            w13 = _maybe_transposed(w13, tuple(self.w13.shape))
            w2 = _maybe_transposed(w2, tuple(self.w2.shape))
        else:
            ex = f"{prefix}.experts"
            w13 = torch.stack(
                [
                    torch.cat([ws.get(f"{ex}.{e}.{names.gate}.weight"), ws.get(f"{ex}.{e}.{names.up}.weight")], dim=0)
                    for e in range(E)
                ]
            )  # [E, 2I, H]
            w2 = torch.stack([ws.get(f"{ex}.{e}.{names.down}.weight") for e in range(E)])  # [E, H, I]
        assign_param(self, "w13", w13, device, f"{prefix}.experts (gate/up)")
        assign_param(self, "w2", w2, device, f"{prefix}.experts (down)")
        if self.shared_expert is not None:
            self.shared_expert.load_hf(ws, f"{prefix}.{self.shared_prefix}", device)
        if self.shared_expert_gate is not None:
            name = f"{prefix}.shared_expert_gate.weight"
            assign_param(self.shared_expert_gate, "weight", ws.get(name), device, name)
