"""The sparse MoE block: router -> routing policy -> Assignment -> fused expert kernel.

Owns the stacked expert weights of one layer (w13 [E, 2I, H] with gate rows then up rows,
w2 [E, H, I], optional biases b13 [E, 2I] / b2 [E, H]), the router linear (optional bias), the
optional shared expert, the per-token expert-count bookkeeping on the ForwardBatch, and the
mapping from Hugging Face expert tensor names.
"""

from __future__ import annotations

from dataclasses import dataclass

import dynserve_kernels
import torch
import torch.nn.functional as F
from dynserve_kernels.moe_ref import ClampedSwiGLU
from torch import nn

from dynserve.model.base import ForwardBatch
from dynserve.model.experts import LOCAL_EXPERTS, ExpertExecutor, LocalExperts
from dynserve.model.layers import GatedMLP, Linear, WeightSource, assign_param
from dynserve.routing import Assignment, CheckpointRule, RouterRecord, route
from dynserve.routing.policies import fused_route_rows


@dataclass(frozen=True)
class ExpertNames:
    """How a family names one expert's tensors under `<moe prefix>.experts.{e}.`, its router
    (`<moe prefix>.<router>`), and the layout of fused expert tensors: `fused_in_out` says they are
    stored [E, in, out] (gate_up [E, H, 2I], down [E, I, H]: gpt-oss) rather than [E, out, in], and
    `interleaved_gate_up` that gate and up alternate along 2I (gate = [..., ::2], up = [..., 1::2])."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    router: str = "gate"
    fused_in_out: bool = False
    interleaved_gate_up: bool = False


MIXTRAL_EXPERT_NAMES = ExpertNames("w1", "w3", "w2")
QWEN_EXPERT_NAMES = ExpertNames()
# transformers' GptOssMLP: mlp.router (weight + bias), mlp.experts.{gate_up_proj, down_proj}[_bias]
GPT_OSS_EXPERT_NAMES = ExpertNames(router="router", fused_in_out=True, interleaved_gate_up=True)


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """[E, 2I, ...] with gate and up alternating on dim 1 (gpt-oss) -> all gates, then all ups."""
    return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)  # [E, 2I, ...]


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
    float32 and compute their logits in float32, as transformers does. gpt-oss: a router bias
    (`router_bias`), expert biases (`expert_bias`: b13 [E, 2I], b2 [E, H]) and its clamped SwiGLU
    (`activation`), which run through `fused_moe`'s per-expert torch path.
    """

    # how the routed experts run (dynserve.model.experts): set by `use_experts` when the model is
    # built; under expert parallelism w13/w2 hold only this rank's experts
    experts: ExpertExecutor = LOCAL_EXPERTS

    backend: str = "torch"  # set by `set_backend`
    fused_blocks: bool = True  # set by `set_backend`: `forward_block` may fuse the decode block

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
        router_bias: bool = False,
        expert_bias: bool = False,
        activation: ClampedSwiGLU | None = None,
    ) -> None:
        super().__init__()
        E = rule.num_experts
        self.rule = rule
        self.num_experts = E
        self.router_fp32 = rule.scoring == "sigmoid" if router_fp32 is None else router_fp32
        router_dtype = torch.float32 if self.router_fp32 else None
        self.gate = Linear(hidden, E, bias=router_bias, dtype=router_dtype)  # router
        self.e_score_correction_bias: nn.Parameter | None = None
        if rule.selection_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(E, dtype=torch.float32), requires_grad=False)
        self.shared_prefix = shared_prefix
        self.w13 = nn.Parameter(torch.empty(E, 2 * moe_inter, hidden), requires_grad=False)  # [E, 2I, H]
        self.w2 = nn.Parameter(torch.empty(E, hidden, moe_inter), requires_grad=False)  # [E, H, I]
        self.b13: nn.Parameter | None = None
        self.b2: nn.Parameter | None = None
        if expert_bias:
            self.b13 = nn.Parameter(torch.empty(E, 2 * moe_inter), requires_grad=False)  # [E, 2I]
            self.b2 = nn.Parameter(torch.empty(E, hidden), requires_grad=False)  # [E, H]
        self.activation = activation
        self.shared_expert = GatedMLP(hidden, shared_inter) if shared_inter > 0 else None
        self.shared_expert_gate = Linear(hidden, 1, bias=False) if shared_inter > 0 and shared_gate else None

    def assign(self, x: torch.Tensor, batch: ForwardBatch) -> Assignment:
        """Router logits [T, E] -> Assignment by each token's RoutingConfig; families with native
        dynamic routing (ReLU routers, zero-computation experts) override this."""
        layer = batch.moe_layer_index
        if self.router_fp32:
            logits = F.linear(x.float(), self.gate.weight, self.gate.bias)  # [T, E] float32
        else:
            logits = self.gate(x)  # [T, E]
        bias = self.e_score_correction_bias
        if batch.router_records is not None:
            batch.router_records.append(RouterRecord(layer, logits, self.rule, bias))
        select = dynserve_kernels.route_selector(self.backend)
        return route(logits, batch.routing, self.rule, bias, layer=layer, select=select)

    def _fusable(self) -> bool:
        """Whether the block is what a fused MoE-block kernel computes: a plain softmax router (no bias,
        float32 weight, groups or selection bias), routed experts without biases or a custom activation,
        no shared expert, this class's own routing and executor."""
        return (
            type(self).assign is MoEBlock.assign
            and type(self).forward is MoEBlock.forward
            and type(self.experts) is LocalExperts
            and not self.rule.group_limited
            and not self.router_fp32
            and self.gate.bias is None
            and self.e_score_correction_bias is None
            and self.b13 is None
            and self.activation is None
            and self.shared_expert is None
        )

    def forward_block(self, y: torch.Tensor, h: torch.Tensor, batch: ForwardBatch) -> torch.Tensor | None:
        """h + self(y, batch) in one kernel call where the backend fuses the block (router, routing by
        each token's config, experts and the residual add; the same bookkeeping on `batch`); None
        otherwise (then the caller runs it op by op)."""
        fusable = self.__dict__.get("_fusable_cached")
        if fusable is None:
            fusable = self.__dict__["_fusable_cached"] = self._fusable()
        if not fusable or not self.fused_blocks or self.backend != "cpu" or batch.router_records is not None:
            return None
        layer = batch.moe_layer_index
        rows = fused_route_rows(batch.routing, self.rule, layer)
        if rows is None:
            return None
        r = dynserve_kernels.moe_block(
            y, h, self.gate.weight, self.w13, self.w2, rows, batch.routing.config_index, self.backend
        )
        if r is None:
            return None
        T, E = y.shape[0], self.num_experts
        a = Assignment(T, E, r.token_ids, r.expert_ids, r.weights, r.offsets, expert_counts=r.expert_counts)
        batch.assignments.append(a)
        batch.expert_counts.append(r.token_counts)  # [T]
        if batch.expert_token_counts is not None:
            batch.expert_token_counts.append(r.expert_counts)  # [E]
        return r.out  # [T, H]

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        assignment = self.assign(x, batch)
        if self.b13 is None and self.activation is None:
            out = self.experts(x, self.w13, self.w2, assignment, self.backend)  # [T, H]
        else:  # gpt-oss: expert biases and the clamped SwiGLU
            options = dict(b13=self.b13, b2=self.b2, activation=self.activation)
            out = self.experts(x, self.w13, self.w2, assignment, self.backend, **options)  # [T, H]
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
        """Router `<prefix>.<names.router>.weight` (+ `.bias`); experts either per expert
        (`<prefix>.experts.{e}.<name>.weight`) or already fused (`<prefix>.experts.gate_up_proj`
        [E, 2I, H], `<prefix>.experts.down_proj` [E, H, I]; gpt-oss: [E, H, 2I] interleaved and
        [E, I, H], with `_bias` tensors [E, 2I] and [E, H], possibly MXFP4: see `WeightSource`)."""
        router = f"{prefix}.{names.router}"
        name = f"{router}.weight"
        gate_w = ws.weights[name].float() if self.router_fp32 and ws.has(name) else ws.get(name)
        assign_param(self.gate, "weight", gate_w, device, name)
        if self.gate.bias is not None:
            name = f"{router}.bias"
            bias = ws.weights[name].float() if self.router_fp32 and ws.has(name) else ws.get(name)
            assign_param(self.gate, "bias", bias, device, name)
        if self.e_score_correction_bias is not None:
            name = f"{prefix}.gate.e_score_correction_bias"
            ws.get(name)  # KeyError naming it when missing
            assign_param(self, "e_score_correction_bias", ws.weights[name].float(), device, name)
        E = self.num_experts
        fused_gu = f"{prefix}.experts.gate_up_proj"
        if ws.has(fused_gu):
            w13 = ws.get(fused_gu)
            w2 = ws.get(f"{prefix}.experts.down_proj")
            if names.fused_in_out:  # [E, H, 2I] / [E, I, H], whatever the sizes (gpt-oss has I == H)
                w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
            else:  # some exporters store the transposed [E, H, 2I] / [E, I, H] layouts
                w13 = _maybe_transposed(w13, tuple(self.w13.shape))
                w2 = _maybe_transposed(w2, tuple(self.w2.shape))
            if names.interleaved_gate_up:
                w13 = _deinterleave(w13)  # [E, 2I, H]
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
        if self.b13 is not None:
            b13 = ws.get(f"{fused_gu}_bias")  # [E, 2I]
            assign_param(
                self, "b13", _deinterleave(b13) if names.interleaved_gate_up else b13, device, f"{fused_gu}_bias"
            )
            name = f"{prefix}.experts.down_proj_bias"
            assign_param(self, "b2", ws.get(name), device, name)
        if self.shared_expert is not None:
            self.shared_expert.load_hf(ws, f"{prefix}.{self.shared_prefix}", device)
        if self.shared_expert_gate is not None:
            name = f"{prefix}.shared_expert_gate.weight"
            assign_param(self.shared_expert_gate, "weight", ws.get(name), device, name)
