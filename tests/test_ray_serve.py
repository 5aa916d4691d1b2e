"""Ray Serve: two local replicas of a tiny checkpoint answer the official openai SDK (concurrent
streams) with the same greedy text as the single-process LLM."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

PROMPTS = ["def hello(name):", "The quick brown fox", "import os", "class Foo", "for i in range(10):", "# comment"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_config_yaml_names_the_builder() -> None:
    cfg = yaml.safe_load((Path(__file__).parent.parent / "deploy" / "ray" / "serve_config.yaml").read_text())
    app = cfg["applications"][0]
    assert app["import_path"] == "dynserve.server.ray_app:app_builder"
    dep = app["deployments"][0]
    assert dep["name"] == "dynserve"
    auto = dep["autoscaling_config"]
    assert auto["min_replicas"] <= auto["max_replicas"] and auto["target_ongoing_requests"] > 0
    assert dep["max_ongoing_requests"] >= auto["target_ongoing_requests"]


@pytest.mark.slow
def test_two_replicas_concurrent_streams_match_offline(checkpoint_factory) -> None:
    import openai

    from dynserve import LLM, SamplingParams
    from dynserve.server.ray_app import build_deployment

    ckpt = str(checkpoint_factory("mixtral"))
    llm = LLM(ckpt, num_kv_blocks=64)
    want = [o.outputs[0].text for o in llm.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0))]

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_deployment(
            ckpt,
            num_kv_blocks=64,
            server={"served_model_name": "m"},
            num_replicas=2,
            ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}},
        )
        serve.run(app, name="dynserve", route_prefix="/", blocking=False)
        status = serve.status().applications["dynserve"]
        assert status.status == "RUNNING"
        assert status.deployments["dynserve"].replica_states.get("RUNNING") == 2

        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)

        async def one(prompt: str) -> tuple[str, str | None]:
            stream = await client.completions.create(
                model="m", prompt=prompt, max_tokens=6, temperature=0.0, stream=True
            )
            text, reason = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                    reason = chunk.choices[0].finish_reason or reason
            return text, reason

        async def run_all() -> list[tuple[str, str | None]]:
            return await asyncio.gather(*(one(p) for p in PROMPTS * 2))

        got = asyncio.run(run_all())
        assert [t for t, _ in got] == want * 2
        assert all(r in ("length", "stop") for _, r in got)
    finally:
        serve.shutdown()
        ray.shutdown()
