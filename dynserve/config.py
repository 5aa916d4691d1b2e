"""Typed configuration: one `EngineConfig` flows from the CLI / `LLM(...)` to every subsystem.

Owns: RoutingConfig (per-engine default and per-request override), ModelConfig (what the
engine needs to know about a checkpoint, parsed from its config.json), CacheConfig,
SchedulerConfig, and EngineConfig which bundles them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

RoutingPolicyName = Literal["top_k", "top_p", "threshold", "relative", "entropy"]
ROUTING_POLICIES: tuple[str, ...] = ("top_k", "top_p", "threshold", "relative", "entropy")
PER_LAYER_ROUTING_FIELDS: tuple[str, ...] = ("p", "threshold", "k")  # may hold one value per MoE layer


_UNSET: Any = object()  # a RoutingConfig field the caller did not give


DEMO_MODEL_NAME = "dynserve-demo"  # the served id of the embedded demo model


def default_model_dir() -> str:
    """Path of the model shipped inside the package (dynserve/assets/default_model)."""
    return str(Path(__file__).resolve().parent / "assets" / "default_model")


def default_served_model_name(model_dir: str | os.PathLike) -> str:
    """The model id served when none is given: the checkpoint directory's name (`/data/Qwen3-30B-A3B/`
    -> `Qwen3-30B-A3B`), `dynserve-demo` for the embedded model; never a machine-specific path."""
    path = Path(model_dir).resolve()
    if path == Path(default_model_dir()):
        return DEMO_MODEL_NAME
    return path.name or str(model_dir)


def _is_number(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


def _layer_values(v: object, name: str) -> tuple:
    """The values of a field that is one value or a per-layer tuple (which must not be empty)."""
    if isinstance(v, tuple):
        if not v:
            raise ValueError(f"routing.{name} must not be an empty list")
        return v
    return (v,)


@dataclass(frozen=True)
class RoutingConfig:
    """How a MoE layer picks experts for a token.

    policy:
      - "top_k": the checkpoint's own rule (its k, its renormalisation), or `k` if given.
      - "top_p": sort softmax probabilities descending, keep the smallest prefix whose cumulative
        probability reaches `p` (Huang et al., 2024).
      - "threshold": keep experts whose probability is >= `threshold`.
      - "relative": keep experts whose probability is >= `threshold` x the token's top probability
        (ik_llama.cpp's SER; the top expert is always kept).
      - "entropy": k from the Shannon entropy H (nats) of the token's routing probabilities:
        `entropy_thresholds` [h1, ..., hn] ascending, `entropy_k` [k0, ..., kn]; H < h1 -> k0,
        h_i <= H < h_(i+1) -> k_i, H >= hn -> kn; then the top k.
    `p`, `threshold` and `k` are one value for every MoE layer or a list (a tuple once made) with one
    value per MoE layer (`check_layers` checks the length against a model).
    The number of experts is clamped to [min_experts, max_experts] (max_experts None = all).
    renormalize None = do what the checkpoint's top-k rule does.
    Models with native dynamic routing (ReLU routers, zero-computation experts) ignore the policy
    and route as their checkpoint defines.

    One rule for a request's routing, in Python and over HTTP: the fields it sets override the
    engine's default routing, the others keep the default (`engine_default.overlay(request)`).
    `RoutingConfig(policy="top_p")` sets only `policy`: with an engine default of top_p p=0.3 and
    max_experts=4 it keeps p=0.3 and max_experts=4. `explicit_fields` names what was set.
    """

    policy: str = "top_k"
    p: float | tuple[float, ...] = 0.5
    threshold: float | tuple[float, ...] = 0.2
    k: int | tuple[int, ...] | None = None
    min_experts: int = 1
    max_experts: int | None = None
    renormalize: bool | None = None
    entropy_thresholds: tuple[float, ...] = (0.6, 1.2)
    entropy_k: tuple[int, ...] = (1, 2, 4)

    def __init__(
        self,
        policy: str = _UNSET,  # type: ignore[assignment]
        p: float = _UNSET,  # type: ignore[assignment]
        threshold: float = _UNSET,  # type: ignore[assignment]
        k: int | None = _UNSET,  # type: ignore[assignment]
        min_experts: int = _UNSET,  # type: ignore[assignment]
        max_experts: int | None = _UNSET,  # type: ignore[assignment]
        renormalize: bool | None = _UNSET,  # type: ignore[assignment]
        entropy_thresholds: Sequence[float] = _UNSET,  # type: ignore[assignment]
        entropy_k: Sequence[int] = _UNSET,  # type: ignore[assignment]
    ) -> None:
        given = dict(
            policy=policy, p=p, threshold=threshold, k=k, min_experts=min_experts,
            max_experts=max_experts, renormalize=renormalize, entropy_thresholds=entropy_thresholds,
            entropy_k=entropy_k,
        )  # fmt: skip
        explicit = frozenset(name for name, v in given.items() if v is not _UNSET)
        for f in fields(self):
            value = given[f.name]
            if isinstance(value, list):  # lists become tuples: a config is hashable (prefix-cache keys)
                value = tuple(value)
            object.__setattr__(self, f.name, f.default if value is _UNSET else value)
        object.__setattr__(self, "_explicit", explicit)  # not a field: outside eq, hash and repr
        self.validate()

    @property
    def explicit_fields(self) -> frozenset[str]:
        """The fields given when this config was made (all of them for `dataclasses.replace`)."""
        return self._explicit  # type: ignore[attr-defined]

    def overlay(self, request: RoutingConfig | None) -> RoutingConfig:
        """This (engine default) config with the fields `request` set taken from `request`."""
        if request is None or not request.explicit_fields:
            return self
        return replace(self, **{name: getattr(request, name) for name in request.explicit_fields})

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        if self.policy not in ROUTING_POLICIES:
            raise ValueError(f"routing.policy must be one of {list(ROUTING_POLICIES)}, got {self.policy!r}")
        for v in _layer_values(self.p, "p"):
            if not _is_number(v) or not (0.0 < v <= 1.0):
                raise ValueError(f"routing.p must be a number in (0, 1] (or a list of them), got {self.p!r}")
        for v in _layer_values(self.threshold, "threshold"):
            if not _is_number(v) or not (0.0 <= v <= 1.0):
                raise ValueError(
                    f"routing.threshold must be a number in [0, 1] (or a list of them), got {self.threshold!r}"
                )
        if self.k is not None:
            for v in _layer_values(self.k, "k"):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"routing.k must be a positive integer (or a list of them), got {self.k!r}")
        thr, ks = self.entropy_thresholds, self.entropy_k
        if (
            not isinstance(thr, tuple)
            or not all(_is_number(h) and 0.0 <= h < float("inf") for h in thr)
            or any(a >= b for a, b in zip(thr, thr[1:], strict=False))
        ):
            raise ValueError(f"routing.entropy_thresholds must be strictly ascending finite numbers >= 0, got {thr!r}")
        if not isinstance(ks, tuple) or not all(not isinstance(v, bool) and isinstance(v, int) and v >= 0 for v in ks):
            raise ValueError(f"routing.entropy_k must be a list of integers >= 0, got {ks!r}")
        if len(ks) != len(thr) + 1:
            raise ValueError(
                f"routing.entropy_k must have one more entry than routing.entropy_thresholds "
                f"({len(thr)} thresholds -> {len(thr) + 1} k values), got {len(ks)}"
            )
        if isinstance(self.min_experts, bool) or not isinstance(self.min_experts, int) or self.min_experts < 0:
            raise ValueError(f"routing.min_experts must be an integer >= 0, got {self.min_experts!r}")
        if self.max_experts is not None and (
            isinstance(self.max_experts, bool) or not isinstance(self.max_experts, int) or self.max_experts < 1
        ):
            raise ValueError(f"routing.max_experts must be an integer >= 1, got {self.max_experts!r}")
        if self.max_experts is not None and self.max_experts < self.min_experts:
            raise ValueError(
                f"routing.max_experts ({self.max_experts}) must be >= routing.min_experts ({self.min_experts})"
            )

    def check_layers(self, num_moe_layers: int) -> None:
        """Raise ValueError naming the field when a per-layer list does not have one value per MoE layer."""
        for name in PER_LAYER_ROUTING_FIELDS:
            v = getattr(self, name)
            if isinstance(v, tuple) and len(v) != num_moe_layers:
                raise ValueError(
                    f"routing.{name} has {len(v)} values; a per-layer list needs one per MoE layer "
                    f"({num_moe_layers} in this model)"
                )

    def at_layer(self, name: str, layer: int) -> Any:
        """The value of a per-layer field (`p`, `threshold`, `k`) at MoE layer `layer`."""
        v = getattr(self, name)
        return v[layer] if isinstance(v, tuple) else v

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoutingConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown routing field(s): {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> RoutingConfig:
        """A routing file (`dynserve calibrate-routing --out`): JSON with the fields under "routing"
        (other keys, such as "calibration", are notes), or the fields at the top level."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read routing file {str(path)!r}: {e}") from None
        if isinstance(d, dict) and isinstance(d.get("routing"), dict):
            d = d["routing"]
        if not isinstance(d, dict):
            raise ValueError(f"routing file {str(path)!r} must hold a JSON object")
        return cls.from_dict(d)


@dataclass
class ModelConfig:
    """What the engine needs to know about a checkpoint. `hf` keeps the raw config.json for the
    architecture classes; the common fields are normalised here."""

    model_dir: str
    architecture: str
    hf: dict[str, Any]
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_model_len: int
    dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    num_experts: int = 0  # routed FFN experts per MoE layer (0 for dense models)
    top_k: int = 0  # checkpoint's experts per token

    @classmethod
    def from_dir(
        cls, model_dir: str | os.PathLike, dtype: str = "auto", max_model_len: int | None = None
    ) -> ModelConfig:
        path = Path(model_dir)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"no config.json in model directory {str(path)!r}")
        hf = json.loads(cfg_path.read_text())
        archs = hf.get("architectures") or []
        if not archs:
            raise ValueError(f"{cfg_path}: config.json has no 'architectures' entry")
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        head_dim = hf.get("head_dim") or hidden // num_heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        num_experts = hf.get("num_local_experts") or hf.get("num_experts") or hf.get("n_routed_experts") or 0
        top_k = hf.get("num_experts_per_tok") or hf.get("moe_topk") or 0
        ctx = hf.get("max_position_embeddings", 2048)
        if dtype == "auto":
            dtype = "float32"  # CPU default; bfloat16 on request
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {dtype!r}")
        return cls(
            model_dir=str(path),
            architecture=archs[0],
            hf=hf,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            num_layers=hf.get("num_hidden_layers") or hf["num_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_model_len=min(max_model_len, ctx) if max_model_len else ctx,
            dtype=dtype,
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
            num_experts=int(num_experts),
            top_k=int(top_k),
        )


@dataclass
class CacheConfig:
    """Paged KV cache. The pool is `num_kv_blocks` blocks of `block_size` tokens, or sized from
    `kv_cache_memory_bytes` when num_kv_blocks is None."""

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int = 2 * 1024**3
    enable_prefix_caching: bool = True


@dataclass
class SchedulerConfig:
    """Continuous batching limits per step."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    max_queued_requests: int | None = None


@dataclass
class EngineConfig:
    """Everything an engine instance is built from."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    device: str = "cpu"
    seed: int = 0
    use_triton: bool | None = None  # None: Triton on CUDA, the CPU path ("cpu" backend) on CPU
    record_expert_token_counts: bool = False  # per-(layer, expert) counts (high cardinality)
    served_model_name: str | None = None
    # expert parallelism (dynserve/engine/expert_parallel.py): ranks, machines, this machine, rendezvous
    expert_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # HOST:PORT of rank 0 (required with nnodes > 1)
    # a worker rank whose heartbeat is older than this (died, frozen) fails the engine; workers exit when
    # rank 0's is (every node must use the same value)
    expert_parallel_heartbeat_timeout: float = 10.0

    @classmethod
    def create(
        cls,
        model_dir: str | os.PathLike | None = None,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        seed: int = 0,
        max_model_len: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_bytes: int = 2 * 1024**3,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 128,
        max_num_batched_tokens: int = 2048,
        enable_chunked_prefill: bool = True,
        max_queued_requests: int | None = None,
        routing: RoutingConfig | dict[str, Any] | None = None,
        use_triton: bool | None = None,
        record_expert_token_counts: bool = False,
        served_model_name: str | None = None,
        expert_parallel_size: int = 1,
        nnodes: int = 1,
        node_rank: int = 0,
        dist_init_addr: str | None = None,
        expert_parallel_heartbeat_timeout: float = 10.0,
    ) -> EngineConfig:
        """Build a config from flat keyword options (the names `LLM(...)` and the CLI use)."""
        if model_dir is None:
            model_dir = default_model_dir()
        if isinstance(routing, dict):
            routing = RoutingConfig.from_dict(routing)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if expert_parallel_size < 1 or nnodes < 1 or not (0 <= node_rank < nnodes):
            raise ValueError(
                f"need expert_parallel_size >= 1, nnodes >= 1, 0 <= node_rank < nnodes; got "
                f"{expert_parallel_size}, {nnodes}, {node_rank}"
            )
        if not expert_parallel_heartbeat_timeout > 0:
            raise ValueError(
                f"expert_parallel_heartbeat_timeout must be > 0 seconds, got {expert_parallel_heartbeat_timeout}"
            )
        model = ModelConfig.from_dir(model_dir, dtype=dtype, max_model_len=max_model_len)
        if expert_parallel_size > 1 and model.num_experts < expert_parallel_size:
            raise ValueError(
                f"expert_parallel_size ({expert_parallel_size}) exceeds the model's experts per layer "
                f"({model.num_experts})"
            )
        if not enable_chunked_prefill and max_num_batched_tokens < model.max_model_len:
            raise ValueError("max_num_batched_tokens must be >= max_model_len when chunked prefill is disabled")
        return cls(
            model=model,
            cache=CacheConfig(block_size, num_kv_blocks, kv_cache_memory_bytes, enable_prefix_caching),
            scheduler=SchedulerConfig(
                max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, max_queued_requests
            ),
            routing=routing or RoutingConfig(),
            device=device,
            seed=seed,
            use_triton=use_triton,
            record_expert_token_counts=record_expert_token_counts,
            served_model_name=served_model_name,
            expert_parallel_size=expert_parallel_size,
            nnodes=nnodes,
            node_rank=node_rank,
            dist_init_addr=dist_init_addr,
            expert_parallel_heartbeat_timeout=float(expert_parallel_heartbeat_timeout),
        )

    @property
    def model_name(self) -> str:
        """The served model id: `served_model_name`, else the directory's name (`dynserve-demo` for the
        embedded model)."""
        return self.served_model_name or default_served_model_name(self.model.model_dir)

    def with_routing(self, routing: RoutingConfig) -> EngineConfig:
        return replace(self, routing=routing)
