"""SamplingParams: everything a request says about how to pick its tokens and when to stop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dynserve.config import RoutingConfig

_GREEDY_EPS = 1e-5


def may_stop(num_output_tokens: int, min_tokens: int) -> bool:
    """The min_tokens rule, the one place it is written: the `num_output_tokens`-th output token (the
    count includes it) may end the sequence by EOS, a stop token id or a stop string only when it
    comes after the first `min_tokens` (vLLM's meaning). The sampler masks EOS and stop ids for
    tokens that may not stop; the engine and the detokenizer check stops only for those that may."""
    return num_output_tokens > min_tokens


@dataclass
class SamplingParams:
    """Per-request sampling and stopping options (vLLM's names and meanings).

    temperature 0 means greedy. top_k -1 (or 0) means all tokens. `logprobs` N returns the chosen
    token's log-probability plus the top N; `prompt_logprobs` N does the same for every prompt token
    (None for the first; such a prompt is always computed, never served from the prefix cache).
    max_tokens 0 computes the prompt (and its logprobs) and generates nothing.
    `routing` overrides the engine's default expert routing for this request only.
    `return_routed_experts` returns, per token position and MoE layer, the experts it was routed to
    (`RequestOutput.prompt_routed_experts`, `CompletionOutput.routed_experts`), leaving out the first
    `routed_experts_start_len` prompt positions.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    routing: RoutingConfig | None = None
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.routing, dict):
            self.routing = RoutingConfig.from_dict(self.routing)
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""

        def _int(name: str, v: object) -> None:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        _int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}")
        if self.seed is not None:
            _int("seed", self.seed)
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens)
            if self.max_tokens < 0:
                raise ValueError(f"max_tokens must be at least 0, got {self.max_tokens}")
        _int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        for t in self.stop_token_ids:
            _int("stop_token_ids", t)
        if not isinstance(self.return_routed_experts, bool):
            raise ValueError(f"return_routed_experts must be a boolean, got {self.return_routed_experts!r}")
        _int("routed_experts_start_len", self.routed_experts_start_len)
        if self.routed_experts_start_len < 0:
            raise ValueError(f"routed_experts_start_len must be non-negative, got {self.routed_experts_start_len}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None:
                _int(name, n)
                if not 0 <= n <= 20:
                    raise ValueError(f"{name} must be in [0, 20], got {n}")
