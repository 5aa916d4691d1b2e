"""Per-sequence state shared by the scheduler, block manager, runner and sampler.

Plain Python, no torch. One request with n samples owns n Sequences (same prompt; the prefix
cache lets them share the prompt's KV blocks).
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from dynserve.config import RoutingConfig
from dynserve.engine.outputs import TokenLogprobs
from dynserve.routing.routed import RoutedExpertsBuilder
from dynserve.routing.usage import SequenceUsage
from dynserve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, stop token id, or stop string
    LENGTH = "length"  # max_tokens or context limit
    ABORT = "abort"  # aborted by the client or the server


_seq_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One sequence being generated.

    token_ids = prompt + generated tokens. `num_computed_tokens` tokens have their K/V in the
    cache (prefix-cache hits count as computed). The next forward step processes
    token_ids[num_computed_tokens : num_computed_tokens + n] for the n the scheduler grants;
    a token is sampled when that span reaches the end of token_ids.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    routing: RoutingConfig
    sample_index: int = 0  # which of the request's n samples this is
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # tokens served from the prefix cache at the latest admission
    num_cached_prompt_tokens: int | None = None  # prompt tokens served from it at the first (reported)
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    expert_usage: SequenceUsage = field(default_factory=SequenceUsage)  # FFN experts its positions used
    # with sampling_params.prompt_logprobs: logprobs of prompt tokens 1, 2, ... as computed so far
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # with sampling_params.return_routed_experts: the experts its positions were routed to
    routed_experts: RoutedExpertsBuilder | None = None
    # the routing the request asked for (the engine default overlaid with its own); `routing` is what it
    # runs with: the same, or, under a load-adaptive expert budget, reduced at its first admission
    requested_routing: RoutingConfig | None = None
    expert_budget: float = 1.0  # the budget factor applied at admission (1.0: not reduced)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.requested_routing is None:
            self.requested_routing = self.routing

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True while more than one token is left to compute (prompt or recompute after preemption)."""
        return self.num_uncomputed_tokens > 1

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Preempted: drop the KV cache; keep generated tokens, they are recomputed as a prompt."""
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_table = []
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
