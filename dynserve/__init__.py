"""dynserve: an OpenAI-compatible serving engine for MoE models with adaptive expert routing.

Map of the package:
  config.py         one typed EngineConfig (model, cache, scheduler, routing)
  sampling_params   SamplingParams (per-request sampling, stopping, routing override)
  engine/           request state, block manager, scheduler, runner, sampler, detokenizer, LLMEngine, AsyncEngine
  model/            loader, layers, one file per architecture family, registry
  routing/          routing policies -> Assignment; usage accounting
  server/           FastAPI app, OpenAI protocol models, Prometheus metrics
  bench/            benchmark scripts
The compute kernels live in the top-level kernels/ folder, imported as `dynserve_kernels`.
"""

from __future__ import annotations

import os

# Before torch loads libgomp (it reads these once; both torch's ops and the native kernels use it):
# an OpenMP worker waits for the next parallel region by spinning GOMP_SPINCOUNT times, then sleeps.
# libgomp's long default spin makes every parallel region wait for a descheduled spinner when other
# processes share the CPU (batch-1 decode measured 14x slower beside two busy processes); a short spin
# keeps a decode step's back-to-back kernels warm on a quiet machine. A user's own setting wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from typing import TYPE_CHECKING  # noqa: E402

from dynserve.config import RoutingConfig  # noqa: E402
from dynserve.sampling_params import SamplingParams  # noqa: E402

if TYPE_CHECKING:
    from dynserve.llm import LLM

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RoutingConfig", "__version__"]


def __getattr__(name: str):  # lazy: `import dynserve` stays light
    if name == "LLM":
        from dynserve.llm import LLM

        return LLM
    raise AttributeError(name)
