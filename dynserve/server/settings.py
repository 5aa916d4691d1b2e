"""ServerSettings: how the HTTP server runs (the engine's own options live in EngineConfig), and the
server's fixed time and size constants."""

from __future__ import annotations

import os
from dataclasses import dataclass

# Bodies and texts below this size are parsed / tokenised on the event loop (well under a millisecond);
# above it they go to the worker threads, so a large request never stalls the other connections.
INLINE_BYTES = 16 * 1024
# After a SIGTERM, requests still running at --shutdown-timeout are aborted; their handlers then get
# this long to send the error (an SSE error event and [DONE]) before uvicorn cuts the connections.
ABORT_GRACE_S = 5.0
# After the engine died: how long in-flight handlers may take to send their error before uvicorn cuts them.
DEATH_GRACE_S = 3.0


@dataclass
class ServerSettings:
    """How the HTTP server runs (the engine's own options live in EngineConfig).

    api_key None falls back to the DYNSERVE_API_KEY environment variable; empty means no auth. The key
    guards every route but the probes (/health, /metrics, /version) and, with public_docs, the API docs.
    served_model_name None falls back to EngineConfig.served_model_name, then the model directory's name
    (`dynserve-demo` for the embedded model).
    max_request_bytes caps a request body (413 beyond it); max_prompts_per_request caps the prompts of
    one completions request (400). engine_death_exit_timeout: after the engine died, a process whose
    graceful stop takes longer than this is ended with os._exit(1) (`run_server` / `serve_engine`).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_queued_requests: int | None = None
    shutdown_timeout: float = 30.0
    enable_expert_token_metrics: bool = False
    log_level: str = "info"
    retry_after_s: int = 1
    max_request_bytes: int = 8 * 1024 * 1024
    max_prompts_per_request: int = 256
    public_docs: bool = False
    engine_death_exit_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get("DYNSERVE_API_KEY") or None
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be at least 1, got {self.max_request_bytes}")
        if self.max_prompts_per_request < 1:
            raise ValueError(f"max_prompts_per_request must be at least 1, got {self.max_prompts_per_request}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be non-negative, got {self.shutdown_timeout}")
