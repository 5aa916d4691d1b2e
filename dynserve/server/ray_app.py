"""Ray Serve replicas of the dynserve OpenAI server (optional extra: `pip install 'dynserve[ray]'`).

Owns `DynserveDeployment`: one Ray Serve deployment whose every replica holds one engine
(`AsyncEngine` over its own `LLMEngine`) behind the very FastAPI app `dynserve serve` runs
(`build_app`, so routes, errors, streaming and metrics are identical); Ray's proxy spreads requests
over the replicas and autoscales them on ongoing requests. Entry points:

    serve run deploy/ray/serve_config.yaml                       # the YAML names app_builder + its args
    serve run dynserve.server.ray_app:app_builder model=/path/to/ckpt

Python: `serve.run(build_deployment(model_dir, num_replicas=2))`.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from dynserve.config import EngineConfig
from dynserve.engine import AsyncEngine
from dynserve.server.app import build_app
from dynserve.server.settings import ServerSettings

# keys of `args` that configure the HTTP layer; every other key is an EngineConfig.create option
_SERVER_KEYS = (
    "api_key",
    "served_model_name",
    "max_queued_requests",
    "enable_expert_token_metrics",
    "max_request_bytes",
    "max_prompts_per_request",
    "public_docs",
)


@serve.deployment(
    name="dynserve",
    max_ongoing_requests=32,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8},
    health_check_period_s=10,
)
@serve.ingress()
class DynserveDeployment:
    """One replica: an engine (model weights, KV cache, scheduler thread) and the OpenAI app over it."""

    def __init__(self, model: str | None = None, server: dict[str, Any] | None = None, **engine_options: Any) -> None:
        server = dict(server or {})
        if "served_model_name" in server and "served_model_name" not in engine_options:
            engine_options["served_model_name"] = server["served_model_name"]
        if server.get("enable_expert_token_metrics"):
            engine_options["record_expert_token_counts"] = True
        config = EngineConfig.create(model, **engine_options)
        self.settings = ServerSettings(**{k: v for k, v in server.items() if k in _SERVER_KEYS})
        self.engine = AsyncEngine.from_config(config, max_queued_requests=self.settings.max_queued_requests)

    def __serve_build_asgi_app__(self) -> Any:
        return build_app(self.engine, self.settings, owns_engine=True)

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine loop died."""
        if not self.engine.is_healthy:
            raise RuntimeError(f"dynserve engine loop is not running: {self.engine.dead_error!r}")


def build_deployment(model: str | None = None, *, server: dict[str, Any] | None = None, **options: Any) -> Application:
    """The bound application. `options` may carry Ray deployment options (`num_replicas`,
    `autoscaling_config`, `max_ongoing_requests`, `ray_actor_options`); the rest go to the engine."""
    ray_keys = ("num_replicas", "autoscaling_config", "max_ongoing_requests", "ray_actor_options")
    ray_opts = {k: options.pop(k) for k in ray_keys if k in options}
    if "num_replicas" in ray_opts:
        ray_opts.setdefault("autoscaling_config", None)
    dep = DynserveDeployment.options(**ray_opts) if ray_opts else DynserveDeployment
    return dep.bind(model, server, **options)


def app_builder(args: dict[str, Any]) -> Application:
    """`serve run` application builder: `args` = {"model": ..., "server": {...}, **engine options}."""
    args = dict(args)
    return build_deployment(args.pop("model", None), server=args.pop("server", None), **args)
