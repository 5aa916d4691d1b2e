"""Sampler: greedy, truncation (top-k/top-p/min-p), penalties, seeds, logprobs, min_tokens, distribution."""

from __future__ import annotations

import torch

from dynserve.config import RoutingConfig
from dynserve.engine.sampler import Sampler
from dynserve.engine.sequence import Sequence
from dynserve.sampling_params import SamplingParams

EOS = 1


def _seq(prompt=(5, 6), output=(), sample_index: int = 0, **params) -> Sequence:
    params.setdefault("max_tokens", 1000)
    s = Sequence("req", list(prompt), SamplingParams(**params), RoutingConfig(), sample_index=sample_index)
    s.token_ids.extend(output)
    return s


def _logits(B: int, V: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale  # [B, V]


def test_greedy_is_argmax_fast_path_and_mixed_batch():
    sampler = Sampler([EOS])
    logits = _logits(6, 50)
    seqs = [_seq(temperature=0.0) for _ in range(6)]
    assert sampler.sample(logits, seqs).token_ids == logits.argmax(-1).tolist()
    # greedy rows next to random rows (slow path) still take the exact argmax
    mixed = [_seq(temperature=0.0) if i % 2 == 0 else _seq(temperature=1.0, top_k=5) for i in range(6)]
    out = sampler.sample(logits, mixed).token_ids
    assert out[0::2] == logits.argmax(-1)[0::2].tolist()
    assert logits.shape == (6, 50) and torch.equal(logits, _logits(6, 50))  # input not modified


def test_low_temperature_and_top_k_1_are_greedy():
    sampler = Sampler()
    logits = _logits(4, 100, scale=1.0).repeat(50, 1)  # [200, 100]
    want = logits.argmax(-1).tolist()
    torch.manual_seed(0)
    assert sampler.sample(logits, [_seq(temperature=1e-3) for _ in range(200)]).token_ids == want
    assert sampler.sample(logits, [_seq(temperature=5.0, top_k=1) for _ in range(200)]).token_ids == want
    assert sampler.sample(logits, [_seq(temperature=2.0, top_p=0.01) for _ in range(200)]).token_ids == want
    assert sampler.sample(logits, [_seq(temperature=2.0, min_p=1.0) for _ in range(200)]).token_ids == want


def test_truncation_per_row_in_one_batch():
    sampler = Sampler()
    V, n = 8, 200
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0]]).repeat(4 * n, 1)  # [4n, V]
    kinds = [dict(top_k=2), dict(top_p=0.8), dict(min_p=0.3), dict()]
    seqs = [_seq(**kinds[i % 4]) for i in range(4 * n)]  # the four settings interleaved in one batch
    probs = torch.softmax(logits[0], -1)
    # top_p=0.8: the smallest prefix reaching 0.8 is {0, 1}; min_p=0.3: p >= 0.3 * p_max keeps {0, 1}
    assert probs[:2].sum() >= 0.8 and probs[0] < 0.8 and probs[2] < 0.3 * probs[0] <= probs[1]
    torch.manual_seed(0)
    toks = sampler.sample(logits, seqs).token_ids
    seen = [set(toks[k::4]) for k in range(4)]
    assert seen[0] == {0, 1} and seen[1] == {0, 1} and seen[2] == {0, 1}
    assert len(seen[3]) > 3 and seen[3] <= set(range(V))


def test_top_k_and_top_p_together():
    sampler = Sampler()
    logits = torch.tensor([[3.0, 2.9, 2.8, 2.7, -5.0, -5.0]]).repeat(300, 1)  # [300, 6]
    torch.manual_seed(0)
    # alone, top_p=0.6 keeps {0, 1, 2}; after top_k=3 renormalises over {0, 1, 2}, two tokens reach 0.6
    assert set(sampler.sample(logits, [_seq(top_p=0.6) for _ in range(300)]).token_ids) == {0, 1, 2}
    assert set(sampler.sample(logits, [_seq(top_k=3, top_p=0.6) for _ in range(300)]).token_ids) == {0, 1}
    assert set(sampler.sample(logits, [_seq(top_k=3) for _ in range(300)]).token_ids) == {0, 1, 2}


def test_top_p_nucleus_larger_than_candidate_set():
    # a flat distribution: the nucleus spans more tokens than the fast path's candidates
    sampler = Sampler()
    V, n = 4096, 400
    row = -torch.arange(V, dtype=torch.float32) * 1e-3  # [V] strictly decreasing
    probs = torch.softmax(row.double(), -1)
    before = probs.cumsum(-1) - probs
    nucleus = int((before < 0.9).sum())  # reference: sort-based nucleus size
    assert nucleus > 1024
    seqs = [_seq(top_p=0.9) if i % 3 else _seq(top_p=0.05) for i in range(n)] + [_seq() for _ in range(n)]
    torch.manual_seed(0)
    toks = torch.tensor(sampler.sample(row.repeat(2 * n, 1), seqs).token_ids)
    wide, narrow, free = toks[:n][[i % 3 != 0 for i in range(n)]], toks[:n:3], toks[n:]
    assert int(wide.max()) < nucleus and int(wide.max()) > 1024
    assert int(narrow.max()) < int((before < 0.05).sum())
    assert int(free.max()) >= nucleus  # rows without top_p still reach the tail


def test_penalties_on_hand_made_logits():
    sampler = Sampler()
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0]])  # [1, 5]
    seq = _seq(prompt=[0], output=[1, 1, 2], repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    x = logits.clone()
    sampler._apply_penalties(x, [seq], [0])
    # repetition over prompt+output: 2/2, -2*2, 1/2; then output counts {1: 2, 2: 1} for frequency/presence
    want = torch.tensor([[1.0, -4.0 - 1.0 - 0.25, 0.5 - 0.5 - 0.25, 0.5, 3.0]])
    torch.testing.assert_close(x, want)
    # the per-sequence counts follow the sequence as it grows
    seq.append_token(4)
    x = logits.clone()
    sampler._apply_penalties(x, [seq], [0])
    assert x[0, 4].item() == 3.0 / 2.0 - 0.5 - 0.25
    sampler.release(seq.seq_id)
    assert seq.seq_id not in sampler._state


def test_penalties_change_what_greedy_picks():
    sampler = Sampler()
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]])
    assert sampler.sample(logits, [_seq(temperature=0.0, output=[0])]).token_ids == [0]
    assert sampler.sample(logits, [_seq(temperature=0.0, output=[0], repetition_penalty=1.5)]).token_ids == [1]
    assert sampler.sample(logits, [_seq(temperature=0.0, output=[0], presence_penalty=1.5)]).token_ids == [1]
    assert sampler.sample(logits, [_seq(temperature=0.0, output=[0, 0], frequency_penalty=0.6)]).token_ids == [1]
    # repetition penalty covers the prompt too; frequency/presence only the output
    assert sampler.sample(logits, [_seq(temperature=0.0, prompt=[0], repetition_penalty=1.5)]).token_ids == [1]
    assert sampler.sample(logits, [_seq(temperature=0.0, prompt=[0], presence_penalty=2.0)]).token_ids == [0]


def _run(sampler: Sampler, target: Sequence, others: list[Sequence], steps: int, V: int = 64) -> list[int]:
    """Sample `steps` tokens for `target` inside a batch with `others`; its logits row is fixed per step."""
    out = []
    for step in range(steps):
        rows = _logits(len(others) + 1, V, seed=100 + step, scale=1.0)  # [B, V]
        own = _logits(1, V, seed=step, scale=1.0)[0]
        pos = len(others) // 2
        rows[pos] = own
        batch = others[:pos] + [target] + others[pos:]
        tok = sampler.sample(rows, batch).token_ids[pos]
        target.append_token(tok)
        out.append(tok)
    return out


def test_seeded_sampling_reproducible_across_batches_and_runs():
    base = _run(Sampler(), _seq(seed=1234), [], 30)
    torch.manual_seed(999)  # the global RNG must not matter for a seeded request
    crowded = _run(Sampler(), _seq(seed=1234), [_seq(), _seq(temperature=0.0), _seq(seed=7, top_k=10)], 30)
    assert base == crowded
    assert len(set(base)) > 5  # really random, not a degenerate argmax
    other_seed = _run(Sampler(), _seq(seed=1235), [], 30)
    assert other_seed != base
    # the request's second sample (n=2) gets its own stream
    second = _run(Sampler(), _seq(seed=1234, sample_index=1), [], 30)
    assert second != base


def test_unseeded_samples_differ():
    sampler = Sampler()
    logits = torch.zeros(4, 1000)  # [4, 1000] uniform
    seqs = [_seq(n=4, sample_index=i) for i in range(4)]
    draws = [tuple(sampler.sample(logits, seqs).token_ids) for _ in range(3)]
    assert any(len(set(d)) > 1 for d in draws)
    assert len(set(draws)) > 1


def test_logprobs_are_raw_log_softmax_sorted_top_n():
    sampler = Sampler()
    logits = _logits(3, 40)
    seqs = [
        _seq(logprobs=5, temperature=0.7, top_k=3, repetition_penalty=1.3, output=[0, 1]),
        _seq(),
        _seq(logprobs=0, temperature=0.0),
    ]
    out = sampler.sample(logits, seqs)
    ref = torch.log_softmax(logits, -1)  # [3, 40]
    assert out.logprobs[1] is None
    lp0 = out.logprobs[0]
    assert lp0.token_id == out.token_ids[0]
    assert abs(lp0.logprob - ref[0, lp0.token_id].item()) < 1e-5
    assert [t.token_id for t in lp0.top] == ref[0].topk(5).indices.tolist()
    vals = [t.logprob for t in lp0.top]
    assert vals == sorted(vals, reverse=True)
    torch.testing.assert_close(torch.tensor(vals), ref[0].topk(5).values)
    lp2 = out.logprobs[2]
    assert lp2.top == [] and lp2.token_id == logits[2].argmax().item()
    assert abs(lp2.logprob - ref[2].max().item()) < 1e-5


def test_min_tokens_blocks_eos_and_stop_token_ids():
    sampler = Sampler(eos_token_ids=[EOS, 3])
    logits = torch.tensor([[0.0, 10.0, 9.0, 8.0, 1.0]])  # EOS (1) and 3 dominate, then stop token 2
    assert sampler.sample(logits, [_seq(temperature=0.0, min_tokens=2, stop_token_ids=[2])]).token_ids == [4]
    assert sampler.sample(logits, [_seq(temperature=0.0, min_tokens=2, output=[4])]).token_ids == [2]
    torch.manual_seed(0)
    for _ in range(50):
        assert sampler.sample(logits, [_seq(min_tokens=1, stop_token_ids=[2])]).token_ids[0] in (0, 4)
    # enough outputs: EOS is allowed again
    assert sampler.sample(logits, [_seq(temperature=0.0, min_tokens=2, output=[4, 4])]).token_ids == [EOS]
    # ignore_eos: EOS is no stop, so min_tokens leaves it alone
    assert sampler.sample(logits, [_seq(temperature=0.0, min_tokens=2, ignore_eos=True)]).token_ids == [EOS]


def test_empirical_distribution_matches_softmax():
    sampler = Sampler()
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, -3.0])  # [V]
    torch.manual_seed(0)
    n = 20000
    toks = torch.tensor(sampler.sample(logits.repeat(n, 1), [_seq()] * n).token_ids)
    freq = torch.bincount(toks, minlength=6).float() / n
    torch.testing.assert_close(freq, torch.softmax(logits, -1), atol=0.015, rtol=0)
    # seeded requests with temperature and top-k, each drawing from its own generator
    m = 3000
    seqs = [_seq(seed=i, temperature=0.7, top_k=3) for i in range(m)]
    draws = torch.tensor(sampler.sample(logits.repeat(m, 1), seqs).token_ids)
    freq = torch.bincount(draws, minlength=6).float() / m
    want = torch.zeros(6)
    want[:3] = torch.softmax(logits[:3] / 0.7, -1)
    torch.testing.assert_close(freq, want, atol=0.03, rtol=0)


# ------------------------------------------------------------------ float safety (issue 12)
EXTREMES = [1e-300, 5e-324, 1e-46, 1e-39, 1e-30, 1e30]


def test_extreme_accepted_parameters_never_leave_the_vocabulary():
    """Every finite value SamplingParams accepts gives a token id inside the vocabulary: top_p that
    rounds to 0 in float32 keeps the top token, penalties that overflow float32 keep the order."""
    sampler = Sampler([EOS])
    V = 64
    logits = _logits(1, V, scale=4.0)
    seqs = []
    for x in EXTREMES:
        if x <= 1.0:
            seqs += [_seq(top_p=x), _seq(top_p=x, temperature=0.3, seed=3), _seq(min_p=x)]
        seqs += [
            _seq(output=(7, 8, 9), repetition_penalty=x),
            _seq(output=(7, 8, 9), repetition_penalty=x, temperature=0.0),
            _seq(output=(7, 8, 9), repetition_penalty=x, top_p=0.5, top_k=3),
            _seq(temperature=x if x < 2 else 2.0),
        ]
    out = sampler.sample(logits.repeat(len(seqs), 1), seqs)
    assert not out.errors
    assert all(0 <= t < V for t in out.token_ids)
    # top_p that rounds to zero is greedy
    top = int(logits.argmax())
    for i, s in enumerate(seqs):
        if s.sampling_params.top_p < 1e-30:
            assert out.token_ids[i] == top


def test_all_prompt_tokens_penalised_to_minus_inf_falls_back_to_argmax():
    sampler = Sampler()
    V = 16
    logits = -torch.rand(2, V) - 1.0  # all negative: x * 1e30 overflows to -inf for every seen token
    prompt = tuple(range(V))
    seqs = [_seq(prompt=prompt, repetition_penalty=1e30), _seq(prompt=prompt, repetition_penalty=1e30, seed=1)]
    out = sampler.sample(logits, seqs)
    assert not out.errors and all(0 <= t < V for t in out.token_ids)


def test_nan_and_inf_logit_rows_give_valid_ids_and_spare_the_others():
    sampler = Sampler()
    V = 32
    logits = _logits(4, V)
    logits[0] = float("nan")
    logits[1, 3] = float("inf")
    logits[2] = float("-inf")
    seqs = [_seq(seed=i, top_p=0.9) for i in range(4)]
    out = sampler.sample(logits, seqs)
    assert all(0 <= t < V for t in out.token_ids)
    assert out.token_ids[1] == 3
    assert out.token_ids[3] == sampler.sample(logits[3:], seqs[3:]).token_ids[0]  # seeded row unaffected


def test_a_row_whose_sampling_raises_fails_alone():
    """A broken row (here: parameters corrupted after validation) gets an error and token -1; the
    other rows of the batch still get their tokens."""
    sampler = Sampler()
    logits = _logits(3, 20)
    seqs = [_seq(temperature=0.7, seed=1), _seq(temperature=0.7), _seq(temperature=0.0)]
    want = [sampler.sample(logits[i : i + 1], [s]).token_ids[0] for i, s in enumerate(seqs) if i != 1]
    sampler = Sampler()
    seqs = [_seq(temperature=0.7, seed=1), _seq(temperature=0.7), _seq(temperature=0.0)]
    seqs[1].sampling_params.top_k = "broken"  # fails inside the batch
    out = sampler.sample(
        logits,
        seqs,
    )
    assert set(out.errors) == {1} and out.token_ids[1] == -1
    assert [out.token_ids[0], out.token_ids[2]] == want


def test_sampling_params_reject_non_finite_values():
    import math

    import pytest

    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValueError, match=name):
                SamplingParams(**{name: bad})
