"""Typed configuration: one `EngineConfig` flows from the CLI / `LLM(...)` to every subsystem.

Owns: RoutingConfig (per-engine default and per-request override), ModelConfig (what the
engine needs to know about a checkpoint, parsed from its config.json), CacheConfig,
SchedulerConfig, and EngineConfig which bundles them.
"""

from __future__ import annotations

import json
import math
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


CHECKPOINT_ROUTING_FILE = "routing.json"


def checkpoint_routing(model_dir: str | os.PathLike) -> RoutingConfig | None:
    """The default routing a checkpoint carries: `routing.json` in its directory (RoutingConfig file
    format, `RoutingConfig.from_file`), or None without one. `dynserve.bench.train_demo --routing top_p`
    writes it, so a model trained with top-p routing is served with the rule it was trained with."""
    path = Path(model_dir) / CHECKPOINT_ROUTING_FILE
    return RoutingConfig.from_file(path) if path.is_file() else None


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

    Steering (per request; MoE layers counted from 0 among the MoE layers, as in usage `per_layer`):
      - `exclude_experts`: expert ids never used, in every MoE layer (a list) or per layer
        (`{layer: [ids]}`); they get -inf router logits and are removed from the assignment, so a
        token may end up with fewer than `min_experts`. Excluding every expert of a layer needs
        min_experts = 0 (such tokens use no expert there: only the residual passes).
      - `expert_bias`: one float per expert added to the router logits before the policy, for every
        MoE layer (a list) or per layer (`{layer: [floats]}`); |bias| <= 1e6.
    Both are stored normalised and hashable (sorted tuples; per-layer forms as (layer, values)
    pairs), so they key the prefix cache like the rest of the config.

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
    # "auto": follow the server's load-adaptive expert budget (when it runs one); "fixed": never reduced.
    # Not in the repr: the KV a request computes depends on its effective routing, not on this flag.
    budget: str = field(default="auto", repr=False)
    exclude_experts: SteeringValue | None = None
    expert_bias: SteeringValue | None = None

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
        exclude_experts: Any = _UNSET,
        expert_bias: Any = _UNSET,
        budget: str = _UNSET,  # type: ignore[assignment]
    ) -> None:
        if exclude_experts is not _UNSET:
            exclude_experts = _normalise_steering(exclude_experts, "routing.exclude_experts", int)
        if expert_bias is not _UNSET:
            expert_bias = _normalise_steering(expert_bias, "routing.expert_bias", float)
        given = dict(
            policy=policy, p=p, threshold=threshold, k=k, min_experts=min_experts,
            max_experts=max_experts, renormalize=renormalize, entropy_thresholds=entropy_thresholds,
            entropy_k=entropy_k, exclude_experts=exclude_experts, expert_bias=expert_bias, budget=budget,
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
        if self.budget not in ("auto", "fixed"):
            raise ValueError(f"routing.budget must be 'auto' or 'fixed', got {self.budget!r}")
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

    @property
    def steers(self) -> bool:
        """True when this config excludes experts or biases the router."""
        return bool(self.exclude_experts) or bool(self.expert_bias)

    def excluded_in(self, layer: int) -> tuple[int, ...]:
        """The expert ids excluded in MoE layer `layer`."""
        return _for_layer(self.exclude_experts, layer) or ()

    def bias_in(self, layer: int) -> tuple[float, ...] | None:
        """The expert bias of MoE layer `layer` (None: none)."""
        return _for_layer(self.expert_bias, layer)

    def steering_row(self, layer: int, num_experts: int) -> tuple[float, ...] | None:
        """What MoE layer `layer` adds to its router logits [E]: the bias, -inf at excluded experts;
        None when this config does not steer that layer."""
        excluded, bias = self.excluded_in(layer), self.bias_in(layer)
        if not excluded and bias is None:
            return None
        row = list(bias) if bias is not None else [0.0] * num_experts
        for e in excluded:
            row[e] = float("-inf")
        return tuple(row)

    def check_model(self, num_experts: int, num_moe_layers: int) -> None:
        """Check the steering fields against a model (ids and layers in range, one bias per expert, a
        layer with every expert excluded only with min_experts = 0); raise ValueError naming the field."""
        for name, value in (("exclude_experts", self.exclude_experts), ("expert_bias", self.expert_bias)):
            for layer, _ in _layer_items(value):
                if layer is not None and layer >= num_moe_layers:
                    raise ValueError(
                        f"routing.{name}: MoE layer {layer} is out of range (the model has {num_moe_layers} "
                        "MoE layers, numbered from 0)"
                    )
        for _, ids in _layer_items(self.exclude_experts):
            bad = [e for e in ids if e >= num_experts]
            if bad:
                raise ValueError(
                    f"routing.exclude_experts: expert id {bad[0]} is out of range (the model has {num_experts} "
                    "experts per MoE layer, numbered from 0)"
                )
        for _, values in _layer_items(self.expert_bias):
            if len(values) != num_experts:
                raise ValueError(
                    f"routing.expert_bias must hold one number per expert ({num_experts}), got {len(values)}"
                )
        if self.min_experts > 0:
            layers = range(num_moe_layers)
            full = [layer for layer in layers if len(set(self.excluded_in(layer))) >= num_experts]
            if full:
                raise ValueError(
                    f"routing.exclude_experts excludes every expert of MoE layer {full[0]}: a token could use "
                    "no expert there, which needs routing.min_experts = 0"
                )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoutingConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown routing field(s): {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}
        for name in ("exclude_experts", "expert_bias"):
            out[name] = _steering_to_json(getattr(self, name))
        return out

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


# exclude_experts / expert_bias, normalised: values for every MoE layer, or (layer, values) pairs
SteeringValue = tuple[Any, ...]
MAX_STEERING_VALUES = 65536  # experts per layer a request may name (bounded work per request)
MAX_EXPERT_BIAS = 1e6


def _normalise_steering(value: Any, name: str, kind: type) -> SteeringValue | None:
    """A list (every MoE layer) or a {layer: list} mapping -> the hashable normalised form; ValueError
    naming `name` for a wrong type, a negative id or layer, a non-finite or too large bias."""
    if value is None:
        return None
    if isinstance(value, dict):
        pairs = []
        for key, values in value.items():
            layer = _layer_key(key, name)
            pairs.append((layer, _values(values, f"{name}.{layer}", kind)))
        pairs.sort()
        return tuple(pairs)
    if isinstance(value, tuple) and value and all(isinstance(x, tuple) and len(x) == 2 for x in value):
        return _normalise_steering(dict(value), name, kind)  # already normalised (replace, from_dict)
    return _values(value, name, kind)


def _layer_key(key: Any, name: str) -> int:
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    raise ValueError(f"{name}: layer keys must be MoE layer indices (integers >= 0), got {key!r}")


def _values(values: Any, name: str, kind: type) -> tuple:
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{name} must be a list, or a mapping from MoE layer to a list, got {type(values).__name__}")
    if len(values) > MAX_STEERING_VALUES:
        raise ValueError(f"{name} may hold at most {MAX_STEERING_VALUES} values, got {len(values)}")
    if kind is int:
        for e in values:
            if isinstance(e, bool) or not isinstance(e, int) or e < 0:
                raise ValueError(f"{name} must hold expert ids (integers >= 0), got {e!r}")
        return tuple(sorted(set(values)))
    out = []
    for b in values:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or abs(b) > MAX_EXPERT_BIAS:
            raise ValueError(f"{name} must hold finite numbers with |bias| <= {MAX_EXPERT_BIAS:g}, got {b!r}")
        out.append(float(b))
    if not out:
        raise ValueError(f"{name} must not be empty")
    return tuple(out)


def _is_per_layer(value: SteeringValue | None) -> bool:
    return bool(value) and isinstance(value[0], tuple)  # type: ignore[index]


def _layer_items(value: SteeringValue | None) -> list[tuple[int | None, tuple]]:
    """(layer or None for every layer, values) of a normalised steering value."""
    if not value:
        return []
    return list(value) if _is_per_layer(value) else [(None, value)]


def _for_layer(value: SteeringValue | None, layer: int) -> Any:
    if not value:
        return None
    if not _is_per_layer(value):
        return value
    for key, values in value:
        if key == layer:
            return values
    return None


def _steering_to_json(value: SteeringValue | None) -> Any:
    if not value:
        return None
    if _is_per_layer(value):
        return {str(layer): list(values) for layer, values in value}
    return list(value)


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


BUDGET_MODES: tuple[str, ...] = ("off", "auto")  # --expert-budget (dynserve/engine/budget.py)


@dataclass(frozen=True)
class BudgetConfig:
    """`mode` "off" (default) or "auto"; `floor`: the smallest b (0.5 = at most halve the experts);
    `target_itl_ms`: optional decode-step-time target that also counts as overload when exceeded."""

    mode: str = "off"
    floor: float = 0.5
    target_itl_ms: float | None = None
    waiting_high: int = 0
    hold_steps: int = 4
    step_down: float = 0.1
    step_up: float = 0.05
    under_itl_fraction: float = 0.8

    def __post_init__(self) -> None:
        if self.mode not in BUDGET_MODES:
            raise ValueError(f"expert budget must be one of {list(BUDGET_MODES)}, got {self.mode!r}")
        if not (0.0 < self.floor <= 1.0):
            raise ValueError(f"expert budget floor must be in (0, 1], got {self.floor}")
        if self.target_itl_ms is not None and not (0.0 < self.target_itl_ms < math.inf):
            raise ValueError(f"target ITL must be a positive number of milliseconds, got {self.target_itl_ms}")
        if self.hold_steps < 1 or not (0 < self.step_down <= 1) or not (0 < self.step_up <= 1):
            raise ValueError("hold_steps must be >= 1 and the budget steps in (0, 1]")

    @property
    def enabled(self) -> bool:
        return self.mode == "auto"


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
    expert_budget: BudgetConfig = field(default_factory=BudgetConfig)  # load-adaptive expert budget
    max_active_experts: int | None = None  # batch-aware expert selection: distinct experts per MoE layer per step

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
        expert_budget: str = "off",
        expert_budget_floor: float = 0.5,
        target_itl_ms: float | None = None,
        max_active_experts: int | None = None,
    ) -> EngineConfig:
        """Build a config from flat keyword options (the names `LLM(...)` and the CLI use).

        The default routing is the checkpoint's `routing.json` (`checkpoint_routing`) when it has one,
        with the fields `routing` sets overriding it; without one, `routing` (or top_k)."""
        if model_dir is None:
            model_dir = default_model_dir()
        if isinstance(routing, dict):
            routing = RoutingConfig.from_dict(routing)
        ckpt_routing = checkpoint_routing(model_dir)
        if ckpt_routing is not None:
            routing = ckpt_routing.overlay(routing)
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
        if max_active_experts is not None and (isinstance(max_active_experts, bool) or max_active_experts < 1):
            raise ValueError(f"max_active_experts must be an integer >= 1, got {max_active_experts!r}")
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
            expert_budget=BudgetConfig(expert_budget, float(expert_budget_floor), target_itl_ms),
            max_active_experts=max_active_experts,
        )

    @property
    def model_name(self) -> str:
        """The served model id: `served_model_name`, else the directory's name (`dynserve-demo` for the
        embedded model)."""
        return self.served_model_name or default_served_model_name(self.model.model_dir)

    def with_routing(self, routing: RoutingConfig) -> EngineConfig:
        return replace(self, routing=routing)
