"""What the engine returns to its callers (LLM.generate, AsyncEngine, the server)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dynserve.routing.routed import RoutedExperts
from dynserve.routing.usage import ExpertUsage

__all__ = ["CompletionOutput", "ExpertUsage", "Logprob", "RequestOutput", "RoutedExperts", "TokenLogprobs"]


@dataclass
class Logprob:
    token_id: int
    logprob: float
    decoded: str = ""


@dataclass
class TokenLogprobs:
    """The chosen token's logprob and the top-N alternatives at one position."""

    token_id: int
    logprob: float
    top: list[Logprob] = field(default_factory=list)


@dataclass
class CompletionOutput:
    """One sample of a request. `text`/`token_ids` are cumulative; the *_delta fields hold what
    is new since the previous RequestOutput of the same request (for streaming)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: list[TokenLogprobs] | None = None
    # with SamplingParams.return_routed_experts: one row per generated token whose position was computed
    # (the last token of a finished sequence, never fed through the model, is a None row); the delta
    # holds the rows that became known since the previous output
    routed_experts: RoutedExperts | None = None
    routed_experts_delta: RoutedExperts | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    expert_usage: ExpertUsage = field(default_factory=ExpertUsage)
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # arrival/first_token/finish times
    error: str | None = None  # set (with finished=True) when an error of this request alone ended it
    # with SamplingParams.prompt_logprobs: one entry per prompt token, None for the first
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # with SamplingParams.return_routed_experts: one row per prompt position from routed_experts_start_len
    # on (None rows for positions served from the prefix cache)
    prompt_routed_experts: RoutedExperts | None = None
