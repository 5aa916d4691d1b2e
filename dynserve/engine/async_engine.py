"""AsyncEngine: the asyncio front of the synchronous LLMEngine.

The engine's `step()` is blocking torch work, so it runs in ONE dedicated background thread.
Callers on any asyncio event loop submit requests through a thread-safe inbox; the engine thread
drains the inbox between steps (adds and aborts), runs steps while there is work, and sleeps on a
condition variable when idle (no busy spin). Outputs travel back with
`loop.call_soon_threadsafe` into one asyncio.Queue per request.

    stream = await async_engine.add_request(request_id, prompt, params)   # ValueError -> 400
    async for out in stream: ...          # RequestOutput with deltas; the last one has finished=True

or the one-call form `async for out in async_engine.generate(prompt, params, request_id)`.
A consumer that goes away (break, GeneratorExit, CancelledError) aborts its request, so its KV
blocks return to the pool at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from dynserve.engine.outputs import RequestOutput
from dynserve.engine.stats import EngineStats
from dynserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from dynserve.config import EngineConfig
    from dynserve.engine.llm_engine import LLMEngine

logger = logging.getLogger("dynserve.async_engine")


class EngineDeadError(RuntimeError):
    """The engine loop thread died; no request can be served any more."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down (or shut down) and accepts no new requests."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestAbortedError(RuntimeError):
    """The request was aborted by the server (shutdown, explicit abort) before it finished."""


class RequestFailedError(RuntimeError):
    """An error that belongs to this request alone (its sampling numerics, detokenisation, stop
    strings, logprobs) ended it; the engine goes on serving every other request."""


class RequestMetricsSink(Protocol):
    """Receives per-request latency observations (called from the engine thread)."""

    def observe_first_token(self, ttft_s: float) -> None: ...

    def observe_inter_token(self, itl_s: float) -> None: ...

    def observe_finished(self, finish_reason: str, e2e_s: float, queue_s: float | None) -> None: ...


_SENTINEL_END = object()
_STATS_REFRESH_S = 0.05  # most frequent stats snapshot while the engine is busy


@dataclass(eq=False)
class _RequestState:
    """Engine-thread bookkeeping of one live request (and where its outputs go)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    params: SamplingParams
    arrival_time: float
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    accepted: asyncio.Future
    in_engine: bool = False
    abort_requested: bool = False
    last_token_time: float | None = None
    first_token_seen: bool = False
    finished: bool = False


class RequestStream:
    """Async iterator over one request's RequestOutputs; ends after the finished output.

    Raises RequestAbortedError if the server aborted the request, EngineDeadError if the engine
    thread died. `abort()` (or leaving via `aclose()`) aborts the request in the engine.
    """

    def __init__(self, engine: AsyncEngine, state: _RequestState) -> None:
        self._engine = engine
        self._state = state
        self.request_id = state.request_id
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._state.queue.get()
        except BaseException:
            # the consumer was cancelled while waiting: nobody will read the rest
            self.abort()
            raise
        if item is _SENTINEL_END:
            self.finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Abort the request unless it already finished (idempotent)."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()


@dataclass
class _Inbox:
    adds: list[_RequestState] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)


class AsyncEngine:
    """Owns one LLMEngine and the background thread that steps it; routes outputs to asyncio
    consumers; enforces the waiting-queue limit; exposes health, stats and graceful shutdown."""

    def __init__(self, engine: LLMEngine, *, max_queued_requests: int | None = None, start: bool = True) -> None:
        self.engine = engine
        if max_queued_requests is None:
            sched = getattr(getattr(engine, "config", None), "scheduler", None)
            max_queued_requests = getattr(sched, "max_queued_requests", None)
        if max_queued_requests is not None and max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {max_queued_requests}")
        self.max_queued_requests = max_queued_requests
        self._cond = threading.Condition()
        self._inbox = _Inbox()
        self._requests: dict[str, _RequestState] = {}  # live requests (guarded by _cond)
        self._pending_adds = 0  # submitted, not yet processed by the engine thread
        self._num_waiting = 0  # engine's waiting count at the last refresh
        self._stats = EngineStats()
        self._last_stats_refresh = 0.0
        self._stop = False
        self._accepting = True
        self._dead_error: BaseException | None = None
        self._sinks: list[RequestMetricsSink] = []
        self._death_callbacks: list[Callable[[BaseException], None]] = []
        self._thread: threading.Thread | None = None
        self._refresh_stats()
        if start:
            self.start()

    @classmethod
    def from_config(cls, config: EngineConfig, *, max_queued_requests: int | None = None) -> AsyncEngine:
        """Build the LLMEngine from `config` and start the loop thread."""
        from dynserve.engine.llm_engine import LLMEngine

        return cls(LLMEngine(config), max_queued_requests=max_queued_requests)

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def is_healthy(self) -> bool:
        """False once the loop thread died (or was never started / has stopped)."""
        return self._dead_error is None and self._thread is not None and self._thread.is_alive()

    def check_capacity(self, num_requests: int) -> None:
        """Raise QueueFullError unless `num_requests` more requests fit under the waiting-queue limit
        (a request with several prompts counts each of them), EngineStoppedError/EngineDeadError if
        none are accepted at all."""
        with self._cond:
            self._check_can_accept()
            limit = self.max_queued_requests
            queued = self._num_waiting + self._pending_adds
            if limit is not None and queued + num_requests > limit:
                raise QueueFullError(
                    f"the server is overloaded: {queued} requests are waiting and this one adds {num_requests} "
                    f"(limit {limit}); retry later"
                )

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead_error

    @property
    def is_accepting(self) -> bool:
        return self._accepting and self.is_healthy

    @property
    def num_unfinished_requests(self) -> int:
        with self._cond:
            return len(self._requests)

    def start_expert_distribution(self) -> None:
        """Start recording per-layer per-expert token counts (thread-safe; a new recording)."""
        self.engine.expert_distribution.start()

    def stop_expert_distribution(self) -> None:
        self.engine.expert_distribution.stop()

    def dump_expert_distribution(self, per_request: bool = False) -> dict[str, Any]:
        """The recording so far (see ExpertDistributionRecorder.dump)."""
        return self.engine.expert_distribution.dump(per_request)

    def get_stats(self) -> EngineStats:
        """The engine stats snapshot taken by the loop thread after its latest iteration."""
        return self._stats

    def add_metrics_sink(self, sink: RequestMetricsSink) -> None:
        """Register a receiver of latency observations (TTFT, ITL, e2e, queue time)."""
        self._sinks.append(sink)

    def remove_metrics_sink(self, sink: RequestMetricsSink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    def add_death_callback(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(error)` once, from whichever thread noticed it, when the engine dies (an
        error that belongs to no single request, or `fail()` from a watchdog). The server uses it to
        stop and exit non-zero so that an orchestrator restarts the process."""
        with self._cond:
            dead = self._dead_error
            if dead is None:
                self._death_callbacks.append(callback)
        if dead is not None:
            callback(dead)

    def fail(self, error: BaseException) -> None:
        """Declare the engine dead from any thread (e.g. an expert-parallel watchdog that saw a
        worker die or freeze while the loop thread is stuck in a collective): every waiter gets
        EngineDeadError at once and the death callbacks run. Idempotent."""
        logger.error("engine failure: %r", error)
        self._die(error)

    def start(self) -> None:
        """Start the loop thread (idempotent); engine-side watchdogs report through `fail`."""
        if self._thread is not None:
            return
        watch = getattr(self.engine, "set_failure_handler", None)
        if watch is not None:
            watch(self.fail)
        self._thread = threading.Thread(target=self._run, name="dynserve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests
    async def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
    ) -> RequestStream:
        """Submit a request and wait until the engine accepted it.

        Raises ValueError (invalid request, user-facing message), QueueFullError (too many
        waiting), EngineStoppedError (shutting down), EngineDeadError (loop thread died).
        """
        loop = asyncio.get_running_loop()
        state = _RequestState(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=list(prompt_token_ids) if prompt_token_ids is not None else None,
            params=params,
            arrival_time=time.monotonic(),
            loop=loop,
            queue=asyncio.Queue(),
            accepted=loop.create_future(),
        )
        with self._cond:
            self._check_can_accept()
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            limit = self.max_queued_requests
            if limit is not None and self._num_waiting + self._pending_adds >= limit:
                raise QueueFullError(
                    f"the server is overloaded: {self._num_waiting + self._pending_adds} requests are "
                    f"waiting (limit {limit}); retry later"
                )
            self._requests[request_id] = state
            self._pending_adds += 1
            self._inbox.adds.append(state)
            self._cond.notify()
        stream = RequestStream(self, state)
        try:
            await state.accepted
        except BaseException:
            # rejected (the state is gone already) or we were cancelled while waiting
            stream.finished = True
            fut = state.accepted
            rejected = fut.done() and not fut.cancelled() and fut.exception() is not None
            if not rejected:
                self.abort(request_id)
            raise
        return stream

    async def generate(
        self,
        prompt: str | None,
        params: SamplingParams,
        request_id: str,
        prompt_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's RequestOutputs; aborts the request if the consumer goes away."""
        stream = await self.add_request(request_id, prompt, params, prompt_token_ids)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, idempotent). Its stream, if still read, raises
        RequestAbortedError; its KV blocks are freed before the next engine step."""
        with self._cond:
            state = self._requests.get(request_id)
            if state is None:
                return
            state.abort_requested = True
            self._inbox.aborts.append(request_id)
            self._cond.notify()

    def _check_can_accept(self) -> None:
        if self._dead_error is not None:
            raise EngineDeadError(f"the engine loop died: {self._dead_error!r}")
        if not self._accepting or self._stop:
            raise EngineStoppedError("the server is shutting down and accepts no new requests")
        if self._thread is None or not self._thread.is_alive():
            raise EngineDeadError("the engine loop is not running")

    # ------------------------------------------------------------------ shutdown
    def stop_accepting(self) -> None:
        """New requests are refused from now on (EngineStoppedError); in-flight ones continue.
        Lock-free: safe to call from a signal handler."""
        self._accepting = False

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `timeout` seconds, abort the
        rest (their streams raise RequestAbortedError), then stop the loop thread."""
        self.stop_accepting()
        deadline = time.monotonic() + max(0.0, timeout)
        while self.num_unfinished_requests and self.is_healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._abort_all("the server is shutting down")
        await asyncio.to_thread(self._stop_thread, max(1.0, timeout))

    def shutdown_sync(self, timeout: float = 30.0) -> None:
        """Blocking variant of `shutdown` for code without an event loop."""
        self.stop_accepting()
        deadline = time.monotonic() + max(0.0, timeout)
        while self.num_unfinished_requests and self.is_healthy and time.monotonic() < deadline:
            time.sleep(0.02)
        self._abort_all("the server is shutting down")
        self._stop_thread(max(1.0, timeout))

    def _abort_all(self, reason: str) -> None:
        with self._cond:
            for rid, state in self._requests.items():
                if not state.abort_requested:
                    state.abort_requested = True
                    self._inbox.aborts.append(rid)
            self._abort_reason = reason
            self._cond.notify()

    def _stop_thread(self, join_timeout: float) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(join_timeout)
            if not self._thread.is_alive():
                # no step can be running now: release what the engine holds outside this process
                # (expert-parallel worker processes)
                try:
                    self.engine.close()
                except Exception:  # shutdown must go on
                    logger.exception("engine.close failed")

    # ------------------------------------------------------------------ engine thread
    _abort_reason = "the request was aborted"

    def _refresh_stats(self, retire_adds: int = 0) -> None:
        try:
            stats = self.engine.get_stats()
        except Exception:  # a stats failure must not kill serving
            logger.exception("get_stats failed")
            stats = None
        with self._cond:
            if stats is not None:
                self._stats = stats
                self._num_waiting = stats.num_waiting_requests
            self._pending_adds -= retire_adds

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - record and fail every waiter
            logger.exception("engine loop died")
            self._die(e)

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while (
                    not self._stop
                    and self._dead_error is None
                    and not self._inbox.adds
                    and not self._inbox.aborts
                    and not engine.has_unfinished_requests()
                ):
                    self._cond.wait()
                if self._dead_error is not None:  # failed from outside (a watchdog): stop stepping
                    return
                inbox, self._inbox = self._inbox, _Inbox()
                if self._stop:
                    self._fail_adds(inbox.adds, EngineStoppedError("the engine has stopped"))
                    self._finish_all_remaining()
                    return
            self._process_inbox(inbox)
            if not engine.has_unfinished_requests():
                continue
            steps_before = engine.num_steps
            outputs = engine.step()
            # the stats snapshot (for /metrics and backpressure) is not needed every step: refresh it at
            # most every 50 ms, and always when the engine goes idle or a request finishes. It is
            # refreshed before the outputs go out, so a client that has its final output and then
            # scrapes /metrics sees its request counted.
            now = time.monotonic()
            if (
                now - self._last_stats_refresh >= _STATS_REFRESH_S
                or not engine.has_unfinished_requests()
                or any(o.finished for o in outputs)
            ):
                self._refresh_stats()
                self._last_stats_refresh = now
            self._deliver(outputs)
            if not outputs and engine.num_steps == steps_before and engine.has_unfinished_requests():
                # nothing could be scheduled: wait briefly for news instead of spinning
                with self._cond:
                    if not self._inbox.adds and not self._inbox.aborts and not self._stop:
                        self._cond.wait(0.005)

    def _process_inbox(self, inbox: _Inbox) -> None:
        engine = self.engine
        accepted: list[_RequestState] = []
        for state in inbox.adds:
            if state.abort_requested:
                self._reject(state, RequestAbortedError(self._abort_reason))
                continue
            try:
                engine.add_request(
                    state.request_id,
                    state.prompt,
                    state.params,
                    prompt_token_ids=state.prompt_token_ids,
                    arrival_time=state.arrival_time,
                )
            except Exception as e:  # ValueError: user error; anything else surfaces the same way
                self._reject(state, e)
                continue
            state.in_engine = True
            accepted.append(state)
        for state in accepted:
            _call_soon(state.loop, _set_result, state.accepted, None)
        if inbox.aborts:
            to_abort: list[str] = []
            for rid in inbox.aborts:
                with self._cond:
                    state = self._requests.pop(rid, None)
                if state is None:
                    continue
                if state.in_engine:
                    to_abort.append(rid)
                self._emit(state, RequestAbortedError(self._abort_reason))
                for sink in self._sinks:
                    _safe(sink.observe_finished, "abort", time.monotonic() - state.arrival_time, None)
            if to_abort:
                # the streams were told above: no final output, which could reach a new request
                # that reuses the id
                engine.abort_request(to_abort, report=False)
        if inbox.adds or inbox.aborts:
            # publish the new waiting count and retire the pending adds in one go, so the
            # backpressure count (waiting + pending) never dips in between
            self._refresh_stats(retire_adds=len(inbox.adds))

    def _reject(self, state: _RequestState, error: BaseException) -> None:
        with self._cond:
            self._requests.pop(state.request_id, None)
        _call_soon(state.loop, _set_exception, state.accepted, error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for out in outputs:
            with self._cond:
                state = self._requests.get(out.request_id)
                if state is not None and out.finished:
                    del self._requests[out.request_id]
            if state is None:
                continue  # aborted by its consumer: nobody listens
            if state.loop.is_closed():  # the consumer's event loop is gone: nobody ever will
                self.abort(out.request_id)
                continue
            self._observe(state, out, now)
            item: object = out
            if out.error is not None:  # the request failed on its own; the others go on
                logger.warning("request %s failed: %s", out.request_id, out.error)
                item = RequestFailedError(out.error)
            batches.setdefault(state.loop, []).append((state.queue, item))
            if out.finished:
                state.finished = True
        for loop, items in batches.items():
            _call_soon(loop, _put_many, items)

    def _observe(self, state: _RequestState, out: RequestOutput, now: float) -> None:
        if not self._sinks:
            return
        new_tokens = any(c.token_ids_delta for c in out.outputs)
        if new_tokens:
            if not state.first_token_seen:
                state.first_token_seen = True
                first = out.metrics.get("first_token_time", now)
                for sink in self._sinks:
                    _safe(sink.observe_first_token, max(0.0, first - state.arrival_time))
            elif state.last_token_time is not None:
                for sink in self._sinks:
                    _safe(sink.observe_inter_token, max(0.0, now - state.last_token_time))
            state.last_token_time = now
        if out.finished:
            reasons = [c.finish_reason for c in out.outputs if c.finish_reason]
            reason = "abort" if "abort" in reasons else ("length" if "length" in reasons else "stop")
            end = out.metrics.get("finished_time", now)
            sched = out.metrics.get("first_scheduled_time")
            queue_s = max(0.0, sched - state.arrival_time) if sched is not None else None
            for sink in self._sinks:
                _safe(sink.observe_finished, reason, max(0.0, end - state.arrival_time), queue_s)

    def _emit(self, state: _RequestState, item: object) -> None:
        _call_soon(state.loop, _put_many, [(state.queue, item)])

    def _fail_adds(self, adds: list[_RequestState], error: BaseException) -> None:
        """Called with _cond held."""
        for state in adds:
            self._requests.pop(state.request_id, None)
            _call_soon(state.loop, _set_exception, state.accepted, error)
        self._pending_adds -= len(adds)

    def _finish_all_remaining(self) -> None:
        """Thread stopping (called with _cond held): every live request ends with RequestAbortedError."""
        states = list(self._requests.values())
        self._requests.clear()
        ids = [s.request_id for s in states if s.in_engine]
        try:
            if ids:
                self.engine.abort_request(ids)
            for _ in range(4):  # drain the aborted requests' final outputs
                if not self.engine.has_unfinished_requests():
                    break
                self.engine.step()
        except Exception:
            logger.exception("abort on stop failed")
        self._refresh_stats()  # the condition's lock is reentrant
        for s in states:
            if s.in_engine:
                self._emit(s, RequestAbortedError(self._abort_reason))
            else:
                _call_soon(s.loop, _set_exception, s.accepted, EngineStoppedError("the engine has stopped"))

    def _die(self, error: BaseException) -> None:
        with self._cond:
            if self._dead_error is not None:
                return
            self._dead_error = error
            self._accepting = False
            states = list(self._requests.values())
            self._requests.clear()
            self._inbox = _Inbox()
            self._pending_adds = 0
            callbacks, self._death_callbacks = self._death_callbacks, []
            self._cond.notify_all()
        err = EngineDeadError(f"the engine loop died: {error!r}")
        for s in states:  # includes the not yet processed adds
            if s.in_engine:
                self._emit(s, err)
            else:
                _call_soon(s.loop, _set_exception, s.accepted, err)
        for cb in callbacks:
            try:
                cb(error)
            except Exception:
                logger.exception("engine death callback failed")


# ---------------------------------------------------------------------- loop-side helpers
def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: object) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the consumer's loop is closed
        pass


def _put_many(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _set_result(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, error: BaseException) -> None:
    if not fut.done():
        fut.set_exception(error)
    else:  # consumer gave up waiting; retrieve nothing
        pass


def _safe(fn: Callable[..., None], *args: object) -> None:
    try:
        fn(*args)
    except Exception:
        logger.exception("metrics sink failed")
