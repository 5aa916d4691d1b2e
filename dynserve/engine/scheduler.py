"""Continuous-batching scheduler. Plain Python, no torch.

Each step packs up to `max_num_batched_tokens` tokens from up to `max_num_seqs` sequences:
running sequences first (a decode takes 1 token, a sequence in the middle of a chunked prefill
takes its next chunk), then waiting sequences in arrival order. When the KV pool runs out, the
most recently admitted running sequence is preempted by recompute: its blocks are freed and it
goes back to the front of the waiting queue, to be prefilled again (prefix-cache hits usually
make that cheap). The later samples of an n > 1 request wait until the first has computed the
shared prompt, then find it in the prefix cache. The scheduler touches the KV pool only through
BlockManager's verbs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dynserve.config import SchedulerConfig
from dynserve.engine.block_manager import BlockManager
from dynserve.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """One sequence in a step and how many of its tokens the step computes, starting at
    seq.num_computed_tokens."""

    seq: Sequence
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    """What one `Scheduler.schedule()` call decided."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Owns the waiting queue and the running list, and decides each step's batch."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # request id -> its first sample, while later samples (n > 1) may wait for its prompt
        self._leads: dict[str, Sequence] = {}

    # ------------------------------------------------------------------ queue
    def add(self, seq: Sequence) -> None:
        """Enqueue a new sequence at the back of the waiting queue."""
        if seq.is_finished:
            raise ValueError(f"sequence {seq.seq_id} is already finished")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        if seq.sample_index == 0:
            self._leads[seq.request_id] = seq

    def _waits_for_sibling(self, seq: Sequence) -> bool:
        """A later sample of an n > 1 request is not admitted while its first sample is still
        computing the shared prompt: once that prompt's full blocks are committed to the prefix
        cache, the later samples reuse them instead of computing the prompt again."""
        if seq.sample_index == 0 or seq.num_computed_tokens or not self.block_manager.enable_prefix_caching:
            return False
        if (seq.num_prompt_tokens - 1) // self.block_manager.block_size == 0:
            return False  # a prefix hit leaves at least one token to compute: no full block to share
        lead = self._leads.get(seq.request_id)
        return lead is not None and not lead.is_finished and lead.num_computed_tokens < lead.num_prompt_tokens

    def can_fit_ever(self, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` tokens (prompt + all it may generate) could ever be
        scheduled: it must fit in the whole KV pool, and in one step's token budget when chunked
        prefill is off (a preempted sequence is recomputed in one go)."""
        if num_tokens < 1:
            return True
        if self.block_manager.num_blocks_for(num_tokens) > self.block_manager.num_total_blocks:
            return False
        if not self.config.enable_chunked_prefill and num_tokens > self.config.max_num_batched_tokens:
            return False
        return True

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    # ------------------------------------------------------------------ step
    def schedule(self, admit: Callable[[Sequence], None] | None = None) -> SchedulerOutput:
        """Pick this step's sequences and token counts; allocate their KV blocks. `admit` is called on a
        waiting sequence about to be admitted for the first time (before its prefix-cache lookup): the
        engine sets its routing there (the load-adaptive expert budget)."""
        bm = self.block_manager
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        # 1. Running sequences, in order. Victims for preemption come off the tail, which is
        #    always at or after the current index, so nothing already scheduled is preempted.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if n <= 0:  # nothing to compute (the engine has not appended its token yet)
                i += 1
                continue
            scheduled = True
            while not bm.can_allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    scheduled = False
                    break
            if not scheduled:
                break
            bm.allocate(seq, n)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1

        # 2. Waiting sequences, first come first served. Skipped after a preemption: the pool is
        #    short, and the sequence just preempted would only be taken back in.
        #    Later samples of an n > 1 request whose prompt is still being computed are passed over.
        if not out.preempted:
            i = 0
            while i < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
                seq = self.waiting[i]
                if self._waits_for_sibling(seq):
                    i += 1
                    continue
                if admit is not None and seq.first_scheduled_time is None and seq.num_computed_tokens == 0:
                    admit(seq)
                n = self._try_admit(seq, budget)
                if n == 0:
                    break
                del self.waiting[i]
                self.running.append(seq)
                seq.status = SequenceStatus.RUNNING
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = time.monotonic()
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n

        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _try_admit(self, seq: Sequence, budget: int) -> int:
        """Look up the prefix cache and allocate for a waiting sequence; return the tokens granted,
        or 0 (holding no blocks) if it cannot start this step."""
        bm = self.block_manager
        matched = False
        if seq.num_computed_tokens == 0 and not seq.block_table and seq.sampling_params.prompt_logprobs is None:
            # (prompt logprobs need every prompt position computed: no prefix-cache hit for those)
            bm.match_prefix(seq, record_stats=False)
            matched = True
        n = seq.num_uncomputed_tokens
        if n > budget:
            n = budget if self.config.enable_chunked_prefill else 0
        if n <= 0 or not bm.can_allocate(seq, n):
            # Give prefix-cache hits back so nothing leaks while it waits.
            bm.free(seq)
            seq.num_computed_tokens = 0
            seq.num_cached_tokens = 0
            return 0
        bm.allocate(seq, n)
        if seq.num_cached_prompt_tokens is None:  # what usage reports: the first admission, never a recompute
            seq.num_cached_prompt_tokens = min(seq.num_cached_tokens, seq.num_prompt_tokens)
        if matched:
            bm.record_prefix_query(len(seq), seq.num_cached_tokens)
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, output: SchedulerOutput) -> None:
        """After the model ran the step: advance computed counts and publish full blocks to the
        prefix cache. (The engine appends sampled tokens itself.)"""
        for item in output.scheduled:
            seq = item.seq
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.commit(seq)

    # ------------------------------------------------------------------ ending
    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark the sequence finished, free its blocks and drop it from the queues."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if self._leads.get(seq.request_id) is seq:
            del self._leads[seq.request_id]
        self.block_manager.free(seq)
        try:
            self.running.remove(seq)
        except ValueError:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of the request with reason ABORT; return them."""
        seqs = [s for s in self.running if s.request_id == request_id]
        seqs += [s for s in self.waiting if s.request_id == request_id]
        for seq in seqs:
            self.finish(seq, FinishReason.ABORT)
        return seqs
