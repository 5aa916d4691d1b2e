"""ModelRunner: turns one scheduled step into batch tensors, runs the model, samples tokens.

Owns the model, its paged KV cache tensors, and the sampler. Knows nothing of requests: it sees
(sequence, number of new tokens) pairs and returns sampled tokens and per-sequence expert usage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dynserve.config import EngineConfig
from dynserve.engine.outputs import TokenLogprobs
from dynserve.engine.sampler import Sampler, token_logprobs
from dynserve.engine.sequence import Sequence
from dynserve.model.base import ForwardBatch
from dynserve.model.decoder import torch_dtype
from dynserve.model.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block
from dynserve.model.loader import load_model
from dynserve.routing.base import RoutingBatch
from dynserve.routing.load import ExpertDistributionRecorder, ExpertLoadTracker, sequence_expert_counts
from dynserve.routing.routed import RoutedExperts, RoutedStep, expert_token_counts
from dynserve.routing.usage import ExpertUsageAccumulator


@dataclass
class StepResult:
    """What one forward step produced. `sampled[i]` belongs to `sampled_seqs[i]`;
    `usage[b]` is the per-MoE-layer expert activations of scheduled sequence b (positions it
    counted before left out)."""

    sampled_seqs: list[Sequence] = field(default_factory=list)
    sampled: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    sample_errors: dict[int, str] = field(default_factory=dict)  # index into sampled -> why it failed
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)  # scheduled index -> new ones
    usage: list[list[int]] = field(default_factory=list)  # [B][L_moe]
    # scheduled index -> routed experts of its tokens this step (only sequences that asked for them)
    routed_experts: dict[int, RoutedExperts] = field(default_factory=dict)


class ModelRunner:
    """Owns the model, the KV cache and the sampler; executes scheduled steps."""

    def __init__(self, config: EngineConfig, eos_token_ids: list[int] | None = None) -> None:
        self.config = config
        mc = config.model
        self.device = torch.device(config.device)
        self.block_size = config.cache.block_size
        torch.manual_seed(config.seed)
        self.num_kv_blocks = self._num_blocks()
        self.expert_parallel = None  # ExpertParallelRuntime when config.expert_parallel_size > 1
        if config.expert_parallel_size > 1:
            from dynserve.engine.expert_parallel import ExpertParallelRuntime

            self.expert_parallel = ExpertParallelRuntime(config)  # spawns the worker ranks
            try:
                self.model = load_model(config, experts=self.expert_parallel.experts)
                self.expert_parallel.ready(self.num_kv_blocks)
            except BaseException:
                self.expert_parallel.close()
                raise
        else:
            self.model = load_model(config)
        self.num_moe_layers = self.model.num_moe_layers
        self.num_experts = mc.num_experts
        self.kv_caches = allocate_kv_caches(mc, self.num_kv_blocks, self.block_size, self.device, torch_dtype(mc.dtype))
        self.expert_usage = ExpertUsageAccumulator(
            self.num_moe_layers, self.num_experts, record_expert_tokens=config.record_expert_token_counts
        )  # engine-wide totals behind the metrics
        self.expert_load = ExpertLoadTracker(self.num_moe_layers, self.num_experts)  # balance, distinct experts
        self.expert_distribution = ExpertDistributionRecorder(self.num_moe_layers, self.num_experts)
        self.sampler = Sampler(eos_token_ids=list(eos_token_ids if eos_token_ids is not None else mc.eos_token_ids))

    def _num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            if cache.num_kv_blocks < 1:
                raise ValueError(f"num_kv_blocks must be >= 1, got {cache.num_kv_blocks}")
            return cache.num_kv_blocks
        per_block = kv_cache_bytes_per_block(self.config.model, self.block_size, torch_dtype(self.config.model.dtype))
        budget = max(1, cache.kv_cache_memory_bytes // per_block)
        # no point in more blocks than max_num_seqs full-length sequences can use
        blocks_per_seq = -(-self.config.model.max_model_len // self.block_size)
        return int(min(budget, self.config.scheduler.max_num_seqs * blocks_per_seq + blocks_per_seq))

    def build_batch(self, scheduled: list[tuple[Sequence, int]]) -> tuple[ForwardBatch, list[int]]:
        """Flatten the step's tokens; return the batch and the indices (into `scheduled`) of the
        sequences that reach their last token this step and so get a sampled token."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        logits_idx: list[int] = []
        sample_rows: list[int] = []
        max_blocks = 1
        for i, (seq, n) in enumerate(scheduled):
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            if n == 1:
                slots.append(table[start // bs] * bs + start % bs)
            else:
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            max_blocks = max(max_blocks, len(table))
            if end == len(seq.token_ids):
                logits_idx.append(qsl[-1] - 1)
                sample_rows.append(i)
        tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s, _ in scheduled]
        dev = self.device
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=dev),  # [T]
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),  # [T]
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),  # [T]
            query_start_loc=torch.tensor(qsl, dtype=torch.int64, device=dev),  # [B+1]
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=dev),  # [B]
            block_tables=torch.tensor(tables, dtype=torch.int64, device=dev),  # [B, max_blocks]
            max_query_len=max(n for _, n in scheduled),
            max_seq_len=max(seq_lens),
            block_size=bs,
            logits_indices=torch.tensor(logits_idx, dtype=torch.int64, device=dev),  # [S]
            routing=RoutingBatch.from_per_sequence(
                [s.routing for s, _ in scheduled], [n for _, n in scheduled], device=dev
            ),  # config_index [T] on the device
            query_start_loc_host=qsl,
            seq_lens_host=seq_lens,
        )
        batch.routing.max_active_experts = self.config.max_active_experts
        return batch, sample_rows

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]]) -> StepResult:
        batch, sample_rows = self.build_batch(scheduled)
        if self.expert_parallel is not None:
            with self.expert_parallel.step(batch):  # the workers run the same forward in lockstep
                hidden = self.model(batch, self.kv_caches)  # [T, H]
        else:
            hidden = self.model(batch, self.kv_caches)  # [T, H]
        result = StepResult()
        if sample_rows:
            logits = self.model.compute_logits(hidden[batch.logits_indices])  # [S, V]
            seqs = [scheduled[i][0] for i in sample_rows]
            out = self.sampler.sample(logits, seqs)
            result.sampled_seqs = seqs
            result.sampled = out.token_ids
            result.logprobs = out.logprobs
            result.sample_errors = out.errors
        result.prompt_logprobs = self._prompt_logprobs(scheduled, batch, hidden)
        result.routed_experts = self._routed_experts(scheduled, batch)
        # a request's usage counts a position once: skip what a recompute after preemption repeats
        skip = [seq.expert_usage.already_counted(seq.num_computed_tokens, n) for seq, n in scheduled]
        counts = expert_token_counts(batch.assignments, self.num_experts)  # [L, E] on the device, no sync
        self.expert_load.add_step(counts)
        per_expert = list(counts.unbind(0)) if self.config.record_expert_token_counts else None
        result.usage = self.expert_usage.add_step(
            batch.expert_counts, batch.query_start_loc, skip, per_expert
        ).tolist()  # [B][L]
        if self.expert_distribution.recording:  # opt-in: a host copy per step while recording
            per_seq = sequence_expert_counts(batch.assignments, batch.query_start_loc_host, skip, self.num_experts)
            owners = [(seq.request_id, per_seq[b]) for b, (seq, _) in enumerate(scheduled)]
            self.expert_distribution.add_step(counts.cpu(), batch.num_tokens if counts.numel() else 0, owners)
        return result

    def _prompt_logprobs(
        self, scheduled: list[tuple[Sequence, int]], batch: ForwardBatch, hidden: torch.Tensor
    ) -> dict[int, list[TokenLogprobs]]:
        """Logprobs of the prompt tokens whose predicting position was computed this step, for the
        sequences that asked for them: the hidden state at position p gives token p+1's logprob."""
        rows: list[int] = []
        targets: list[int] = []
        num_top: list[int] = []
        owners: list[int] = []
        qsl = batch.query_start_loc_host
        for i, (seq, n) in enumerate(scheduled):
            want = seq.sampling_params.prompt_logprobs
            if want is None:
                continue
            start = seq.num_computed_tokens
            first = max(start, len(seq.prompt_logprobs))  # positions already done (a recompute) are skipped
            last = min(start + n, seq.num_prompt_tokens - 1)
            for p in range(first, last):
                rows.append(qsl[i] + p - start)
                targets.append(seq.token_ids[p + 1])
                num_top.append(want)
                owners.append(i)
        if not rows:
            return {}
        idx = torch.tensor(rows, dtype=torch.int64, device=hidden.device)  # [R]
        raw = torch.log_softmax(self.model.compute_logits(hidden[idx]).float(), dim=-1)  # [R, V]
        out: dict[int, list[TokenLogprobs]] = {}
        for owner, lp in zip(owners, token_logprobs(raw, targets, num_top), strict=True):
            out.setdefault(owner, []).append(lp)
        return out

    def _routed_experts(self, scheduled: list[tuple[Sequence, int]], batch: ForwardBatch) -> dict[int, RoutedExperts]:
        """The step's routed experts of the sequences that asked for them. Nothing is copied to the host
        (no sync, no copy) unless one of the step's sequences asked."""
        want = [i for i, (seq, _) in enumerate(scheduled) if seq.routed_experts is not None]
        if not want:
            return {}
        step = RoutedStep.gather(batch.assignments, batch.num_tokens)
        qsl = batch.query_start_loc_host
        return {i: step.rows(qsl[i], qsl[i + 1]) for i in want}

    def close(self) -> None:
        """Stop the expert-parallel workers, if any (idempotent)."""
        if self.expert_parallel is not None:
            self.expert_parallel.close()

    def release(self, seq: Sequence) -> None:
        """Forget per-sequence sampler state (seeded generators) of a finished sequence."""
        self.sampler.release(seq.seq_id)
