"""Sampler: turns one row of logits per sequence into its next token (and its logprobs).

Every step, for a batch of B sequences, with per-row parameters as tensors:
  1. logprobs (if asked): log_softmax of the raw model logits, before any processing below
     (vLLM v1's default `raw_logprobs`); the chosen token's value plus the top N.
  2. min_tokens: EOS ids (unless ignore_eos) and stop_token_ids get -inf until the sequence has
     min_tokens outputs.
  3. repetition_penalty over prompt + output tokens (positive logits divided, negative multiplied),
     then frequency_penalty * count and presence_penalty * [count > 0] over output tokens (OpenAI).
  4. greedy rows (temperature 0) take the argmax of these processed logits.
  5. random rows: temperature, top_k, top_p, min_p (HF's order), then one draw by inverse-CDF
     sampling: one uniform per row and a binary search in the cumulative probabilities (exact, and far
     cheaper on CPU than the exponential race, which needs V random numbers per row). Rows with a
     seed draw their uniform from their own torch.Generator, seeded once per sequence from
     (seed, sample_index) and kept across steps, so a seeded request gives the same tokens whatever
     else shares its batch.
A batch of greedy rows without penalties or active min_tokens is a single argmax.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from dynserve.engine.outputs import Logprob, TokenLogprobs
from dynserve.engine.sequence import Sequence
from dynserve.sampling_params import may_stop


@dataclass
class SamplerOutput:
    """One sampled token per input row, and its logprobs for rows that asked for them. A row whose
    sampling failed (an error that belongs to that request alone) has token id -1 and its message
    in `errors`; every other id is inside the vocabulary."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    errors: dict[int, str] = field(default_factory=dict)  # row -> message


@dataclass
class _PenaltyState:
    """Dense per-sequence token statistics for penalties, updated with each new output token."""

    prompt_mask: torch.Tensor  # [V] bool: token occurs in the prompt
    output_counts: torch.Tensor  # [V] int32: occurrences among output tokens
    num_counted: int = 0  # output tokens already in output_counts


@dataclass
class _SeqState:
    generator: torch.Generator | None = None
    penalties: _PenaltyState | None = None


def _seed_for(seed: int, sample_index: int) -> int:
    """A 64-bit generator seed from a request seed and the sample's index (stable across runs)."""
    digest = hashlib.blake2b(f"{seed}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Sampler:
    """Owns per-sequence sampling state (seeded generators, penalty token counts) and the sampling
    pipeline. `eos_token_ids` are the ids min_tokens masks. Call `release(seq_id)` when a sequence
    finishes or is aborted."""

    def __init__(self, eos_token_ids: Iterable[int] = ()) -> None:
        self.eos_token_ids = sorted({int(t) for t in eos_token_ids})
        self._state: dict[int, _SeqState] = {}

    def release(self, seq_id: int) -> None:
        """Forget a sequence's generator and penalty counts."""
        self._state.pop(seq_id, None)

    # ------------------------------------------------------------------ entry point
    def sample(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> SamplerOutput:
        """logits [B, V] (one row per sequence that samples this step) -> one token id per row."""
        B, V = logits.shape
        if B != len(seqs):
            raise ValueError(f"sampler got {B} logit rows for {len(seqs)} sequences")
        if B == 0:
            return SamplerOutput([], [])
        try:
            token_ids = self._sample_ids(logits, seqs)
        except Exception:  # one row's numbers or state broke the batch: find it, keep the others
            token_ids = []
            errors: dict[int, str] = {}
            for i in range(B):
                try:
                    token_ids.extend(self._sample_ids(logits[i : i + 1], seqs[i : i + 1]))
                except Exception as e:
                    token_ids.append(-1)
                    errors[i] = f"sampling failed: {type(e).__name__}: {e}"
        else:
            errors = {}
        for i, t in enumerate(token_ids):  # the invariant, checked where it is cheap
            if not 0 <= t < V and i not in errors:
                errors[i] = f"sampling produced token id {t}, outside the vocabulary of {V}"
        params = [s.sampling_params for s in seqs]
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None and i not in errors]
        raw_logprobs = None
        if lp_rows:
            rows = torch.tensor(lp_rows, device=logits.device)
            raw_logprobs = torch.log_softmax(logits[rows].float(), dim=-1)  # [L, V]
        return SamplerOutput(token_ids, self._logprobs(raw_logprobs, lp_rows, token_ids, params, B), errors)

    def _sample_ids(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> list[int]:
        """logits [B, V] -> one token id per row, each in [0, V) for any finite parameters."""
        params = [s.sampling_params for s in seqs]
        min_tok_rows = [i for i, s in enumerate(seqs) if not may_stop(s.num_output_tokens + 1, params[i].min_tokens)]
        pen_rows = [
            i
            for i, p in enumerate(params)
            if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
        ]
        greedy = [p.greedy for p in params]
        if all(greedy) and not min_tok_rows and not pen_rows:
            token_ids = logits.argmax(dim=-1).tolist()  # fast path
        else:
            logits = logits.float().clone()  # [B, V]; processed in place below
            if min_tok_rows:
                self._apply_min_tokens(logits, [seqs[i] for i in min_tok_rows], min_tok_rows)
            if pen_rows:
                self._apply_penalties(logits, [seqs[i] for i in pen_rows], pen_rows)
            token_ids = self._choose(logits, seqs, greedy)
        return token_ids

    # ------------------------------------------------------------------ steps
    def _apply_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
        V = logits.shape[1]
        r_idx: list[int] = []
        c_idx: list[int] = []
        for row, seq in zip(rows, seqs, strict=True):
            p = seq.sampling_params
            banned = set(p.stop_token_ids)
            if not p.ignore_eos:
                banned.update(self.eos_token_ids)
            banned = [t for t in banned if 0 <= t < V]
            r_idx.extend([row] * len(banned))
            c_idx.extend(banned)
        if r_idx:
            dev = logits.device
            logits[torch.tensor(r_idx, device=dev), torch.tensor(c_idx, device=dev)] = float("-inf")

    def _penalty_state(self, seq: Sequence, V: int, device: torch.device) -> _PenaltyState:
        st = self._state.setdefault(seq.seq_id, _SeqState())
        ps = st.penalties
        n_out = seq.num_output_tokens
        if ps is None or ps.num_counted > n_out or ps.output_counts.shape[0] != V or ps.output_counts.device != device:
            mask = torch.zeros(V, dtype=torch.bool, device=device)  # [V]
            prompt = torch.tensor(seq.prompt_token_ids, dtype=torch.int64, device=device).clamp_(0, V - 1)
            mask[prompt] = True
            ps = st.penalties = _PenaltyState(mask, torch.zeros(V, dtype=torch.int32, device=device))
        if ps.num_counted < n_out:
            new = seq.token_ids[seq.num_prompt_tokens + ps.num_counted :]
            ids = torch.tensor(new, dtype=torch.int64, device=device).clamp_(0, V - 1)  # [n]
            ps.output_counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
            ps.num_counted = n_out
        return ps

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
        V, dev = logits.shape[1], logits.device
        states = [self._penalty_state(s, V, dev) for s in seqs]
        prompt_mask = torch.stack([st.prompt_mask for st in states])  # [P, V]
        counts = torch.stack([st.output_counts for st in states])  # [P, V]
        ps = [s.sampling_params for s in seqs]
        rep = torch.tensor([p.repetition_penalty for p in ps], device=dev).unsqueeze(1)  # [P, 1]
        freq = torch.tensor([p.frequency_penalty for p in ps], device=dev).unsqueeze(1)  # [P, 1]
        pres = torch.tensor([p.presence_penalty for p in ps], device=dev).unsqueeze(1)  # [P, 1]
        row_idx = torch.tensor(rows, device=dev)
        x = logits[row_idx]  # [P, V]
        in_output = counts > 0  # [P, V]
        seen = prompt_mask | in_output  # [P, V]
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - freq * counts.to(x.dtype) - pres * in_output.to(x.dtype)
        logits[row_idx] = x

    def _choose(self, logits: torch.Tensor, seqs: Seq[Sequence], greedy: list[bool]) -> list[int]:
        """Greedy rows: argmax. Random rows: temperature, top_k, top_p, min_p, then one draw."""
        dev = logits.device
        # Extreme penalties overflow float32: +inf would make softmax NaN, NaN would win argmax
        # arbitrarily. Keep the order: +inf -> the largest float, NaN -> -inf (never chosen).
        logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
        out = logits.argmax(dim=-1)  # [B]; final for greedy rows
        rand_rows = [i for i, g in enumerate(greedy) if not g]
        if not rand_rows:
            return out.tolist()
        ps = [seqs[i].sampling_params for i in rand_rows]
        all_rows = len(rand_rows) == len(seqs)
        row_idx = None if all_rows else torch.tensor(rand_rows, device=dev)
        x = logits if all_rows else logits[row_idx]  # [R, V]
        V = x.shape[1]

        temps = [p.temperature for p in ps]
        if any(t != 1.0 for t in temps):
            x = x / torch.tensor(temps, dtype=x.dtype, device=dev).unsqueeze(1)
        ks = [p.top_k if 0 < p.top_k < V else V for p in ps]
        if any(k < V for k in ks):
            # a partial top-k, not a full sort; ties with the k-th value are kept
            k_max = max(k for k in ks if k < V)
            top_vals = x.topk(k_max, dim=-1).values  # [R, k_max]
            k_t = torch.tensor([min(k, k_max) - 1 for k in ks], device=dev).unsqueeze(1)  # [R, 1]
            kth = top_vals.gather(1, k_t)  # [R, 1]
            full = torch.tensor([k >= V for k in ks], device=dev).unsqueeze(1)  # [R, 1]
            kth = kth.masked_fill(full, float("-inf"))
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)  # [R, V]; later steps zero entries, no renormalisation needed
        top_ps = [p.top_p for p in ps]
        if any(p < 1.0 for p in top_ps):
            probs = self._top_p(probs, top_ps)
        min_ps = [p.min_p for p in ps]
        if any(m > 0.0 for m in min_ps):
            m_t = torch.tensor(min_ps, dtype=probs.dtype, device=dev).unsqueeze(1)  # [R, 1]
            probs = probs.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * m_t, 0.0)
        chosen = self._draw(probs, [seqs[i] for i in rand_rows])  # [R]
        # a row with no probability mass left (every logit -inf after penalties) falls back to its argmax
        chosen = torch.where(chosen < V, chosen, out if all_rows else out[row_idx])
        if all_rows:
            return chosen.tolist()
        out[row_idx] = chosen
        return out.tolist()

    def _draw(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row from unnormalised probabilities by inverse-CDF sampling (what
        torch.multinomial does, minus its overhead): one uniform per row, a float64 cumulative sum
        and a binary search. Zero-probability tokens are never chosen. Seeded rows draw their uniform
        from their own generator."""
        R, dev = probs.shape[0], probs.device
        u = torch.rand(R, dtype=torch.float64, device=dev)  # [R]; the global RNG for unseeded rows
        for j, seq in enumerate(seqs):
            seed = seq.sampling_params.seed
            if seed is None:
                continue
            st = self._state.setdefault(seq.seq_id, _SeqState())
            if st.generator is None or st.generator.device != probs.device:
                st.generator = torch.Generator(device=dev)
                st.generator.manual_seed(_seed_for(seed, seq.sample_index))
            u[j] = torch.rand((), dtype=torch.float64, device=dev, generator=st.generator)
        probs = torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0)  # [R, V]
        cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # [R, V]
        total = cdf[:, -1:]  # [R, 1]; 0 for a row with no mass: searchsorted then returns V
        target = torch.minimum(u.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))  # [R, 1]
        return torch.searchsorted(cdf, target, right=True).squeeze(1)  # [R]: first index with cdf > target

    @staticmethod
    def _top_p(probs: torch.Tensor, top_ps: list[float], num_candidates: int = 1024) -> torch.Tensor:
        """Zero the probabilities outside each row's nucleus: token j stays while the probability of
        the tokens ranked above it is < p (so the most likely token always stays). The nucleus is found
        among the top `num_candidates` tokens when they hold mass >= p (exact then, and much cheaper than
        sorting the vocabulary); rows where they do not fall back to a full sort."""
        R, V = probs.shape
        dev = probs.device
        p_t = torch.tensor([p if p < 1.0 else float("inf") for p in top_ps], dtype=probs.dtype, device=dev)  # [R]
        p_t = p_t.unsqueeze(1)  # [R, 1]
        k = min(V, num_candidates)
        vals, idx = probs.topk(k, dim=-1)  # [R, k], descending
        cum = vals.cumsum(dim=-1)  # [R, k]
        keep = (cum - vals) < p_t  # [R, k]
        keep[:, 0] = True  # the most likely token always stays, however small p (1e-300 rounds to 0)
        ok = (cum[:, -1:] >= p_t) | torch.isinf(p_t)  # [R, 1]: the nucleus lies inside the candidates
        if k < V and not bool(ok.all()):
            bad = (~ok.squeeze(1)).nonzero().squeeze(1)  # [b]
            s_vals, s_idx = probs[bad].sort(dim=-1, descending=True)  # [b, V]
            s_cum = s_vals.cumsum(dim=-1)  # [b, V]
            s_keep = (s_cum - s_vals) < p_t[bad]  # [b, V]
            s_keep[:, 0] = True
            full_keep = torch.zeros(R, V, dtype=torch.bool, device=dev)  # [R, V]
            full_keep.scatter_(1, idx, keep)
            full_keep[bad] = torch.zeros_like(s_keep).scatter_(1, s_idx, s_keep)
        else:
            full_keep = torch.zeros(R, V, dtype=torch.bool, device=dev).scatter_(1, idx, keep)  # [R, V]
        full_keep |= torch.isinf(p_t)  # rows without top-p keep everything
        return probs.masked_fill(~full_keep, 0.0)

    @staticmethod
    def _logprobs(
        raw: torch.Tensor | None, rows: list[int], token_ids: list[int], params: list, B: int
    ) -> list[TokenLogprobs | None]:
        result: list[TokenLogprobs | None] = [None] * B
        if raw is None:
            return result
        lps = token_logprobs(raw, [token_ids[i] for i in rows], [params[i].logprobs for i in rows])
        for i, lp in zip(rows, lps, strict=True):
            result[i] = lp
        return result


def token_logprobs(raw: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[TokenLogprobs]:
    """Row r of `raw` [R, V] (log-probabilities) -> the logprob of token_ids[r] and the top num_top[r]."""
    chosen = torch.tensor(token_ids, device=raw.device).unsqueeze(1)  # [R, 1]
    chosen_lp = raw.gather(1, chosen).squeeze(1).tolist()  # [R]
    n_max = max(num_top, default=0)
    top_lp_l: list[list[float]] = [[] for _ in token_ids]
    top_ids_l: list[list[int]] = [[] for _ in token_ids]
    if n_max > 0:
        top_lp, top_ids = raw.topk(n_max, dim=-1)  # [R, n_max], sorted descending
        top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
    return [
        TokenLogprobs(t, lp, [Logprob(i, v) for i, v in zip(top_ids_l[r][:n], top_lp_l[r][:n], strict=True)])
        for r, (t, lp, n) in enumerate(zip(token_ids, chosen_lp, num_top, strict=True))
    ]
