"""Scheduler: token budget, max_num_seqs, chunked prefill, preemption, abort, prefix reuse, and a
hypothesis property test that drives it like the engine does."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynserve.config import RoutingConfig, SchedulerConfig
from dynserve.engine.block_manager import BlockManager
from dynserve.engine.scheduler import Scheduler, SchedulerOutput
from dynserve.engine.sequence import FinishReason, Sequence, SequenceStatus
from dynserve.sampling_params import SamplingParams

ROUTINGS = (RoutingConfig(), RoutingConfig(policy="top_p", p=0.5))


def make_seq(tokens: list[int], request_id: str = "r", routing: RoutingConfig | None = None) -> Sequence:
    return Sequence(
        request_id=request_id,
        prompt_token_ids=list(tokens),
        sampling_params=SamplingParams(),
        routing=routing or ROUTINGS[0],
    )


def make_sched(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    budget: int = 64,
    chunked: bool = True,
    caching: bool = True,
) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, enable_prefix_caching=caching))


def step(sched: Scheduler, targets: dict[int, int] | None = None, token: int = 1) -> SchedulerOutput:
    """One engine step: schedule, 'run', postprocess, append a token to every sequence that reached
    its end, finish those that reached their target length."""
    out = sched.schedule()
    sched.postprocess(out)
    for item in out.scheduled:
        seq = item.seq
        if seq.num_computed_tokens == len(seq):
            seq.append_token(token)
            if targets is not None and len(seq) >= targets[seq.seq_id]:
                sched.finish(seq, FinishReason.LENGTH)
    sched.block_manager.check_invariants()
    return out


def plan(out: SchedulerOutput) -> dict[int, int]:
    return {item.seq.seq_id: item.num_new_tokens for item in out.scheduled}


def test_token_budget_respected_running_first() -> None:
    sched = make_sched(budget=16)
    a, b, c = (make_seq([i] * 10, request_id=str(i)) for i in range(3))
    for s in (a, b, c):
        sched.add(s)
    out = step(sched)
    assert plan(out) == {a.seq_id: 10, b.seq_id: 6}  # c: budget spent
    assert out.num_batched_tokens == 16 and out.preempted == []
    assert c.status == SequenceStatus.WAITING and sched.num_waiting == 1 and sched.num_running == 2
    out = step(sched)
    assert plan(out) == {a.seq_id: 1, b.seq_id: 4, c.seq_id: 10}  # a decodes, b finishes its chunk
    assert out.num_batched_tokens == 15
    assert [s.first_scheduled_time is not None for s in (a, b, c)] == [True] * 3


def test_max_num_seqs_respected() -> None:
    sched = make_sched(max_num_seqs=2)
    seqs = [make_seq([i, i], request_id=str(i)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = step(sched)
    assert set(plan(out)) == {seqs[0].seq_id, seqs[1].seq_id}
    out = step(sched)
    assert len(out.scheduled) == 2 and sched.num_waiting == 1
    sched.finish(seqs[0], FinishReason.STOP)
    out = step(sched)
    assert plan(out) == {seqs[1].seq_id: 1, seqs[2].seq_id: 2}


def test_chunked_prefill_interleaves_with_decodes() -> None:
    sched = make_sched(budget=8)
    d1, d2 = make_seq([1, 2], "d1"), make_seq([3, 4], "d2")
    sched.add(d1)
    sched.add(d2)
    step(sched)
    long = make_seq(list(range(10, 40)), "long")  # 30 tokens
    sched.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        out = step(sched)
        p = plan(out)
        assert p[d1.seq_id] == 1 and p[d2.seq_id] == 1  # decodes never stall
        assert out.num_batched_tokens <= 8
        chunks.append(p[long.seq_id])
    assert chunks == [6, 6, 6, 6, 6]
    assert d1.num_output_tokens == 6 and d2.num_output_tokens == 6


def test_without_chunked_prefill_a_prompt_waits_for_room() -> None:
    sched = make_sched(budget=12, chunked=False)
    a, b = make_seq([1] * 8, "a"), make_seq([2] * 8, "b")
    sched.add(a)
    sched.add(b)
    out = step(sched)
    assert plan(out) == {a.seq_id: 8}  # b does not get a partial 4-token chunk
    out = step(sched)
    assert plan(out) == {a.seq_id: 1, b.seq_id: 8}
    assert not sched.can_fit_ever(13) and sched.can_fit_ever(12)


def test_can_fit_ever() -> None:
    sched = make_sched(num_blocks=4, block_size=4)
    assert sched.can_fit_ever(16) and not sched.can_fit_ever(17)


def test_preemption_on_tiny_pool_requeues_at_front_and_completes() -> None:
    sched = make_sched(num_blocks=4, block_size=2)
    a, b, late = make_seq([1, 2, 3], "a"), make_seq([4, 5, 6], "b"), make_seq([7, 8], "late")
    targets = {a.seq_id: 7, b.seq_id: 7, late.seq_id: 3}
    sched.add(a)
    sched.add(b)
    step(sched, targets)  # both prefilled: 2 blocks each, pool full
    step(sched, targets)  # both decode into their second block (len 5 now)
    sched.add(late)
    out = step(sched, targets)  # a needs a 3rd block: b (latest) is preempted
    assert out.preempted == [b] and plan(out) == {a.seq_id: 1}
    assert list(sched.waiting) == [b, late]  # front of the queue, ahead of later arrivals
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and sched.num_preemptions == 1
    assert b.token_ids == [4, 5, 6, 1, 1]  # generated tokens kept, recomputed as a prompt
    for _ in range(50):
        if not sched.has_unfinished():
            break
        step(sched, targets)
    assert not sched.has_unfinished()
    assert [len(s) for s in (a, b, late)] == [7, 7, 3]
    assert all(s.finish_reason == FinishReason.LENGTH for s in (a, b, late))
    assert sched.block_manager.num_free_blocks == 4


def test_preempted_sample_is_readmitted_next_step_through_the_shared_prefix() -> None:
    sched = make_sched(num_blocks=5, block_size=2)
    bm = sched.block_manager
    prompt = [1, 2, 3, 4, 5]
    a, b = make_seq(prompt, "x"), make_seq(prompt, "x")
    targets = {a.seq_id: 11, b.seq_id: 11}
    sched.add(a)
    step(sched, targets)
    sched.add(b)
    out = step(sched, targets)
    assert plan(out) == {a.seq_id: 1, b.seq_id: 1} and b.block_table[:2] == a.block_table[:2]
    step(sched, targets)  # a takes the last free block
    out = step(sched, targets)  # b needs a 4th block: it is the last running, so it yields
    assert out.preempted == [b] and plan(out) == {a.seq_id: 1}
    assert [bm.ref_count(x) for x in a.block_table[:2]] == [1, 1]
    # Taken back in a later step (not the one that preempted it), reusing a's blocks for its
    # prompt and first generated token: only the last token is recomputed.
    while b.status == SequenceStatus.WAITING:
        out = step(sched, targets)
    assert b.num_cached_tokens == 6 and plan(out)[b.seq_id] == 1
    while sched.has_unfinished():
        step(sched, targets)
    assert len(a) == len(b) == 11 and bm.num_free_blocks == 5


def test_sequence_preempts_itself_when_alone() -> None:
    sched = make_sched(num_blocks=2, block_size=2)
    a = make_seq([1, 2, 3], "a")
    sched.add(a)
    step(sched)
    step(sched)  # len 5: next step needs a 3rd block that does not exist
    out = step(sched)
    assert out.scheduled == [] and out.preempted == [a] and list(sched.waiting) == [a]
    assert sched.block_manager.num_used_blocks == 0
    assert not sched.can_fit_ever(5)  # the engine rejects such requests up front


def test_abort_frees_blocks_immediately() -> None:
    sched = make_sched(max_num_seqs=2)
    x1, x2, y = make_seq([1] * 6, "x"), make_seq([1] * 6, "x"), make_seq([2] * 6, "y")
    for s in (x1, y, x2):
        sched.add(s)
    out = sched.schedule()  # the model would now run this step
    assert sched.num_running == 2 and sched.num_waiting == 1  # x2 waits
    used_by_y = len(y.block_table)
    aborted = sched.abort("x")
    assert set(aborted) == {x1, x2}
    for s in aborted:
        assert s.status == SequenceStatus.FINISHED and s.finish_reason == FinishReason.ABORT
        assert s.block_table == []
    assert sched.block_manager.num_used_blocks == used_by_y
    assert sched.running == [y] and sched.num_waiting == 0
    assert sched.abort("x") == [] and sched.abort("nope") == []
    sched.postprocess(out)  # the step that was in flight: x1 is skipped, y advances
    assert x1.num_computed_tokens == 0 and y.num_computed_tokens == 6
    assert sched.block_manager.num_cached_blocks == 1  # y's full block, nothing from x1
    sched.block_manager.check_invariants()


def test_second_request_with_same_prompt_reuses_prefix() -> None:
    sched = make_sched(block_size=4)
    prompt = list(range(9))
    a = make_seq(prompt, "a")
    sched.add(a)
    step(sched)
    b = make_seq(prompt, "b")
    sched.add(b)
    out = step(sched)
    assert plan(out) == {a.seq_id: 1, b.seq_id: 1}  # b only computes its last prompt token
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    bm = sched.block_manager
    assert bm.ref_count(a.block_table[0]) == 2
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (18, 8)


def test_blocked_admission_returns_prefix_hits_and_counts_once() -> None:
    sched = make_sched(num_blocks=5, block_size=2)
    bm = sched.block_manager
    a = make_seq([1, 2, 3, 4, 5], "a")
    sched.add(a)
    step(sched, {a.seq_id: 6})  # a finishes: 2 cached blocks are evictable
    d = make_seq([9, 9, 9], "d")
    sched.add(d)
    step(sched)  # d holds 2 blocks, and grows into the one plain free block while b waits
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "b")  # 5 blocks, 2 of them cached
    sched.add(b)
    for _ in range(3):
        out = step(sched)
        assert b.seq_id not in plan(out)
        assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_cached_tokens == 0
        assert bm.num_used_blocks == len(d.block_table) and bm.num_cached_blocks >= 2
    assert bm.prefix_cache_queries == 5 + 3  # the blocked retries were not counted
    sched.finish(d, FinishReason.STOP)
    out = step(sched)
    assert plan(out) == {b.seq_id: 5} and b.num_cached_tokens == 4
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (5 + 3 + 9, 4)


# ---------------------------------------------------------------------------- property test

_config = st.fixed_dictionaries(
    {
        "pool_tokens": st.integers(6, 40),
        "block_size": st.sampled_from([1, 2, 4]),
        "max_num_seqs": st.integers(1, 4),
        "budget": st.integers(1, 24),
        "chunked": st.booleans(),
        "caching": st.booleans(),
    }
)
_BASE = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0]
_prompt = st.builds(
    lambda k, tail: (_BASE[:k] + tail) or [0],  # shared stems -> prefix-cache hits
    st.integers(0, len(_BASE)),
    st.lists(st.integers(0, 1), max_size=4),
)
_arrive = st.tuples(
    st.just("arrive"),
    _prompt,
    st.integers(1, 6),  # tokens to generate
    st.integers(1, 3),  # samples (n)
    st.sampled_from(ROUTINGS),
)
_ops = st.lists(
    st.one_of(_arrive, _arrive, st.just(("step",)), st.tuples(st.just("abort"), st.integers(0, 20))),
    min_size=15,
    max_size=60,
)


class _Sim:
    """Engine stand-in that also keeps a fake KV pool: each written slot records which routing and
    which token prefix produced it, so a wrong prefix-cache hit or a write into a shared block is
    caught."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        num_blocks = max(2, cfg["pool_tokens"] // cfg["block_size"])
        self.sched = make_sched(
            num_blocks, cfg["block_size"], cfg["max_num_seqs"], cfg["budget"], cfg["chunked"], cfg["caching"]
        )
        self.bm = self.sched.block_manager
        self.kv: dict[tuple[int, int], tuple] = {}
        self.seqs: list[Sequence] = []
        self.targets: dict[int, int] = {}
        self.requests: list[str] = []

    def arrive(self, prompt: list[int], gen: int, n: int, routing: RoutingConfig) -> None:
        if not self.sched.can_fit_ever(len(prompt) + gen):
            return  # the engine rejects it up front
        rid = f"req{len(self.requests)}"
        self.requests.append(rid)
        for _ in range(n):
            seq = make_seq(prompt, rid, routing)
            self.targets[seq.seq_id] = len(prompt) + gen
            self.seqs.append(seq)
            self.sched.add(seq)

    def _kv_value(self, seq: Sequence, pos: int) -> tuple:
        return (seq.routing, tuple(seq.token_ids[: pos + 1]))

    def step(self) -> None:
        sched, bm, bs = self.sched, self.bm, self.cfg["block_size"]
        out = sched.schedule()
        assert 0 < out.num_batched_tokens <= self.cfg["budget"] or not out.scheduled
        assert out.num_batched_tokens == sum(i.num_new_tokens for i in out.scheduled)
        assert sched.num_running <= self.cfg["max_num_seqs"]
        assert len({id(i.seq) for i in out.scheduled}) == len(out.scheduled)
        for item in out.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            assert item.num_new_tokens >= 1 and seq.status == SequenceStatus.RUNNING
            if not self.cfg["chunked"]:  # whole remainder at once
                assert start + item.num_new_tokens == len(seq)
            assert len(seq.block_table) * bs >= start + item.num_new_tokens
            for pos in range(start):  # what it reads: cached or computed earlier, for this prefix
                assert self.kv[(seq.block_table[pos // bs], pos % bs)] == self._kv_value(seq, pos)
            for pos in range(start, start + item.num_new_tokens):  # what it writes: never shared
                bid = seq.block_table[pos // bs]
                assert bm.ref_count(bid) == 1
                self.kv[(bid, pos % bs)] = self._kv_value(seq, pos)
        for seq in out.preempted:
            assert seq in sched.waiting and seq.block_table == []
        sched.postprocess(out)
        for item in out.scheduled:
            seq = item.seq
            if not seq.is_finished and seq.num_computed_tokens == len(seq):
                seq.append_token(len(seq) % 2)  # deterministic: samples share generated prefixes too
                if len(seq) >= self.targets[seq.seq_id]:
                    sched.finish(seq, FinishReason.LENGTH)

    def abort(self, idx: int) -> None:
        if self.requests:
            for seq in self.sched.abort(self.requests[idx % len(self.requests)]):
                assert seq.block_table == [] and seq.finish_reason == FinishReason.ABORT

    def check(self) -> None:
        self.bm.check_invariants()
        refs = [0] * self.bm.num_total_blocks
        for seq in self.sched.running:
            for bid in seq.block_table:
                refs[bid] += 1
        # Only running sequences hold blocks: not waiting ones, not finished ones.
        assert refs == [self.bm.ref_count(b) for b in range(self.bm.num_total_blocks)]
        for seq in self.seqs:
            if seq.is_finished:
                assert seq.block_table == [] and seq not in self.sched.running
            if seq.status == SequenceStatus.WAITING:
                assert seq.block_table == [] and seq.num_computed_tokens == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=_config, ops=_ops)
def test_random_arrivals_steps_and_aborts_keep_the_pool_whole(cfg: dict, ops: list[tuple]) -> None:
    sim = _Sim(cfg)
    for op in ops:
        getattr(sim, op[0])(*op[1:])
        sim.check()
    for _ in range(500):
        if not sim.sched.has_unfinished():
            break
        sim.step()
        sim.check()
    assert not sim.sched.has_unfinished()
    for seq in sim.seqs:
        assert seq.is_finished
        if seq.finish_reason == FinishReason.LENGTH:
            assert len(seq) == sim.targets[seq.seq_id]
    assert sim.bm.num_free_blocks == sim.bm.num_total_blocks and sim.bm.usage == 0.0
