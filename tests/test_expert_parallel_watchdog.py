"""Expert-parallel liveness: a worker rank that dies or freezes fails the engine within the heartbeat
timeout (and is killed, never left behind); workers leave when rank 0 dies or freezes; a healthy engine
is never declared dead. Two ranks on the CPU (gloo), the tiny Mixtral checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

from dynserve import LLM, SamplingParams
from dynserve.config import EngineConfig
from dynserve.engine.async_engine import AsyncEngine, EngineDeadError

HEARTBEAT_TIMEOUT = 3.0
SLACK = 5.0  # seconds a failure may take beyond the heartbeat timeout on a busy 2-core machine
LONG = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _running(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _workers(parent: int) -> set[int]:
    """Live expert-parallel worker processes whose parent is `parent`."""
    found = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        st = _stat(int(d))
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read()
        except OSError:
            continue
        if st is not None and st[1] == parent and st[0] != "Z" and b"dynserve.engine.expert_parallel" in cmd:
            found.add(int(d))
    return found


def _wait_until(predicate, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def _kill_if_ours(pid: int, parent: int) -> None:
    st = _stat(pid)
    if st is not None and st[1] == parent:
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _engine(ckpt: Path, heartbeat_timeout: float = HEARTBEAT_TIMEOUT) -> Iterator[tuple[AsyncEngine, int, list]]:
    """An AsyncEngine over a 2-rank engine, its worker's pid and the errors its death callbacks got."""
    before = _workers(os.getpid())
    config = EngineConfig.create(
        str(ckpt), num_kv_blocks=64, expert_parallel_size=2, expert_parallel_heartbeat_timeout=heartbeat_timeout
    )
    engine = AsyncEngine.from_config(config)
    (worker,) = _workers(os.getpid()) - before
    deaths: list[BaseException] = []
    engine.add_death_callback(deaths.append)
    try:
        yield engine, worker, deaths
    finally:
        _kill_if_ours(worker, os.getpid())  # a test that failed must not leave a frozen worker
        t0 = time.monotonic()
        engine.shutdown_sync(timeout=1.0)
        shutdown_s = time.monotonic() - t0
    assert shutdown_s < 5, "shutting down the expert-parallel engine blocked"
    assert not dist.is_initialized(), "the process group outlived the engine"


async def _consume(stream, on_token: int, action) -> int:
    """Read `stream`; call `action()` once after `on_token` outputs; return how many came."""
    n = 0
    async for _ in stream:
        n += 1
        if n == on_token:
            action()
    return n


# ------------------------------------------------------------------ a worker dies
@pytest.mark.parametrize("when", ["idle", "mid_request"])
def test_killed_worker_fails_the_engine_at_once(mixtral_dir, when: str) -> None:
    with _engine(mixtral_dir) as (engine, worker, deaths):

        async def run() -> None:
            outs = [o async for o in engine.generate("def hello", SamplingParams(max_tokens=4), "warm")]
            assert outs[-1].finished
            if when == "idle":
                os.kill(worker, signal.SIGKILL)
                t0 = time.monotonic()
                # nobody is stepping: only the watchdog can notice
                assert await asyncio.to_thread(_wait_until, lambda: not engine.is_healthy, HEARTBEAT_TIMEOUT + SLACK)
                assert time.monotonic() - t0 < 2.0  # a dead process needs no heartbeat timeout
                with pytest.raises(EngineDeadError, match="rank 1"):
                    await engine.add_request("late", "x", LONG)
            else:
                stream = await engine.add_request("long", "def hello", LONG)
                with pytest.raises(EngineDeadError) as info:
                    await asyncio.wait_for(
                        _consume(stream, 3, lambda: os.kill(worker, signal.SIGKILL)), HEARTBEAT_TIMEOUT + SLACK
                    )
                # the error names the cause, not just the broken connection it left behind
                assert f"rank 1 (pid {worker}) exited with code -9 (SIGKILL)" in str(info.value)

        asyncio.run(run())
        assert not engine.is_healthy
        assert _wait_until(lambda: bool(deaths), 2.0)  # the death callbacks run just after the waiters hear
        assert len(deaths) == 1 and f"rank 1 (pid {worker})" in str(deaths[0])
        assert "exited with code -9" in str(engine.dead_error)


# ------------------------------------------------------------------ a worker freezes
def test_frozen_worker_fails_the_engine_within_the_heartbeat_timeout_and_is_killed(mixtral_dir) -> None:
    with _engine(mixtral_dir) as (engine, worker, deaths):
        stopped_at: list[float] = []

        def freeze() -> None:
            os.kill(worker, signal.SIGSTOP)
            stopped_at.append(time.monotonic())

        async def run() -> None:
            stream = await engine.add_request("long", "def hello", LONG)
            with pytest.raises(EngineDeadError, match="has not answered"):
                await asyncio.wait_for(_consume(stream, 3, freeze), HEARTBEAT_TIMEOUT + SLACK)

        asyncio.run(run())
        took = time.monotonic() - stopped_at[0]
        assert HEARTBEAT_TIMEOUT - 0.5 <= took <= HEARTBEAT_TIMEOUT + SLACK
        assert not engine.is_healthy
        assert _wait_until(lambda: bool(deaths), 2.0) and len(deaths) == 1
        assert f"rank 1 (pid {worker}) has not answered" in str(deaths[0])
        # the frozen worker is killed (SIGKILL ends a stopped process) and reaped: no orphan
        assert _wait_until(lambda: _stat(worker) is None, 5.0), f"frozen worker {worker} left behind: {_stat(worker)}"


# ------------------------------------------------------------------ a healthy engine stays up
def test_healthy_engine_is_never_declared_dead(mixtral_dir) -> None:
    with _engine(mixtral_dir, heartbeat_timeout=2.0) as (engine, worker, deaths):

        async def burst(tag: str) -> list[int]:
            async def one(i: int) -> int:
                outs = [o async for o in engine.generate(f"prompt {i}", SamplingParams(max_tokens=24), f"{tag}{i}")]
                return len(outs[-1].outputs[0].token_ids)

            return await asyncio.gather(*(one(i) for i in range(4)))

        async def run() -> None:
            assert all(n > 0 for n in await burst("a"))
            await asyncio.sleep(3.0)  # idle for longer than the heartbeat timeout
            assert all(n > 0 for n in await burst("b"))

        asyncio.run(run())
        assert engine.is_healthy and not deaths
        assert _running(worker)


# ------------------------------------------------------------------ a worker on another machine
def test_frozen_worker_node_fails_the_engine_and_is_told_to_exit(mixtral_dir, tmp_path) -> None:
    """Node 1 (started by `dynserve serve --node-rank 1`, here on loopback) freezes: rank 0 has no process
    to poll, only the heartbeat; once resumed, node 1 learns the group failed and exits non-zero."""
    addr = f"127.0.0.1:{_free_port()}"
    dist_args = ["--expert-parallel-size", "2", "--nnodes", "2", "--dist-init-addr", addr]
    log = tmp_path / "node1.log"
    with open(log, "wb") as logf:
        node1 = subprocess.Popen(
            [sys.executable, "-m", "dynserve.cli", "serve", str(mixtral_dir), *dist_args, "--node-rank", "1"]
            + ["--expert-parallel-heartbeat-timeout", "2"],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    llm = None
    try:
        llm = LLM(
            str(mixtral_dir),
            num_kv_blocks=64,
            expert_parallel_size=2,
            nnodes=2,
            node_rank=0,
            dist_init_addr=addr,
            expert_parallel_heartbeat_timeout=2.0,
        )
        failures: list[BaseException] = []
        llm.engine.set_failure_handler(failures.append)
        assert llm.generate("def hello", SamplingParams(max_tokens=3))[0].outputs[0].token_ids
        os.kill(node1.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        assert _wait_until(lambda: bool(failures), 2.0 + SLACK), "a frozen worker node went unnoticed"
        assert time.monotonic() - t0 >= 1.5
        assert "rank 1 (on node 1) has not answered" in str(failures[0])
        with pytest.raises(RuntimeError, match="has failed"):  # the next step fails at once
            llm.generate("def hello", SamplingParams(max_tokens=3))
        os.kill(node1.pid, signal.SIGCONT)
        assert node1.wait(10) == 1, log.read_text()[-2000:]
        assert "dynserve expert-parallel rank 1:" in log.read_text()
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()
        if llm is not None:
            llm.close()
    assert len(failures) == 1


# ------------------------------------------------------------------ rank 0 freezes
def test_workers_exit_when_rank0_freezes(mixtral_dir, tmp_path) -> None:
    log = tmp_path / "rank0.log"
    code = textwrap.dedent(
        f"""
        import time
        from dynserve import LLM
        llm = LLM({str(mixtral_dir)!r}, num_kv_blocks=64, expert_parallel_size=2, expert_parallel_heartbeat_timeout=2)
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    with open(log, "wb") as logf:
        rank0 = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=logf)
    try:
        assert rank0.stdout is not None and rank0.stdout.readline() == b"ready\n", log.read_text()[-2000:]
        (worker,) = _workers(rank0.pid)
        rank0.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        assert _wait_until(lambda: not _running(worker), 2.0 + SLACK), "the worker outlived a frozen rank 0"
        assert time.monotonic() - t0 >= 1.5
        assert "rank 0 (the engine process) has not" in log.read_text()
    finally:
        rank0.kill()  # also ends a stopped process
        rank0.wait()


# ------------------------------------------------------------------ the server process
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=lambda s: s.name)
def test_server_exits_nonzero_when_a_worker_dies_or_freezes(mixtral_dir, tmp_path, sig: signal.Signals) -> None:
    import httpx

    port = _free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "dynserve.cli", "serve", str(mixtral_dir), "--expert-parallel-size", "2"]
    cmd += ["--port", str(port), "--num-kv-blocks", "64", "--expert-parallel-heartbeat-timeout", "3"]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    workers: set[int] = set()
    try:

        def up() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert _wait_until(up, 60, 0.2), log.read_text()[-3000:]
        workers = _workers(proc.pid)
        assert len(workers) == 1
        os.kill(next(iter(workers)), sig)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server is still running 60 s after its worker got {sig.name}")
        assert proc.returncode != 0, log.read_text()[-3000:]
        assert "expert-parallel worker rank 1" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _wait_until(lambda: not any(_stat(w) for w in workers), 5.0), "a worker outlived the server"
