"""How a MoE layer runs its routed experts: the `ExpertExecutor` interface, chosen when the model is
built (`load_model(config, experts=...)`), and its two implementations.

- `LocalExperts`: every expert in this process, through `dynserve_kernels.fused_moe`.
- `ExpertParallelExperts`: expert parallelism over N ranks, each holding 1/N of every MoE layer's
  experts. Every rank computes the same routing (the router is replicated, like attention); rank r
  takes the (token, expert) pairs of its token slice, sends each pair's hidden row to the rank owning
  the expert (counts first, then the ragged payloads), runs its local experts with the same
  `fused_moe` kernel on what it received, sends the results back, weighted-combines them per token,
  and all-gathers the token slices. Variable k costs only the pairs that exist; zero-computation
  experts never become pairs, so they cost no bytes.
- `expert_range` / `token_range`: which experts a rank owns (contiguous, uneven allowed: 4 experts on
  3 ranks = 2/1/1) and which tokens of a step it dispatches in an MoE layer.
- `ExpertExchange` (interface) and `TorchDistributedExchange` (all_to_all_single; gloo on CPU, NCCL on
  CUDA): the only place bytes move between ranks inside an MoE layer, so a faster GPU all-to-all can
  replace it.
The processes, process groups and their watchdog belong to the engine (engine/expert_parallel.py).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import dynserve_kernels
import torch
import torch.distributed as dist

from dynserve.routing.base import Assignment


class ExpertExecutor(ABC):
    """Runs a MoE layer's routed experts: (x [T, H], w13 [E_held, 2I, H], w2 [E_held, H, I], the
    layer's Assignment over all E experts, kernel backend) -> [T, H], the weighted sum per token.
    Layers with expert biases or gpt-oss's clamped SwiGLU also pass `b13` [E_held, 2I], `b2`
    [E_held, H] and `activation` (keywords, only then), forwarded to `dynserve_kernels.fused_moe`."""

    def held_experts(self, num_experts: int) -> tuple[int, int]:
        """The experts [start, end) whose weights this process holds (all of them by default)."""
        return 0, num_experts

    @abstractmethod
    def __call__(
        self,
        x: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        a: Assignment,
        backend: str = "torch",
        **expert_options: Any,
    ) -> torch.Tensor: ...


class LocalExperts(ExpertExecutor):
    """Every expert in this process: one `fused_moe` call."""

    def __call__(
        self,
        x: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        a: Assignment,
        backend: str = "torch",
        **expert_options: Any,
    ) -> torch.Tensor:
        return dynserve_kernels.fused_moe(x, w13, w2, a, backend, **expert_options)  # [T, H]


LOCAL_EXPERTS = LocalExperts()


def use_experts(model: torch.nn.Module, experts: ExpertExecutor) -> int:
    """Give every MoE block of `model` the executor `experts`, keeping only the expert weights it
    holds; returns the number of MoE blocks."""
    from dynserve.model.moe import MoEBlock

    n = 0
    for m in model.modules():
        if isinstance(m, MoEBlock):
            s, e = experts.held_experts(m.num_experts)
            if (s, e) != (0, m.num_experts):
                m.w13 = torch.nn.Parameter(m.w13.data[s:e].clone(), requires_grad=False)  # [E_held, 2I, H]
                m.w2 = torch.nn.Parameter(m.w2.data[s:e].clone(), requires_grad=False)  # [E_held, H, I]
                if m.b13 is not None:  # expert biases (gpt-oss) follow their experts
                    m.b13 = torch.nn.Parameter(m.b13.data[s:e].clone(), requires_grad=False)  # [E_held, 2I]
                    m.b2 = torch.nn.Parameter(m.b2.data[s:e].clone(), requires_grad=False)  # [E_held, H]
            m.experts = experts
            n += 1
    return n


def expert_range(num_experts: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the experts `rank` owns: contiguous, the first E % N ranks get one more."""
    base, extra = divmod(num_experts, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def token_range(num_tokens: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the step's tokens whose pairs `rank` dispatches in an MoE layer."""
    return rank * num_tokens // world_size, (rank + 1) * num_tokens // world_size


# ------------------------------------------------------------------------------------------ exchange
@dataclass
class ExchangeStats:
    """Cumulative counters of one rank's exchanges and expert compute."""

    bytes_sent: int = 0
    bytes_received: int = 0
    exchange_s: float = 0.0
    experts_s: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.bytes_sent = self.bytes_received = self.calls = 0
        self.exchange_s = self.experts_s = 0.0


class ExpertExchange(ABC):
    """Moves ragged rows between ranks. `send_counts[j]` rows of the input go to rank j (rows are
    grouped by destination rank, in rank order); the output holds `recv_counts[i]` rows from rank i."""

    rank: int
    world_size: int

    @abstractmethod
    def exchange_counts(self, send_counts: list[int]) -> list[int]:
        """Tell every rank how many rows it will get from this one; return how many this one gets."""

    @abstractmethod
    def exchange(self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Ragged all-to-all of `rows` [sum(send_counts), ...] -> [sum(recv_counts), ...]."""

    @abstractmethod
    def all_gather_rows(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Concatenate every rank's `rows` ([counts[r], ...] on rank r) in rank order, on every rank."""

    def dispatch(
        self, rows: torch.Tensor, expert_ids: torch.Tensor, send_counts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Send each pair's row and (destination-local) expert id to the owning rank; returns the
        received rows, their expert ids and the per-source counts (needed to `combine`)."""
        recv_counts = self.exchange_counts(send_counts)
        recv_rows = self.exchange(rows, send_counts, recv_counts)  # [R, H]
        recv_ids = self.exchange(expert_ids, send_counts, recv_counts)  # [R]
        return recv_rows, recv_ids, recv_counts

    def combine(self, results: torch.Tensor, recv_counts: list[int], send_counts: list[int]) -> torch.Tensor:
        """Send expert results back to the ranks the rows came from; returns them in send order."""
        return self.exchange(results, recv_counts, send_counts)


class TorchDistributedExchange(ExpertExchange):
    """`ExpertExchange` over torch.distributed's `all_to_all_single` with uneven splits (gloo on the
    CPU, NCCL on CUDA). Counts cross as one small int64 all-to-all; payload bytes are counted."""

    def __init__(self, group: Any = None, stats: ExchangeStats | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.stats = stats if stats is not None else ExchangeStats()

    def _count_device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":  # NCCL moves only CUDA tensors
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def exchange_counts(self, send_counts: list[int]) -> list[int]:
        t0 = time.perf_counter()
        dev = self._count_device()
        send = torch.tensor(send_counts, dtype=torch.int64, device=dev)  # [N]
        recv = torch.empty_like(send)  # [N]
        dist.all_to_all_single(recv, send, group=self.group)
        out = recv.tolist()
        self.stats.bytes_sent += send.numel() * 8
        self.stats.bytes_received += recv.numel() * 8
        self.stats.exchange_s += time.perf_counter() - t0
        return out

    def exchange(self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        t0 = time.perf_counter()
        rows = rows.contiguous()
        out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
        dist.all_to_all_single(
            out, rows, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=self.group
        )
        self.stats.bytes_sent += rows.numel() * rows.element_size()
        self.stats.bytes_received += out.numel() * out.element_size()
        self.stats.exchange_s += time.perf_counter() - t0
        return out

    def all_gather_rows(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        t0 = time.perf_counter()
        width = max(counts)
        padded = rows.new_zeros((width, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=self.group)
        out = torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])
        self.stats.bytes_sent += padded.numel() * padded.element_size() * (len(counts) - 1)
        self.stats.bytes_received += out.numel() * out.element_size()
        self.stats.exchange_s += time.perf_counter() - t0
        return out


# ------------------------------------------------------------------------------------------ MoE layer
class ExpertParallelExperts(ExpertExecutor):
    """The expert computation of every MoE layer of one rank under expert parallelism: w13/w2 hold
    only this rank's experts (`held_experts`).

    Also counts (on every rank, from the full assignment) the pairs each rank computes:
    `pairs_per_rank` [N] int64, cumulative."""

    def __init__(self, exchange: ExpertExchange, num_experts: int) -> None:
        self.exchange = exchange
        self.num_experts = num_experts
        N = exchange.world_size
        starts = [expert_range(num_experts, N, r)[0] for r in range(N)]
        owner = torch.zeros(num_experts, dtype=torch.int64)
        for r in range(N):
            s, e = expert_range(num_experts, N, r)
            owner[s:e] = r
        self.owner = owner  # [E] rank owning each expert
        self.first_expert = torch.tensor(starts, dtype=torch.int64)  # [N]
        self.pairs_per_rank = torch.zeros(N, dtype=torch.int64)  # [N]
        self.local_range = expert_range(num_experts, N, exchange.rank)
        self.profile_cuda = False

    def held_experts(self, num_experts: int) -> tuple[int, int]:
        if num_experts != self.num_experts:
            raise ValueError(f"MoE block with {num_experts} experts, expected {self.num_experts}")
        return self.local_range

    @property
    def stats(self) -> ExchangeStats:
        return getattr(self.exchange, "stats", ExchangeStats())

    def __call__(
        self,
        x: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        a: Assignment,
        backend: str = "torch",
        **expert_options: Any,
    ) -> torch.Tensor:
        ex = self.exchange
        N, r = ex.world_size, ex.rank
        T, H = x.shape
        if self.owner.device != x.device:
            self.owner = self.owner.to(x.device)
            self.first_expert = self.first_expert.to(x.device)
        # load accounting, from the full (replicated) assignment: no communication
        self.pairs_per_rank += torch.bincount(self.owner[a.expert_ids], minlength=N).cpu()
        t0, t1 = token_range(T, N, r)
        p0, p1 = a.token_offsets[[t0, t1]].tolist()
        tok = a.token_ids[p0:p1]  # [p]
        exp = a.expert_ids[p0:p1]  # [p]
        dest = self.owner[exp]  # [p]
        order = torch.argsort(dest, stable=True)  # [p] pairs grouped by destination rank
        send_counts = torch.bincount(dest, minlength=N).tolist()
        send_rows = x.index_select(0, tok[order])  # [p, H]
        send_ids = (exp - self.first_expert[dest])[order]  # [p] expert ids local to the destination
        recv_rows, recv_ids, recv_counts = ex.dispatch(send_rows, send_ids, send_counts)  # [R, H], [R]
        # local experts: every received row is its own token with one pair of weight 1
        tstart = time.perf_counter()
        R = recv_rows.shape[0]
        ar = torch.arange(R + 1, device=x.device, dtype=torch.int64)  # [R+1]
        local = Assignment(
            R, int(w13.shape[0]), ar[:R], recv_ids, torch.ones(R, dtype=torch.float32, device=x.device), ar
        )
        y = dynserve_kernels.fused_moe(recv_rows, w13, w2, local, backend, **expert_options)  # [R, H]
        if self.profile_cuda and x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.stats.experts_s += time.perf_counter() - tstart
        back = ex.combine(y, recv_counts, send_counts)  # [p, H], send order
        # weighted combine per token, in token-major pair order (the 1-rank kernel's order)
        y_pairs = torch.empty_like(back)  # [p, H]
        y_pairs[order] = back
        n_tok = t1 - t0
        if p1 > p0:
            y_pairs = y_pairs.float() * a.weights[p0:p1, None].float()  # [p, H]
            lengths = a.token_offsets[t0 + 1 : t1 + 1] - a.token_offsets[t0:t1]  # [n_tok]
            out_slice = torch.segment_reduce(y_pairs, "sum", lengths=lengths, axis=0).to(x.dtype)  # [n_tok, H]
        else:
            out_slice = torch.zeros(n_tok, H, dtype=x.dtype, device=x.device)
        sizes = [token_range(T, N, j)[1] - token_range(T, N, j)[0] for j in range(N)]
        self.stats.calls += 1
        return ex.all_gather_rows(out_slice, sizes)  # [T, H]
