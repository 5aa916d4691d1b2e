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

from typing import TYPE_CHECKING

from dynserve.config import RoutingConfig
from dynserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from dynserve.llm import LLM

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RoutingConfig", "__version__"]


def __getattr__(name: str):  # lazy: `import dynserve` stays light
    if name == "LLM":
        from dynserve.llm import LLM

        return LLM
    raise AttributeError(name)
