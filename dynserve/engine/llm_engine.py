"""LLMEngine: the synchronous engine. add_request() queues work, step() runs one iteration.

Owns the request table (prompt, its n sequences, their detokenizers), stop checks, and the
assembly of RequestOutputs with deltas and expert usage. Delegates batching to the Scheduler,
KV blocks to the BlockManager, compute and sampling to the ModelRunner.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dynserve.config import EngineConfig
from dynserve.engine.block_manager import BlockManager
from dynserve.engine.budget import ExpertBudgetController, apply_budget
from dynserve.engine.detokenizer import IncrementalDetokenizer
from dynserve.engine.model_runner import ModelRunner
from dynserve.engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from dynserve.engine.scheduler import Scheduler
from dynserve.engine.sequence import FinishReason, Sequence
from dynserve.engine.stats import EngineStats
from dynserve.routing.load import ExpertDistributionRecorder
from dynserve.routing.routed import RoutedExperts, RoutedExpertsBuilder
from dynserve.routing.usage import ExpertUsage, SequenceUsage
from dynserve.sampling_params import SamplingParams, may_stop
from dynserve.tokenizer import Tokenizer


class ContextLengthError(ValueError):
    """The prompt plus the requested completion do not fit the model's context."""


def resolve_max_tokens(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """The context rule, the one place it is written: the completion's length (None: what the context
    has left), raising ContextLengthError (OpenAI's words) unless the prompt plus at least one token
    fits. An explicit 0 asks for the prompt alone (it still needs the one position it computes)."""
    n = max_model_len - num_prompt_tokens if max_tokens is None else max_tokens
    no_room = max_tokens is None and n < 1
    if n < 0 or no_room or num_prompt_tokens + max(n, 1) > max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max(n, 0)} tokens ({num_prompt_tokens} in the messages, {n} in the "
            "completion). Please reduce the length of the messages or completion."
        )
    return n


@dataclass
class _SampleState:
    seq: Sequence
    detok: IncrementalDetokenizer | None
    logprobs: list[TokenLogprobs] | None
    sent_tokens: int = 0
    sent_text: int = 0
    sent_logprobs: int = 0
    sent_routed: int = 0  # generated tokens whose routed-experts rows went out
    text: str = ""


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    samples: list[_SampleState] = field(default_factory=list)
    finished_time: float | None = None
    prompt_routed_experts: RoutedExperts | None = None  # once the prompt is computed

    @property
    def finished(self) -> bool:
        return all(s.seq.is_finished for s in self.samples)


class LLMEngine:
    """The synchronous engine: one `step()` = schedule, forward, sample, detokenize, stop checks."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = config.model
        mdir = config.model.model_dir
        self.tokenizer: Tokenizer | None = Tokenizer.from_dir(mdir) if Tokenizer.exists(mdir) else None
        self._stop_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self._stop_ids.add(self.tokenizer.eos_token_id)
        self.runner = ModelRunner(config, eos_token_ids=sorted(self._stop_ids))
        self.block_manager = BlockManager(
            self.runner.num_kv_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.budget = ExpertBudgetController(config.expert_budget)
        self.requests: dict[str, _Request] = {}
        self._pending_outputs: list[RequestOutput] = []  # aborted requests to report
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._num_steps = 0

    # ---------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request. Raises ValueError (with a user-facing message) if it is invalid."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("either prompt or prompt_token_ids is required")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; send prompt token ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = list(prompt_token_ids)
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: it must contain at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is out of range for vocabulary size {vocab}")
        n_prompt = len(prompt_token_ids)
        max_tokens = resolve_max_tokens(n_prompt, params.max_tokens, self.model_config.max_model_len)
        if not self.scheduler.can_fit_ever(n_prompt + max_tokens):
            raise ValueError(
                f"the request needs {n_prompt + max_tokens} tokens of KV cache, more than the whole pool holds "
                f"({self.runner.num_kv_blocks} blocks of {self.config.cache.block_size})"
            )
        if params.max_tokens != max_tokens:
            params = _with_max_tokens(params, max_tokens)
        routing = self.config.routing.overlay(params.routing)  # the request's fields over the default
        routing.check_layers(self.runner.num_moe_layers)  # per-layer lists: one value per MoE layer
        routing.check_model(self.model_config.num_experts, self.runner.num_moe_layers)
        req = _Request(request_id, prompt, prompt_token_ids, params, arrival_time or time.monotonic())
        for i in range(params.n):
            seq = Sequence(request_id, prompt_token_ids, params, routing, sample_index=i, arrival_time=req.arrival_time)
            seq.expert_usage = SequenceUsage.zeros(self.runner.num_moe_layers)
            if params.return_routed_experts:  # sample 0 reports the prompt's rows, every sample its own
                first = min(params.routed_experts_start_len, n_prompt) if i == 0 else n_prompt
                seq.routed_experts = RoutedExpertsBuilder(self.runner.num_moe_layers, first)
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                    min_tokens=params.min_tokens,
                )
            req.samples.append(_SampleState(seq, detok, [] if params.logprobs is not None else None))
        self.requests[request_id] = req
        self._prompt_tokens += n_prompt
        for s in req.samples:
            self.scheduler.add(s.seq)

    def abort_request(self, request_id: str | Iterable[str], *, report: bool = True) -> None:
        """Abort requests: their KV blocks are freed at once. With `report`, the next step returns a
        final output that reports the abort (a caller that already told the consumer passes False)."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            req = self.requests.get(rid)
            if req is not None:
                self._end_request(req, report=report)

    def _end_request(self, req: _Request, *, report: bool = True, error: str | None = None) -> None:
        """Finish every unfinished sample of `req` as aborted, free its KV blocks and sampler state,
        and (with `report`) queue its final output, carrying `error` if one of its own ended it."""
        self.scheduler.abort(req.request_id)
        for s in req.samples:
            self.runner.release(s.seq)
        req.finished_time = time.monotonic()
        del self.requests[req.request_id]
        if report:
            self._pending_outputs.append(self._safe_output(req, error))

    def set_failure_handler(self, handler: Callable[[BaseException], None]) -> None:
        """`handler(error)` is called from a watchdog thread when something outside a step fails for
        good (an expert-parallel worker died or froze); the caller must then stop using this engine."""
        if self.runner.expert_parallel is not None:
            self.runner.expert_parallel.start_watchdog(handler)

    @property
    def expert_distribution(self) -> ExpertDistributionRecorder:
        """The expert-distribution recorder (start / stop / dump; thread-safe)."""
        return self.runner.expert_distribution

    @property
    def num_steps(self) -> int:
        """Forward steps run so far."""
        return self._num_steps

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending_outputs)

    # -------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        sched = self.scheduler.schedule(admit=self._admit if self.budget.config.enabled else None)
        if not sched.scheduled:
            return outputs
        now = time.monotonic()
        scheduled = [(s.seq, s.num_new_tokens) for s in sched.scheduled]
        for seq, _ in scheduled:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        starts = [seq.num_computed_tokens for seq, _ in scheduled]
        t0 = time.perf_counter()
        result = self.runner.execute(scheduled)
        step_s = time.perf_counter() - t0
        self.scheduler.postprocess(sched)
        self._num_steps += 1
        if self.budget.config.enabled:  # the load after this step sets the budget of the next admissions
            decode = all(n == 1 for _, n in scheduled)
            self.budget.update(self.scheduler.num_waiting, step_s if decode else None)
        touched: dict[str, _Request] = {}
        for (seq, n), start, usage in zip(scheduled, starts, result.usage, strict=True):
            seq.expert_usage.add(start, n, usage)
        for i, lps in result.prompt_logprobs.items():
            scheduled[i][0].prompt_logprobs.extend(lps)
        for i, rows in result.routed_experts.items():
            builder = scheduled[i][0].routed_experts
            if builder is not None:
                builder.add(starts[i], rows)
        now = time.monotonic()
        failed: dict[str, str] = {}  # request id -> the error of its own that ends it
        for i, (seq, token, lp) in enumerate(zip(result.sampled_seqs, result.sampled, result.logprobs, strict=True)):
            req = self.requests.get(seq.request_id)
            if req is None or seq.request_id in failed:
                continue
            err = result.sample_errors.get(i)
            if err is not None:
                failed[req.request_id] = err
                continue
            try:
                self._accept_token(req, seq, token, lp, now)
            except Exception as e:  # its detokenisation, stop strings or logprobs: this request's alone
                failed[req.request_id] = f"{type(e).__name__}: {e}"
                continue
            touched[req.request_id] = req
        for rid, err in failed.items():
            touched.pop(rid, None)
            self._end_request(self.requests[rid], error=err)
        outputs.extend(self._pending_outputs)
        self._pending_outputs = []
        for req in touched.values():
            if req.finished:
                req.finished_time = now
                del self.requests[req.request_id]
            outputs.append(self._safe_output(req))
        return outputs

    def _admit(self, seq: Sequence) -> None:
        """Scheduler hook before a sequence's first admission: its routing under the current expert budget."""
        b = self.budget.budget
        seq.routing = apply_budget(seq.requested_routing, b, self.model_config.top_k)
        seq.expert_budget = b if seq.routing is not seq.requested_routing else 1.0

    def _accept_token(self, req: _Request, seq: Sequence, token: int, lp: TokenLogprobs | None, now: float) -> None:
        state = req.samples[seq.sample_index]
        if seq.sampling_params.max_tokens == 0:  # the prompt alone was asked for: drop the token
            self.scheduler.finish(seq, FinishReason.LENGTH)
            self.runner.release(seq)
            return
        seq.append_token(token)
        self._generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        if state.logprobs is not None and lp is not None:
            state.logprobs.append(lp)
        reason = self._check_stop(state, token)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.runner.release(seq)

    def _safe_output(self, req: _Request, error: str | None = None) -> RequestOutput:
        """The request's output; if building it fails (detokenising), the request ends with that error."""
        try:
            out = self._make_output(req)
        except Exception as e:
            error = error or f"{type(e).__name__}: {e}"
            if req.request_id in self.requests:
                self._end_request(req, report=False)
            out = RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [], finished=True)
        if error is not None:
            out.error, out.finished = error, True
        return out

    def _check_stop(self, state: _SampleState, token: int) -> FinishReason | None:
        """Stop checks in vLLM's order; a stop token's text never enters the output."""
        seq, params = state.seq, state.seq.sampling_params
        n_out = seq.num_output_tokens
        if may_stop(n_out, params.min_tokens):
            if not params.ignore_eos and token in self._stop_ids:
                seq.stop_reason = None
                return FinishReason.STOP
            if token in params.stop_token_ids:
                seq.stop_reason = token
                return FinishReason.STOP
        if state.detok is not None:
            hit = state.detok.update([token])
            if hit is not None:
                seq.stop_reason = hit
                return FinishReason.STOP
        if n_out >= (params.max_tokens or 0) or len(seq) >= self.model_config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _make_output(self, req: _Request) -> RequestOutput:
        comps: list[CompletionOutput] = []
        for i, st in enumerate(req.samples):
            seq = st.seq
            if seq.is_finished and st.detok is not None:
                st.detok.finish()
            text = st.detok.output_text if st.detok is not None else ""
            out_ids = seq.output_token_ids
            reason = seq.finish_reason.value if seq.finish_reason is not None else None
            comps.append(
                CompletionOutput(
                    index=i,
                    text=text,
                    token_ids=out_ids,  # output_token_ids is already a fresh list
                    logprobs=list(st.logprobs) if st.logprobs is not None else None,
                    finish_reason=reason,
                    stop_reason=seq.stop_reason,
                    text_delta=text[st.sent_text :],
                    token_ids_delta=out_ids[st.sent_tokens :],
                    logprobs_delta=st.logprobs[st.sent_logprobs :] if st.logprobs is not None else None,
                )
            )
            if seq.routed_experts is not None:
                comps[-1].routed_experts, comps[-1].routed_experts_delta = self._routed_rows(st)
            st.sent_text, st.sent_tokens = len(text), len(out_ids)
            st.sent_logprobs = len(st.logprobs) if st.logprobs is not None else 0
        usage = ExpertUsage.merge([s.seq.expert_usage.report() for s in req.samples])
        usage.expert_budget_min = min(s.seq.expert_budget for s in req.samples)
        first = req.samples[0].seq
        prompt_lps: list[TokenLogprobs | None] | None = None
        if req.params.prompt_logprobs is not None:
            prompt_lps = [None, *first.prompt_logprobs]
        metrics = {"arrival_time": req.arrival_time}
        times = [s.seq.first_scheduled_time for s in req.samples if s.seq.first_scheduled_time is not None]
        if times:
            metrics["first_scheduled_time"] = min(times)
        ftimes = [s.seq.first_token_time for s in req.samples if s.seq.first_token_time is not None]
        if ftimes:
            metrics["first_token_time"] = min(ftimes)
        if req.finished_time is not None:
            metrics["finished_time"] = req.finished_time
        return RequestOutput(
            prompt_routed_experts=self._prompt_routed_rows(req),
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=comps,
            finished=req.finished_time is not None,
            expert_usage=usage,
            num_cached_tokens=first.num_cached_prompt_tokens or 0,
            prompt_logprobs=prompt_lps,
            metrics=metrics,
        )

    @staticmethod
    def _routed_rows(st: _SampleState) -> tuple[RoutedExperts | None, RoutedExperts]:
        """(all rows of the generated tokens, only when the sequence finished; the rows that became known
        since the previous output). A generated token's row is known once its position was computed; a
        finished sequence's last token never is (a None row)."""
        seq = st.seq
        builder = seq.routed_experts
        assert builder is not None
        P, n = seq.num_prompt_tokens, len(seq.token_ids)
        end = n if seq.is_finished else min(n, max(builder.recorded_upto, seq.num_computed_tokens, P))
        start = P + st.sent_routed
        delta = builder.rows(start, max(start, end))
        st.sent_routed = max(st.sent_routed, end - P)
        return (builder.rows(P, n) if seq.is_finished else None), delta

    @staticmethod
    def _prompt_routed_rows(req: _Request) -> RoutedExperts | None:
        """Sample 0's rows of the prompt (from routed_experts_start_len), kept once the prompt is computed."""
        if req.prompt_routed_experts is not None or not req.params.return_routed_experts:
            return req.prompt_routed_experts
        seq = req.samples[0].seq
        builder = seq.routed_experts
        assert builder is not None
        P = seq.num_prompt_tokens
        rows = builder.rows(builder.first_position, P)
        if builder.recorded_upto >= P or seq.num_output_tokens > 0:
            req.prompt_routed_experts = rows
        return rows

    # ------------------------------------------------------------------- stats
    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        usage = self.runner.expert_usage
        running = {s.request_id for s in self.scheduler.running}
        waiting = {s.request_id for s in self.scheduler.waiting} - running
        return EngineStats(
            num_running_requests=len(running),
            num_waiting_requests=len(waiting),
            kv_cache_usage=bm.usage,
            num_kv_blocks_total=bm.num_total_blocks,
            num_kv_blocks_free=bm.num_free_blocks,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            expert_budget=self.budget.budget,
            num_moe_layers=self.runner.num_moe_layers,
            num_experts=self.runner.num_experts,
            expert_k_histogram=usage.histogram.tolist(),
            expert_activations=usage.total_activations(),
            expert_token_counts=usage.expert_tokens.tolist() if usage.expert_tokens is not None else None,
            num_steps=self._num_steps,
            expert_load_balance=self.runner.expert_load.balance(),
            experts_touched_histogram=self.runner.expert_load.touched_histogram(),
            expert_parallel_pairs_per_rank=(
                self.runner.expert_parallel.pairs_per_rank() if self.runner.expert_parallel is not None else None
            ),
        )

    def close(self) -> None:
        """Release resources held outside this process (expert-parallel workers); idempotent."""
        self.runner.close()


def _with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, max_tokens=max_tokens)
