"""Running the app: `run_server` (load the engine, then serve) and `serve_engine` (uvicorn, with the
engine stopped on the way out, streams aborted at the shutdown deadline, and a non-zero exit when the
engine dies)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import replace
from typing import Any

import uvicorn

from dynserve.config import EngineConfig
from dynserve.engine import (
    AsyncEngine,
    EngineDeadError,
)
from dynserve.server.app import build_app
from dynserve.server.settings import ABORT_GRACE_S, DEATH_GRACE_S, ServerSettings

logger = logging.getLogger("dynserve.server")


def run_server(engine_config: EngineConfig, settings: ServerSettings | None = None) -> None:
    """Load the engine and serve it (`serve_engine`) until SIGINT/SIGTERM, or until the engine dies:
    then raise EngineDeadError, so that `dynserve serve` exits 1 and an orchestrator restarts it."""
    settings = settings or ServerSettings()
    level = getattr(logging, str(settings.log_level).upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.enable_expert_token_metrics and not engine_config.record_expert_token_counts:
        engine_config = replace(engine_config, record_expert_token_counts=True)
    if settings.served_model_name and not engine_config.served_model_name:
        engine_config = replace(engine_config, served_model_name=settings.served_model_name)
    engine = AsyncEngine.from_config(engine_config, max_queued_requests=settings.max_queued_requests)
    serve_engine(engine, settings)


def serve_engine(engine: AsyncEngine, settings: ServerSettings | None = None, *, hard_exit: bool = True) -> None:
    """Serve a running engine with uvicorn; stops the engine on the way out.

    SIGINT/SIGTERM: stop accepting, let in-flight requests finish for up to `settings.shutdown_timeout`
    seconds, then abort the rest (a stream ends with an SSE error event `request_aborted` and
    `data: [DONE]`, a JSON request gets a 503) and return.
    Engine death (an error that belongs to no request, or `engine.fail()`): stop accepting, give in-flight
    requests a moment to send their error, then raise EngineDeadError. With `hard_exit`, a graceful stop
    that has not ended the process `settings.engine_death_exit_timeout` seconds after the death (the
    engine thread stuck in a collective, a worker that will not stop) ends it with `os._exit(1)`.
    """
    settings = settings or ServerSettings()
    app = build_app(engine, settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=str(settings.log_level).lower(),
        # the engine aborts what is left at shutdown_timeout; the handlers then send their error events
        timeout_graceful_shutdown=settings.shutdown_timeout + ABORT_GRACE_S,
        lifespan="on",
    )
    server = _UvicornServer(config, engine, settings, hard_exit=hard_exit)
    try:
        server.run()
    finally:
        if engine.is_healthy:
            engine.shutdown_sync(timeout=0.0)
    if server.engine_error is not None:
        raise EngineDeadError(f"the engine died: {server.engine_error!r}")


class _UvicornServer(uvicorn.Server):
    """uvicorn.Server that stops the engine with the server: the exit signal first makes the engine refuse
    new requests (503); at the shutdown deadline the engine aborts what still runs, before uvicorn would cut
    the connections; the engine's death stops the server (and, past a deadline, the process)."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, settings: ServerSettings, hard_exit: bool) -> None:
        super().__init__(config)
        self._engine = engine
        self._shutdown_timeout = settings.shutdown_timeout
        self._death_exit_timeout = settings.engine_death_exit_timeout if hard_exit else None
        self._exit_requested_at: float | None = None
        self.engine_error: BaseException | None = None
        engine.add_death_callback(self._on_engine_death)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._exit_requested_at is None:
            self._exit_requested_at = time.monotonic()
        self._engine.stop_accepting()
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals once it has shut down, which would make the process
        # die of SIGTERM; the shutdown is graceful, so `dynserve serve` exits 0 instead.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()

    def _on_engine_death(self, error: BaseException) -> None:
        """Runs on whichever thread saw the death (engine thread, a watchdog): only plain assignments and a
        timer thread here; uvicorn's loop notices `should_exit` within 0.1 s."""
        if self.engine_error is not None:
            return
        self.engine_error = error
        logger.critical("the engine died (%r): stopping the server; the process will exit with status 1", error)
        if self._death_exit_timeout is not None:
            threading.Thread(
                target=_exit_after, args=(self._death_exit_timeout,), name="dynserve-exit-deadline", daemon=True
            ).start()
        # in-flight requests got their EngineDeadError already; let their handlers send it, then cut
        grace = self.config.timeout_graceful_shutdown
        self.config.timeout_graceful_shutdown = DEATH_GRACE_S if grace is None else min(grace, DEATH_GRACE_S)
        self.should_exit = True

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        stop_engine = asyncio.ensure_future(self._stop_engine())
        try:
            await super().shutdown(sockets)
        finally:
            await stop_engine

    async def _stop_engine(self) -> None:
        """Let in-flight requests finish until the shutdown deadline, abort the rest (their handlers answer
        with an error while uvicorn still waits for them), then stop the engine thread."""
        if self.engine_error is not None:  # nothing to wait for; the thread may be stuck: do not wait long
            await self._engine.shutdown(timeout=0.0)
            return
        started = self._exit_requested_at if self._exit_requested_at is not None else time.monotonic()
        remaining = self._shutdown_timeout - (time.monotonic() - started)
        await self._engine.shutdown(timeout=max(0.0, remaining))


def _exit_after(seconds: float) -> None:
    time.sleep(seconds)
    logger.critical("the server did not stop within %.1f s of the engine's death: exiting now", seconds)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(1)


__all__ = ["ServerSettings", "run_server", "serve_engine"]
