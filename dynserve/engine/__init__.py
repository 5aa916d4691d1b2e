"""engine/: request state, block manager, scheduler, runner, sampler, detokenizer, LLMEngine, AsyncEngine.

The names below are the engine's public face: what the server, `LLM` and the CLI may use. The rest
of the package (scheduler, block manager, runner, ...) is internal. Exports resolve lazily, so
importing one engine module (e.g. the torch-free block manager) does not load the model stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AsyncEngine": "async_engine",
    "EngineDeadError": "async_engine",
    "EngineStoppedError": "async_engine",
    "QueueFullError": "async_engine",
    "RequestAbortedError": "async_engine",
    "RequestFailedError": "async_engine",
    "RequestMetricsSink": "async_engine",
    "RequestStream": "async_engine",
    "ContextLengthError": "llm_engine",
    "LLMEngine": "llm_engine",
    "resolve_max_tokens": "llm_engine",
    "CompletionOutput": "outputs",
    "ExpertUsage": "outputs",
    "Logprob": "outputs",
    "RequestOutput": "outputs",
    "RoutedExperts": "outputs",
    "TokenLogprobs": "outputs",
    "EngineStats": "stats",
    "run_worker_node": "expert_parallel",
}

__all__ = [
    "AsyncEngine",
    "CompletionOutput",
    "ContextLengthError",
    "EngineDeadError",
    "EngineStats",
    "EngineStoppedError",
    "ExpertUsage",
    "LLMEngine",
    "Logprob",
    "QueueFullError",
    "RequestAbortedError",
    "RequestFailedError",
    "RequestMetricsSink",
    "RequestOutput",
    "RequestStream",
    "RoutedExperts",
    "TokenLogprobs",
    "resolve_max_tokens",
    "run_worker_node",
]

if TYPE_CHECKING:
    from dynserve.engine.async_engine import (
        AsyncEngine,
        EngineDeadError,
        EngineStoppedError,
        QueueFullError,
        RequestAbortedError,
        RequestFailedError,
        RequestMetricsSink,
        RequestStream,
    )
    from dynserve.engine.expert_parallel import run_worker_node
    from dynserve.engine.llm_engine import ContextLengthError, LLMEngine, resolve_max_tokens
    from dynserve.engine.outputs import (
        CompletionOutput,
        ExpertUsage,
        Logprob,
        RequestOutput,
        RoutedExperts,
        TokenLogprobs,
    )
    from dynserve.engine.stats import EngineStats


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dynserve.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dynserve.engine.{module}"), name)
    globals()[name] = value
    return value
