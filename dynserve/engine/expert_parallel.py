"""Expert parallelism over torch.distributed: N ranks, each holding 1/N of every MoE layer's experts.

Owns the multi-process side of the engine (the expert compute itself, `ExpertParallelExperts`,
sits beside the MoE layer in dynserve/model/experts.py and is handed to the model when it is built):
- `ExpertParallelRuntime`: on rank 0 (the engine process) spawns the worker ranks of this machine,
  broadcasts every step's ForwardBatch to them and stops them on `close()`; its watchdog thread fails
  the engine when a worker exits or its heartbeat is older than `expert_parallel_heartbeat_timeout`.
- `worker_main` / `run_worker_node`: the worker side (`python -m dynserve.engine.expert_parallel`):
  load the model shard, keep a full KV-cache copy, follow rank 0's steps in lockstep; `_WorkerLiveness`
  beats and ends the worker when rank 0 dies or freezes.

Multi-node: every machine runs the same command with `--nnodes M --node-rank k --dist-init-addr HOST:PORT`;
node 0 serves, node k > 0 runs ranks k*N/M .. (k+1)*N/M - 1 as workers.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from dynserve.model.experts import ExpertParallelExperts, TorchDistributedExchange

if TYPE_CHECKING:
    from dynserve.config import EngineConfig
    from dynserve.model.base import ForwardBatch

logger = logging.getLogger("dynserve.expert_parallel")

_COLLECTIVE_TIMEOUT_S = float(os.environ.get("DYNSERVE_EP_TIMEOUT", "60"))  # one MoE-exchange collective
_RENDEZVOUS_TIMEOUT = timedelta(minutes=10)  # every machine must have joined by then
_IDLE_TIMEOUT = timedelta(days=365)  # workers wait on the control channel while the engine is idle


# ------------------------------------------------------------------------------------------ partitions
# ------------------------------------------------------------------------------------------ runtime
@dataclass
class _WorkerSpec:
    config: Any
    rank: int
    world_size: int
    local_rank: int
    init_method: str
    parent_pid: int | None


def _backend_for(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init_method(config: EngineConfig) -> str:
    if config.dist_init_addr:
        return f"tcp://{config.dist_init_addr}"
    return f"tcp://127.0.0.1:{_free_port()}"


def _spawn_workers(config: EngineConfig, init_method: str, ranks: list[int], base_rank: int) -> list[subprocess.Popen]:
    procs = []
    for rank in ranks:
        spec = _WorkerSpec(config, rank, config.expert_parallel_size, rank - base_rank, init_method, os.getpid())
        p = subprocess.Popen(
            [sys.executable, "-m", "dynserve.engine.expert_parallel"], stdin=subprocess.PIPE, close_fds=True
        )
        assert p.stdin is not None
        p.stdin.write(pickle.dumps(spec))
        p.stdin.close()
        procs.append(p)
    return procs


def _init_groups(backend: str, init_method: str, rank: int, world_size: int) -> tuple[Any, Any]:
    """Join the job; returns (exchange group, control group). The rendezvous waits up to 10 minutes for
    every machine; one MoE-exchange collective at most `DYNSERVE_EP_TIMEOUT` seconds, so a peer that hangs
    in a step is an error in bounded time; the control group (step broadcasts, which workers wait on while
    the engine is idle) never times out."""
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=_RENDEZVOUS_TIMEOUT
    )
    exchange = dist.new_group(backend=backend, timeout=timedelta(seconds=_COLLECTIVE_TIMEOUT_S))
    control = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)  # step broadcasts (CPU objects)
    return exchange, control


def _batch_to(batch: ForwardBatch, device: torch.device | str) -> ForwardBatch:
    """A copy of `batch` with every tensor on `device` and empty per-layer outputs."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            changes[f.name] = v.to(device)
    routing = batch.routing
    if routing.config_index is not None:
        routing = dataclasses.replace(routing, config_index=routing.config_index.to(device))
    changes["routing"] = routing
    changes["expert_counts"] = []
    changes["expert_token_counts"] = None
    changes["assignments"] = []
    return dataclasses.replace(batch, **changes)


# ------------------------------------------------------------------------------------------ liveness
# Every rank beats by incrementing its own counter in the rendezvous TCPStore, which is served from rank
# 0's process and so reaches workers on every machine. Rank 0 watches the workers' counters (and the exit
# status of the workers it spawned); a worker watches rank 0's counter and its own calls into the store.
_HEARTBEAT_KEY = "dynserve/expert_parallel/heartbeat/{rank}"
_ABORT_KEY = "dynserve/expert_parallel/abort"  # set by rank 0 when it declares the group failed


def _heartbeat_interval(timeout: float) -> float:
    return min(0.5, timeout / 4)


def _store_client(init_method: str, timeout: float) -> dist.TCPStore:
    """A new connection to the rendezvous store (`tcp://HOST:PORT`), which rank 0's process serves."""
    host, port = init_method.removeprefix("tcp://").rsplit(":", 1)
    return dist.TCPStore(host.strip("[]"), int(port), is_master=False, timeout=timedelta(seconds=timeout))


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"exited with code {code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"exited with code {code}"


def _notify(handler: Callable[[BaseException], None], error: BaseException) -> None:
    try:
        handler(error)
    except BaseException:  # noqa: BLE001 - the watchdog must go on to stop the workers
        logger.exception("expert-parallel failure handler failed")


class _WorkerLiveness:
    """A worker's half of the heartbeat. Beats its counter in rank 0's store every ~0.5 s and ends the
    process (code 1) when rank 0 is gone or frozen: the parent pid changed (the engine process that spawned
    it died), the store connection broke (rank 0's process died), rank 0's counter has not moved or a store
    call has not returned for `timeout` s (rank 0 frozen), or rank 0 declared the group failed.
    `stop()` (rank 0 said stop) turns the checks off, for a clean exit."""

    def __init__(self, rank: int, timeout: float, parent_pid: int | None) -> None:
        self.rank = rank
        self.timeout = timeout
        self.interval = _heartbeat_interval(timeout)
        self.parent_pid = parent_pid
        self._stopping = threading.Event()
        self._call_started: float | None = None  # when the store call in progress began

    def watch_parent(self) -> None:
        """Start the checks that need no process group (parent pid, hanging store calls)."""
        threading.Thread(target=self._watch, name="dynserve-ep-liveness", daemon=True).start()

    def start_beating(self, init_method: str) -> None:
        threading.Thread(target=self._beat, args=(init_method,), name="dynserve-ep-heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()

    def _beat(self, init_method: str) -> None:
        self._call_started = time.monotonic()
        try:
            store = _store_client(init_method, self.timeout)
        except Exception as e:  # noqa: BLE001
            self._exit(f"cannot reach rank 0's store ({type(e).__name__}: {e})")
            return
        mine, rank0 = _HEARTBEAT_KEY.format(rank=self.rank), _HEARTBEAT_KEY.format(rank=0)
        last, changed = -1, time.monotonic()
        while not self._stopping.is_set():
            self._call_started = time.monotonic()
            try:
                store.add(mine, 1)
                count = store.add(rank0, 0)
                aborted = store.check([_ABORT_KEY])
            except Exception as e:  # noqa: BLE001 - the store lives in rank 0's process: it is gone
                # unless it is closing down normally: "stop" may still be on its way to the main thread
                if not self._stopping.wait(1.0):
                    self._exit(f"lost rank 0 ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
                return
            now = time.monotonic()
            self._call_started = None
            if aborted:
                self._exit("rank 0 declared the expert-parallel group failed")
                return
            if count != last:
                last, changed = count, now
            elif now - changed > self.timeout:
                self._exit(f"rank 0 (the engine process) has not beaten for {now - changed:.1f} s")
                return
            time.sleep(self.interval)

    def _watch(self) -> None:
        while not self._stopping.wait(self.interval):
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self._exit("the engine process that started this worker is gone")
            started = self._call_started
            if started is not None and time.monotonic() - started > self.timeout:
                self._exit(f"rank 0 (the engine process) has not answered for {time.monotonic() - started:.1f} s")

    def _exit(self, why: str) -> None:
        if self._stopping.is_set():  # stopping anyway: rank 0 tearing down the store is no news
            return
        print(f"dynserve expert-parallel rank {self.rank}: {why}; exiting", file=sys.stderr, flush=True)
        os._exit(1)


# ------------------------------------------------------------------------------------------ rank 0
class ExpertParallelRuntime:
    """Rank 0's side of expert parallelism: owns the process groups, the worker processes of this
    machine, the model's `ExpertParallelExperts` (`experts`); hands each step to the workers (`step`); watches that
    every worker rank is alive (a daemon watchdog thread, from construction on; see `start_watchdog`);
    `close()` stops the workers (also registered with atexit, so no worker outlives the engine process)."""

    def __init__(self, config: EngineConfig) -> None:
        """Spawn this machine's worker ranks and join the process groups; `experts` is then the
        executor to build rank 0's model with, and `ready(num_kv_blocks)` waits for every rank."""
        N = config.expert_parallel_size
        nnodes = config.nnodes
        if N % nnodes:
            raise ValueError(f"expert_parallel_size ({N}) must be a multiple of nnodes ({nnodes})")
        if dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialized in this process (another expert-parallel engine "
                "that was not closed?): call LLM.close() on it first"
            )
        self.config = config
        self.world_size = N
        self.heartbeat_timeout = config.expert_parallel_heartbeat_timeout
        self._lock = threading.Lock()
        self._closed = False
        self._failure: BaseException | None = None
        self._on_failure: Callable[[BaseException], None] | None = None
        self._stop_watch = threading.Event()
        self._idle = threading.Event()  # set while no step is in flight
        self._idle.set()
        self._store: Any = None
        if nnodes > 1 and not config.dist_init_addr:
            raise ValueError("--dist-init-addr HOST:PORT is required with --nnodes > 1")
        init_method = _init_method(config)
        self._per_node = N // nnodes
        self._local_ranks = list(range(1, self._per_node))  # the ranks of self.procs
        self.procs = _spawn_workers(config, init_method, self._local_ranks, 0)
        try:
            if torch.device(config.device).type == "cuda":
                torch.cuda.set_device(torch.device(config.device))
            self.group, self.control = _init_groups(_backend_for(config.device), init_method, 0, N)
            self._store = _store_client(init_method, self.heartbeat_timeout)
            threading.Thread(target=self._watch, name="dynserve-ep-watchdog", daemon=True).start()
            self.experts = ExpertParallelExperts(TorchDistributedExchange(self.group), config.model.num_experts)
        except BaseException:
            self._kill()
            raise
        atexit.register(self.close)  # workers never outlive the engine process

    def ready(self, num_kv_blocks: int) -> None:
        """Rank 0's model is built with `experts`: tell the workers the KV-cache size and wait until
        every rank has loaded its model shard (a worker that dies meanwhile raises here)."""
        try:
            dist.broadcast_object_list([("init", num_kv_blocks)], src=0, group=self.control)
            self._wait_for(dist.barrier(group=self.control, async_op=True), "loading the model shard")
        except BaseException:
            self._kill()
            raise

    def _wait_for(self, work: Any, what: str) -> None:
        while not work.is_completed():
            failure = self._failure or self._exited_worker()
            if failure is not None:
                raise RuntimeError(f"{failure} while {what}") from failure
            time.sleep(0.01)
        work.wait()

    @contextmanager
    def step(self, batch: ForwardBatch) -> Iterator[None]:
        """Hand this step's batch to every worker (they run the same forward in lockstep), then run the
        body: rank 0's forward. An error in between leaves the ranks out of lockstep for good: the group
        is declared failed (workers stopped, the failure handler told) and the error raised is the
        watchdog's account of the cause when there is one (a worker that died or froze)."""
        self._idle.clear()
        try:
            if self._failure is not None:
                raise RuntimeError(f"the expert-parallel group has failed: {self._failure}") from self._failure
            if self._closed:
                raise RuntimeError("the expert-parallel group is closed")
            try:
                dist.broadcast_object_list([("step", _batch_to(batch, "cpu"))], src=0, group=self.control)
                yield
            except Exception as e:
                raise self._step_failed(e) from e
        finally:
            self._idle.set()

    def pairs_per_rank(self) -> list[int]:
        return self.experts.pairs_per_rank.tolist()

    @property
    def failure(self) -> BaseException | None:
        """Why the group failed (a worker died or froze, a step failed), or None."""
        return self._failure

    def start_watchdog(self, on_failure: Callable[[BaseException], None]) -> None:
        """Call `on_failure(error)` once, from the watchdog thread (or the engine thread, for a failed
        step), when a worker rank exits or its heartbeat is older than `expert_parallel_heartbeat_timeout`
        seconds (frozen, its machine gone); the local workers are killed first and remote ones told to
        exit. The watchdog runs from construction on: without a handler the next step raises the error.
        If the group failed already, `on_failure` is called at once."""
        with self._lock:
            self._on_failure = on_failure
            failure = self._failure
        if failure is not None:
            _notify(on_failure, failure)

    def _where(self, rank: int) -> str:
        if rank in self._local_ranks:
            return f"pid {self.procs[self._local_ranks.index(rank)].pid}"
        return f"on node {rank // self._per_node}"

    def _exited_worker(self) -> BaseException | None:
        for rank, p in zip(self._local_ranks, self.procs, strict=True):
            code = p.poll()
            if code is not None:
                return RuntimeError(f"expert-parallel worker rank {rank} (pid {p.pid}) {_describe_exit(code)}")
        return None

    def _watch(self) -> None:
        """The watchdog thread: beat rank 0's counter; check the workers' processes and counters."""
        timeout = self.heartbeat_timeout
        start = time.monotonic()
        seen = {r: (-1, start) for r in range(1, self.world_size)}  # rank -> (count, when it last moved)
        while not self._stop_watch.wait(_heartbeat_interval(timeout)):
            error = self._exited_worker()
            if error is None:
                try:
                    self._store.add(_HEARTBEAT_KEY.format(rank=0), 1)
                    counts = {r: self._store.add(_HEARTBEAT_KEY.format(rank=r), 0) for r in seen}
                except Exception as e:  # noqa: BLE001 - the store lives in this process: torn down
                    if self._stop_watch.is_set():
                        return
                    error = RuntimeError(f"the expert-parallel heartbeat store failed: {e}")
                else:
                    now = time.monotonic()
                    for r, n in counts.items():
                        if n != seen[r][0]:
                            seen[r] = (n, now)
                        elif now - seen[r][1] > timeout:
                            error = RuntimeError(
                                f"expert-parallel worker rank {r} ({self._where(r)}) has not answered for "
                                f"{now - seen[r][1]:.1f} s (heartbeat timeout {timeout:g} s)"
                            )
                            break
            if error is not None:
                self._fail(error)
                return

    def _step_failed(self, error: BaseException) -> BaseException:
        # a killed worker's sockets close a moment before its exit status can be read
        deadline = time.monotonic() + 1.0
        cause = self._failure or self._exited_worker()
        while cause is None and time.monotonic() < deadline:
            time.sleep(0.02)
            cause = self._failure or self._exited_worker()
        self._fail(cause or RuntimeError(f"an expert-parallel step failed: {error!r}"))
        return self._failure or cause or error

    def _fail(self, error: BaseException) -> None:
        """Declare the group failed (once): kill this machine's workers, tell the others to exit, then
        tell the failure handler."""
        with self._lock:
            if self._failure is not None or self._closed:
                return
            self._failure = error
            handler = self._on_failure
        self._stop_watch.set()
        logger.error("%s: stopping the expert-parallel workers", error)
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # SIGKILL ends a stopped (SIGSTOP) process too; its peers' collectives fail at once
        try:
            self._store.set(_ABORT_KEY, str(error))  # workers on other machines exit
        except Exception:  # noqa: BLE001
            pass
        if handler is not None:
            _notify(handler, error)
        for p in self.procs:
            p.wait()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers and leave the process group (idempotent). Bounded: a dead or frozen worker is
        killed, and a step that is still stuck in a collective after that leaves the group as it is."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        self._stop_watch.set()
        idle = self._idle.wait(timeout if self._failure is None else 0.0)
        clean = idle and self._failure is None
        if clean:
            try:
                dist.broadcast_object_list([("stop", None)], src=0, group=self.control)
            except Exception:  # noqa: BLE001 - a dead worker must not block shutdown
                clean = False
        deadline = time.monotonic() + (timeout if clean else 0.0)
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()) if clean else 0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # with every local worker gone, a step stuck on one of them fails at once; one stuck on another
        # machine waits for the collective timeout: leave the group then (the process is going away)
        if self._idle.wait(5.0):
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        else:
            logger.warning("an expert-parallel step is still in a collective; not tearing down the process group")

    def _kill(self) -> None:
        with self._lock:
            self._closed = True
        self._stop_watch.set()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ workers
def _worker_loop(
    config: EngineConfig, rank: int, world_size: int, local_rank: int, init_method: str, liveness: _WorkerLiveness
) -> None:
    from dynserve.model.decoder import torch_dtype
    from dynserve.model.kv_cache import allocate_kv_caches
    from dynserve.model.loader import load_model

    device = config.device
    if torch.device(device).type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        config = dataclasses.replace(config, device=device)
    group, control = _init_groups(_backend_for(device), init_method, rank, world_size)
    liveness.start_beating(init_method)
    torch.manual_seed(config.seed)
    model = load_model(config, experts=ExpertParallelExperts(TorchDistributedExchange(group), config.model.num_experts))
    msg: list[Any] = [None]
    dist.broadcast_object_list(msg, src=0, group=control)
    kind, num_blocks = msg[0]
    assert kind == "init"
    mc = config.model
    kv_caches = allocate_kv_caches(mc, num_blocks, config.cache.block_size, device, torch_dtype(mc.dtype))
    dist.barrier(group=control)
    with torch.inference_mode():
        while True:
            msg = [None]
            try:
                dist.broadcast_object_list(msg, src=0, group=control)
            except RuntimeError as e:  # rank 0 is gone without saying stop (killed, crashed)
                print(f"dynserve expert-parallel rank {rank}: lost rank 0 ({e}); exiting", file=sys.stderr)
                raise SystemExit(1) from None
            kind, payload = msg[0]
            if kind == "stop":
                liveness.stop()
                break
            model(_batch_to(payload, device), kv_caches)


def run_worker_node(config: EngineConfig) -> int:
    """Node `config.node_rank` > 0 of a multi-node job: spawn this node's other ranks, become the
    first one, follow rank 0 until it stops. Returns the exit code; the process exits with code 1 at
    once when rank 0 dies, freezes or declares the group failed."""
    N, nnodes, node = config.expert_parallel_size, config.nnodes, config.node_rank
    if N % nnodes:
        raise ValueError(f"expert_parallel_size ({N}) must be a multiple of nnodes ({nnodes})")
    if not config.dist_init_addr:
        raise ValueError("--dist-init-addr HOST:PORT is required with --nnodes > 1")
    per_node = N // nnodes
    base = node * per_node
    init_method = f"tcp://{config.dist_init_addr}"
    procs = _spawn_workers(config, init_method, list(range(base + 1, base + per_node)), base)
    liveness = _WorkerLiveness(base, config.expert_parallel_heartbeat_timeout, None)
    liveness.watch_parent()
    try:
        _worker_loop(config, base, N, 0, init_method, liveness)
    finally:
        for p in procs:
            try:
                p.wait(10.0)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


def worker_main() -> int:
    """Entry of a spawned worker: its spec (pickled) arrives on stdin."""
    spec: _WorkerSpec = pickle.loads(sys.stdin.buffer.read())
    liveness = _WorkerLiveness(spec.rank, spec.config.expert_parallel_heartbeat_timeout, spec.parent_pid)
    liveness.watch_parent()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    _worker_loop(spec.config, spec.rank, spec.world_size, spec.local_rank, spec.init_method, liveness)
    # leave at once: tearing down the process group and the interpreter takes seconds, and the
    # sockets close with the process anyway
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(worker_main())
