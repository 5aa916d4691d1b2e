"""Expert parallelism on the CPU (gloo): the ragged exchange itself, and greedy equality of N-rank
engines (offline API and a live server) with the 1-rank engine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
from dynserve_kernels.moe_ref import fused_moe_ref

from dynserve import LLM, RoutingConfig, SamplingParams
from dynserve.model.experts import (
    ExpertParallelExperts,
    TorchDistributedExchange,
    expert_range,
    token_range,
)
from dynserve.routing.base import Assignment

PROMPTS = ["def hello(name):", "The quick brown fox", "import os", "class Foo"]
PARAMS = [
    SamplingParams(max_tokens=6, temperature=0.0),
    SamplingParams(
        max_tokens=6, temperature=0.0, routing=RoutingConfig(policy="top_p", p=0.5), return_routed_experts=True
    ),
    SamplingParams(max_tokens=6, temperature=0.0, routing=RoutingConfig(policy="top_k", k=1)),
    SamplingParams(max_tokens=6, temperature=0.0, routing=RoutingConfig(policy="top_p", p=0.9, max_experts=3)),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers(parent: int | None = None) -> set[int]:
    """Live expert-parallel worker processes whose parent is `parent` (default: this process)."""
    parent = os.getpid() if parent is None else parent
    found = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
            cmd = open(f"/proc/{d}/cmdline", "rb").read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and fields[0] != "Z" and b"dynserve.engine.expert_parallel" in cmd:
            found.add(int(d))
    return found


def test_partitions_are_contiguous_and_uneven() -> None:
    assert [expert_range(4, 3, r) for r in range(3)] == [(0, 2), (2, 3), (3, 4)]
    assert [expert_range(8, 2, r) for r in range(2)] == [(0, 4), (4, 8)]
    assert [token_range(2, 3, r) for r in range(3)] == [(0, 0), (0, 1), (1, 2)]  # rank 0: no tokens


# ------------------------------------------------------------------ the exchange (3 gloo processes)
def _exchange_rank(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ex = TorchDistributedExchange()
        # counts[i][j]: rows rank i sends rank j; rank 1 sends nothing, rank 2 receives nothing from 0
        counts = [[2, 3, 0], [0, 0, 0], [1, 4, 5]]
        send = counts[rank]
        rows = torch.cat(
            [
                torch.tensor([[rank, j, i] for i in range(n)], dtype=torch.float32).reshape(n, 3)
                for j, n in enumerate(send)
            ]
        )  # [sum(send), 3]
        ids = torch.arange(rows.shape[0], dtype=torch.int64) + 100 * rank  # [sum(send)]
        recv_rows, recv_ids, recv_counts = ex.dispatch(rows, ids, send)
        assert recv_counts == [counts[i][rank] for i in range(world)]
        want = [[i, rank, k] for i in range(world) for k in range(counts[i][rank])]
        assert recv_rows.tolist() == want
        back = ex.combine(recv_rows * 10, recv_counts, send)
        assert torch.equal(back, rows * 10)
        assert ex.stats.bytes_sent > 0 or sum(send) == 0

        # the MoE layer: ragged variable-k pairs (some tokens with k = 0), 4 experts on 3 ranks, T = 2
        # tokens so rank 0 dispatches no tokens at all; every rank must get the 1-rank kernel's output
        g = torch.Generator().manual_seed(0)
        E, H, inter = 4, 8, 6
        w13 = torch.randn(E, 2 * inter, H, generator=g)  # [E, 2I, H]
        w2 = torch.randn(E, H, inter, generator=g)  # [E, H, I]
        moe = ExpertParallelExperts(ex, E)
        s, e = expert_range(E, world, rank)
        for T in (2, 7):
            x = torch.randn(T, H, generator=g)  # [T, H]
            mask = torch.rand(T, E, generator=g) < 0.5  # [T, E]
            mask[0] = False  # a token with no expert
            a = Assignment.from_mask(mask, torch.rand(T, E, generator=g))
            sent0 = ex.stats.bytes_sent
            out = moe(x, w13[s:e], w2[s:e], a)  # [T, H]
            # bytes are paid per existing pair only: counts, then a row + an id per pair this rank
            # dispatches, a row back per pair it computed, and its token slice for the gather
            t0, t1 = token_range(T, world, rank)
            mine = int(a.token_offsets[t1] - a.token_offsets[t0])
            computed = int(((a.expert_ids >= s) & (a.expert_ids < e)).sum())
            width = max(token_range(T, world, j)[1] - token_range(T, world, j)[0] for j in range(world))
            want_bytes = world * 8 + mine * (H * 4 + 8) + computed * H * 4 + width * H * 4 * (world - 1)
            assert ex.stats.bytes_sent - sent0 == want_bytes
            torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, a), rtol=1e-5, atol=1e-5)
            assert out[0].abs().sum() == 0
        assert moe.pairs_per_rank.sum() > 0
    finally:
        dist.destroy_process_group()


def test_exchange_uneven_splits_and_moe_layer_match_one_rank() -> None:
    torch.multiprocessing.spawn(_exchange_rank, args=(3, _free_port()), nprocs=3, join=True)


# ------------------------------------------------------------------ the engine through LLM.generate
@pytest.fixture(scope="module")
def reference(checkpoint_factory):
    cache: dict[str, tuple[list[list[int]], list[int], list[str]]] = {}

    def get(arch: str) -> tuple[list[list[int]], list[int], list[str]]:
        """1-rank greedy token ids, expert activations and texts of PROMPTS[i] under PARAMS[i]."""
        if arch not in cache:
            llm = LLM(str(checkpoint_factory(arch)), num_kv_blocks=64)
            outs = llm.generate(PROMPTS, PARAMS)
            cache[arch] = (
                [o.outputs[0].token_ids for o in outs],
                [o.expert_usage.expert_activations for o in outs],
                [o.outputs[0].text for o in outs],
            )
        return cache[arch]

    return get


@pytest.mark.parametrize(
    "arch,ranks", [("mixtral", 2), ("mixtral", 3), ("qwen3_moe", 2), ("qwen3_moe", 3), ("gpt_oss", 3)]
)  # gpt_oss: expert biases follow their experts
def test_expert_parallel_generate_matches_one_rank(checkpoint_factory, reference, arch: str, ranks: int) -> None:
    tokens, activations, _ = reference(arch)
    before = _workers()
    llm = LLM(str(checkpoint_factory(arch)), num_kv_blocks=64, expert_parallel_size=ranks)
    try:
        assert len(_workers() - before) == ranks - 1  # one worker process per extra rank
        outs = llm.generate(PROMPTS, PARAMS)
        assert [o.outputs[0].token_ids for o in outs] == tokens
        assert [o.expert_usage.expert_activations for o in outs] == activations  # usage stays exact
        routed = outs[1].prompt_routed_experts.tolist() + outs[1].outputs[0].routed_experts.tolist()
        assert routed[-1] is None and None not in routed[:-1]  # routed experts: every computed position
        assert sum(len(ids) for row in routed[:-1] for ids in row) == activations[1]
        per_rank = llm.get_stats().expert_parallel_pairs_per_rank
        assert per_rank is not None and len(per_rank) == ranks and all(n > 0 for n in per_rank)
        assert sum(per_rank) == llm.get_stats().expert_activations
    finally:
        llm.close()
    deadline = time.monotonic() + 10
    while _workers() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (_workers() - before), "expert-parallel workers outlived close()"


def test_zero_computation_experts_two_ranks_match_one_rank(tmp_path) -> None:
    """LongCat-Flash (identity experts handled locally, variable k) on 2 ranks = 1 rank."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_native_routing import make_longcat

    path = str(make_longcat(tmp_path / "longcat"))
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    sp = SamplingParams(max_tokens=6, temperature=0.0)
    ref = LLM(path, num_kv_blocks=64).generate(prompt_token_ids=prompts, sampling_params=sp)
    with LLM(path, num_kv_blocks=64, expert_parallel_size=2) as llm:
        got = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    assert [o.expert_usage.expert_activations for o in got] == [o.expert_usage.expert_activations for o in ref]


def test_expert_parallel_size_must_fit_the_experts(checkpoint_factory) -> None:
    with pytest.raises(ValueError, match="expert_parallel_size"):
        LLM(str(checkpoint_factory("mixtral")), expert_parallel_size=5)  # 4 experts


def test_cli_two_nodes_on_loopback_match_one_rank(checkpoint_factory, reference, tmp_path) -> None:
    """The documented multi-node commands, both "machines" on loopback: node 1 runs rank 1, node 0
    (rank 0) generates; the text equals the 1-rank engine's and both processes exit 0."""
    import json

    ckpt = str(checkpoint_factory("mixtral"))
    _, activations, texts = reference("mixtral")
    common = ["--expert-parallel-size", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{_free_port()}"]
    cli = [sys.executable, "-m", "dynserve.cli"]
    node1 = subprocess.Popen(
        [*cli, "serve", ckpt, *common, "--node-rank", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        node0 = subprocess.run(
            [
                *cli,
                "generate",
                ckpt,
                *common,
                "--node-rank",
                "0",
                "--num-kv-blocks",
                "64",
                "--prompt",
                PROMPTS[0],
                "--max-tokens",
                "6",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert node0.returncode == 0, node0.stderr[-3000:]
        out = json.loads(node0.stdout.strip().splitlines()[-1])
        assert out["outputs"][0]["text"] == texts[0]
        assert out["expert_activations"] == activations[0]
        node1.wait(30)
        assert node1.returncode == 0, node1.stdout.read()[-3000:] if node1.stdout else ""
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()


# ------------------------------------------------------------------ a live server with 2 ranks
@pytest.mark.slow
def test_server_with_two_ranks_matches_offline(checkpoint_factory, reference, tmp_path) -> None:
    import httpx
    import openai

    ckpt = str(checkpoint_factory("mixtral"))
    _, activations, texts = reference("mixtral")
    port = _free_port()
    log = tmp_path / "server.log"
    code = textwrap.dedent(
        f"""
        from dynserve.config import EngineConfig
        from dynserve.server.run import ServerSettings, run_server
        cfg = EngineConfig.create({ckpt!r}, num_kv_blocks=64, expert_parallel_size=2)
        run_server(cfg, ServerSettings(host="127.0.0.1", port={port}, served_model_name="m", log_level="warning"))
        """
    )
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=logf, stderr=subprocess.STDOUT)
    workers: list[int] = []
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        workers = sorted(_workers(proc.pid))
        assert len(workers) == 1  # rank 1
        body = {"model": "m", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0.0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert r["choices"][0]["text"] == texts[0]
        assert r["usage"]["expert_activations"] == activations[0]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
        stream = client.completions.create(
            model="m",
            prompt=PROMPTS[1],
            max_tokens=6,
            temperature=0.0,
            stream=True,
            extra_body={"routing": {"policy": "top_p", "p": 0.5}},
        )
        assert "".join(c.choices[0].text for c in stream if c.choices) == texts[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, log.read_text()[-3000:]
    deadline = time.monotonic() + 5
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers), "a worker outlived the server"
