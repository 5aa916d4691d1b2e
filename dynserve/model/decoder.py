"""The pre-norm decoder-only transformer every supported family is an instance of.

Owns `DecoderSpec` (the few facts in which the families differ: the attention kind and its
biases / q/k norm, which layers are MoE, expert naming, routing rule, shared experts),
`AttentionKind` (what a spec's attention part provides: the module of a layer, the paged-cache
layout, the rotary embedding) with `GQA` (grouped-query attention; `mla.MLA` is the latent one),
and `DecoderForCausalLM`, the CausalLM that builds embedding -> [attention, dense MLP or MoE] x L ->
norm -> lm_head from a spec and loads Hugging Face weights into it. Each family file (llama.py,
mixtral.py, deepseek.py, ...) only derives a spec.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import dynserve_kernels
import torch
import torch.nn.functional as F
from dynserve_kernels.cpu_native import DecodeLayerWeights
from dynserve_kernels.moe_ref import ClampedSwiGLU
from torch import nn

from dynserve.config import ModelConfig
from dynserve.model.base import CausalLM, ForwardBatch
from dynserve.model.layers import (
    Attention,
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    WeightSource,
    assign_param,
)
from dynserve.model.moe import ExpertNames, MoEBlock
from dynserve.routing import Assignment, CheckpointRule
from dynserve.routing.policies import fused_route_rows

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


class AttentionKind(Protocol):
    """The attention part of a `DecoderSpec`: builds one layer's attention module (with
    `forward(x, cos, sin, kv_cache, batch)` and `load_hf(ws, prefix, device)`), says the per-layer
    paged-cache layout, and builds the rotary embedding the model computes once per step."""

    def build(self, cfg: ModelConfig, spec: DecoderSpec, layer_idx: int = 0) -> nn.Module: ...

    def cache_layout(self, cfg: ModelConfig) -> tuple[int, int]:
        """(KV heads, head dim) of one attention layer's paged cache."""
        ...

    @property
    def shared_kv(self) -> bool:
        """Whether K and V are one cached tensor (the cache then holds one half)."""
        ...

    def rotary(self, cfg: ModelConfig, spec: DecoderSpec) -> RotaryEmbedding: ...


@dataclass(frozen=True)
class GQA:
    """Grouped-query attention (`layers.Attention`): merged q/k/v, the spec's biases, q/k norm and
    clipping; caches num_key_value_heads x head_dim; rotary on `spec.rotary_dim` dims of each head.
    gpt-oss: `sinks` (a learned sink logit per head) and `windows` (per layer: a sliding window, 0 =
    full attention; layers past the tuple's end are full)."""

    sinks: bool = False
    windows: tuple[int, ...] = ()
    shared_kv: ClassVar[bool] = False  # K and V are separate halves of the cache

    def build(self, cfg: ModelConfig, spec: DecoderSpec, layer_idx: int = 0) -> nn.Module:
        return Attention(
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            qkv_bias=spec.qkv_bias,
            o_bias=spec.o_bias,
            qk_norm=spec.qk_norm,
            norm_eps=spec.rms_norm_eps,
            clip_qkv=spec.clip_qkv,
            sinks=self.sinks,
            window=self.windows[layer_idx] if layer_idx < len(self.windows) else 0,
        )

    def cache_layout(self, cfg: ModelConfig) -> tuple[int, int]:
        return cfg.num_kv_heads, cfg.head_dim

    def rotary(self, cfg: ModelConfig, spec: DecoderSpec) -> RotaryEmbedding:
        return RotaryEmbedding(cfg.hf, cfg.head_dim, rotary_dim=spec.rotary_dim)


@dataclass(frozen=True)
class DecoderSpec:
    """What distinguishes one family's decoder layers from another's."""

    rms_norm_eps: float
    intermediate_size: int  # dense MLP width (dense layers)
    attention: AttentionKind = field(default_factory=GQA)  # GQA() | mla.MLA(...)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str | None = None  # None | "head" | "full"
    clip_qkv: float | None = None
    moe_layers: tuple[int, ...] = ()  # indices of sparse MoE layers
    moe_prefix: str = "mlp"  # HF module name of the MoE block inside a layer
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = True  # sigmoid(shared_expert_gate(x)) scales the shared expert (Qwen2-MoE)
    shared_expert_prefix: str = "shared_expert"  # HF module name of the shared expert(s) in the MoE block
    router_fp32: bool | None = None  # router weight + logits in float32 (None: sigmoid routers only)
    router_bias: bool = False  # the router linear has a bias (gpt-oss)
    expert_bias: bool = False  # routed experts have gate_up / down biases (gpt-oss)
    expert_activation: ClampedSwiGLU | None = None  # None: silu(gate) * up
    expert_names: ExpertNames = ExpertNames()
    rule: CheckpointRule | None = None
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    rotary_dim: int | None = None  # rotary on the first rotary_dim dims of each head (None = all)
    # the layer module: (config, spec, layer index) -> a module like `DecoderLayer` (None = DecoderLayer)
    layer: Callable[[ModelConfig, DecoderSpec, int], nn.Module] | None = None
    num_layers: int | None = None  # decoder layers (None = config.num_layers)
    attention_per_layer: int = 1  # attention sublayers (paged caches) per decoder layer


class DecoderLayer(nn.Module):
    """One pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)); the MLP is dense or MoE.

    The contract of a spec's `layer` module: `is_moe`, `forward(x, cos, sin, kv_caches, batch)`
    with its `spec.attention_per_layer` paged caches, and `load_hf(ws, prefix, device, spec)`."""

    def __init__(self, cfg: ModelConfig, spec: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        H = cfg.hidden_size
        self.is_moe = layer_idx in spec.moe_layers
        self.input_layernorm = RMSNorm(H, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(H, spec.rms_norm_eps)
        self.self_attn = spec.attention.build(cfg, spec, layer_idx)
        self.mlp: nn.Module
        if self.is_moe:
            assert spec.rule is not None
            self.mlp = MoEBlock(
                H,
                spec.moe_intermediate_size,
                spec.rule,
                shared_inter=spec.shared_expert_intermediate_size,
                shared_gate=spec.shared_expert_gate,
                shared_prefix=spec.shared_expert_prefix,
                router_fp32=spec.router_fp32,
                router_bias=spec.router_bias,
                expert_bias=spec.expert_bias,
                activation=spec.expert_activation,
            )
        else:
            self.mlp = GatedMLP(H, spec.intermediate_size, bias=spec.mlp_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_caches: list[torch.Tensor],
        batch: ForwardBatch,
    ) -> torch.Tensor:
        fused = None
        if isinstance(self.self_attn, Attention):  # decode on the CPU: the block in one native call
            fused = self.self_attn.forward_block(
                x, self.input_layernorm, self.post_attention_layernorm, cos, sin, kv_caches[0], batch
            )
        if fused is not None:
            y, h = fused  # norm(h), h = x + attn(norm(x)): [T, H] each
        else:
            a = self.self_attn(self.input_layernorm(x), cos, sin, kv_caches[0], batch)  # [T, H]
            y, h = self.post_attention_layernorm.forward_add(x, a)  # norm(h), h = x + a: [T, H] each
        if self.is_moe:  # on the CPU: router, routing, experts and the residual add in one native call
            out = self.mlp.forward_block(y, h, batch)
            if out is not None:
                return out  # [T, H]
        return h + self.mlp(y, batch)  # [T, H]

    def load_hf(self, ws: WeightSource, prefix: str, device: torch.device | str, spec: DecoderSpec) -> None:
        self.input_layernorm.load_hf(ws, f"{prefix}.input_layernorm.weight", device)
        self.post_attention_layernorm.load_hf(ws, f"{prefix}.post_attention_layernorm.weight", device)
        self.self_attn.load_hf(ws, f"{prefix}.self_attn", device)
        if self.is_moe:
            # transformers-5 state dicts name every family's MoE block `mlp` (fused experts)
            moe = f"{prefix}.{spec.moe_prefix}"
            router = spec.expert_names.router
            if not ws.has(f"{moe}.{router}.weight") and ws.has(f"{prefix}.mlp.{router}.weight"):
                moe = f"{prefix}.mlp"
            self.mlp.load_hf(ws, moe, device, spec.expert_names)
        else:
            self.mlp.load_hf(ws, f"{prefix}.mlp", device)


class DecoderForCausalLM(CausalLM):
    """A decoder-only LM built from a `DecoderSpec`; subclasses implement `make_spec`.

    Construction allocates parameters on the current default device (the loader builds under the
    meta device and `load_weights` materialises every parameter on `device` in `dtype`).
    """

    def __init__(self, config: ModelConfig, *, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        self.spec = self.make_spec(config)
        self.dtype = torch_dtype(config.dtype)
        self.device = torch.device(device)
        spec = self.spec
        if spec.sliding_window is not None and spec.sliding_window < config.max_model_len:
            logger.warning(
                "%s: config has sliding_window=%d but attention is over the full context; outputs differ "
                "from the checkpoint's for sequences longer than the window",
                config.architecture,
                spec.sliding_window,
            )
        H = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, H)
        make_layer = spec.layer or DecoderLayer
        self.layers = nn.ModuleList([make_layer(config, spec, i) for i in range(spec.num_layers or config.num_layers)])
        self.norm = RMSNorm(H, spec.rms_norm_eps)
        self.lm_head = Linear(H, config.vocab_size, bias=False)
        self.rotary = spec.attention.rotary(config, spec)
        self.moe_layer_ids = [i for i, layer in enumerate(self.layers) if layer.is_moe]
        self.num_moe_layers = len(self.moe_layer_ids)
        self.requires_grad_(False)

    @classmethod
    def make_spec(cls, config: ModelConfig) -> DecoderSpec:
        raise NotImplementedError

    @classmethod
    def kv_cache_layout(cls, model_config: ModelConfig) -> tuple[int, int, int, bool]:
        """(attention layers, heads, head dim, shared K/V) of the paged cache, from the spec's attention kind."""
        spec = cls.make_spec(model_config)
        heads, head_dim = spec.attention.cache_layout(model_config)
        layers = (spec.num_layers or model_config.num_layers) * spec.attention_per_layer
        return layers, heads, head_dim, spec.attention.shared_kv

    @property
    def num_attention_layers(self) -> int:
        return len(self.layers) * self.spec.attention_per_layer

    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        x = F.embedding(batch.input_ids, self.embed_tokens.weight)  # [T, H]
        cos, sin = self.rotary(batch.positions, x.dtype)  # [T, rotary_dim] each
        n = self.spec.attention_per_layer
        if len(kv_caches) != len(self.layers) * n:
            raise ValueError(f"expected {len(self.layers) * n} KV caches, got {len(kv_caches)}")
        start = 0
        native = self._native_layers(kv_caches)
        if native is not None and batch.router_records is None and native.takes(x, cos, sin, batch):
            x, start = self._forward_native(native, x, cos, sin, batch)
        for i in range(start, len(self.layers)):
            x = self.layers[i](x, cos, sin, kv_caches[i * n : (i + 1) * n], batch)
        return self.norm(x)  # [T, H]

    # the whole decode step's layers in one native call (CPU, every layer plain attention + a fusable
    # MoE block): no Python between the layers' kernels
    native_decode: bool = True  # set False to run each layer's blocks by itself (benchmarks timing a block)

    def _native_layers(self, kv_caches: list[torch.Tensor]):  # noqa: ANN202
        """The `dynserve_kernels.decode_layers` plan of this model over these caches (built once per set
        of caches), or None where the layers do not all fit it."""
        key = (self.native_decode, tuple(c.data_ptr() for c in kv_caches))
        hit = self.__dict__.get("_native_plan")
        if hit is not None and hit[0] == key:
            return hit[1]
        plan = None
        layers = list(self.layers)
        if (
            self.native_decode
            and self.spec.attention_per_layer == 1
            and layers
            and all(
                type(layer) is DecoderLayer
                and layer.is_moe
                and isinstance(layer.self_attn, Attention)
                and layer.self_attn.fusable_block()
                and layer.mlp.fused_blocks
                and layer.mlp.backend == "cpu"
                and layer.mlp._fusable()
                for layer in layers
            )
        ):
            a0 = layers[0].self_attn
            eps = {(lay.input_layernorm.eps, lay.post_attention_layernorm.eps, lay.self_attn.scale) for lay in layers}
            if len(eps) == 1:
                in_eps, post_eps, scale = eps.pop()
                weights = [
                    DecodeLayerWeights(
                        lay.input_layernorm.weight,
                        lay.self_attn.qkv_proj.weight,
                        lay.self_attn.o_proj.weight,
                        lay.post_attention_layernorm.weight,
                        kv,
                        lay.mlp.gate.weight,
                        lay.mlp.w13,
                        lay.mlp.w2,
                    )  # fmt: skip
                    for lay, kv in zip(layers, kv_caches, strict=True)
                ]
                plan = dynserve_kernels.decode_layers(weights, a0.num_heads, in_eps, post_eps, scale, a0.backend)
        self.__dict__["_native_plan"] = (key, plan)
        return plan

    def _forward_native(self, native, x, cos, sin, batch: ForwardBatch) -> tuple[torch.Tensor, int]:  # noqa: ANN001
        """Run the decode layers natively: -> (x after them, the first layer left to the caller, i.e.
        len(layers), or where the routing of a layer could not be fused: its MoE then runs op by op
        here and the native call resumes after it)."""
        L = len(self.layers)
        rows = tuple(fused_route_rows(batch.routing, layer.mlp.rule, i) for i, layer in enumerate(self.layers))
        if any(r is None for r in rows):
            return x, 0
        x = x.contiguous()
        start = 0
        while start < L:
            r = native.run(x, cos, sin, batch.slot_mapping, batch, rows, batch.routing.config_index, start)
            pairs = r.pairs.tolist()
            for i in range(start, r.stop):
                P, E = pairs[i], self.layers[i].mlp.num_experts
                batch.assignments.append(
                    Assignment(x.shape[0], E, r.token_ids[i, :P], r.expert_ids[i, :P], r.weights[i, :P],
                               r.offsets[i], expert_counts=r.expert_counts[i])
                )  # fmt: skip
                batch.expert_counts.append(r.token_counts[i])  # [T]
                if batch.expert_token_counts is not None:
                    batch.expert_token_counts.append(r.expert_counts[i])  # [E]
            if r.stop == L:
                break
            x = (r.h + self.layers[r.stop].mlp(r.y, batch)).contiguous()  # a near-tie: this MoE op by op
            start = r.stop + 1
        return x, L

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [S, V]

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        ws = WeightSource(weights, self.dtype)
        dev = self.device
        name = "model.embed_tokens.weight"
        assign_param(self.embed_tokens, "weight", ws.get(name), dev, name)
        for i, layer in enumerate(self.layers):
            layer.load_hf(ws, f"model.layers.{i}", dev, self.spec)
        self.norm.load_hf(ws, "model.norm.weight", dev)
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            assign_param(self.lm_head, "weight", ws.get("lm_head.weight"), dev, "lm_head.weight")
        left = [n for n, prm in self.named_parameters() if prm.is_meta]
        if left:
            raise ValueError(f"parameters not loaded from the checkpoint: {left}")


def moe_layer_indices(hf: dict, num_layers: int, num_experts: int) -> tuple[int, ...]:
    """Qwen-style layer sparsity: layer i is MoE unless in `mlp_only_layers`, and only every
    `decoder_sparse_step`-th layer (1-based) is sparse."""
    step = hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or [])
    return tuple(i for i in range(num_layers) if i not in dense and num_experts > 0 and (i + 1) % step == 0)
