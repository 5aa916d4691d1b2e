"""Ray Serve: two local replicas of a tiny checkpoint answer the official openai SDK (concurrent
streams) with the same greedy text as the single-process LLM; autoscaling adds a replica under load."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


# each replica: one CPU of the 2-CPU local cluster, single-threaded torch
_ACTOR_OPTS = {"num_cpus": 1, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}}


@contextmanager
def _local_serve(port: int) -> Iterator[None]:
    """A 2-CPU local Ray with Serve's HTTP proxy on 127.0.0.1:port; torn down on exit."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def _running_replicas() -> int:
    return serve.status().applications["dynserve"].deployments["dynserve"].replica_states.get("RUNNING", 0)


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
    with _local_serve(port):
        app = build_deployment(
            ckpt,
            num_kv_blocks=64,
            server={"served_model_name": "m"},
            num_replicas=2,
            ray_actor_options=_ACTOR_OPTS,
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


@pytest.mark.slow
def test_replicas_scale_up_under_load(checkpoint_factory) -> None:
    import httpx

    from dynserve.server.ray_app import build_deployment

    ckpt = str(checkpoint_factory("mixtral"))
    port = _free_port()
    with _local_serve(port):
        autoscaling = {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 0.5,
            "downscale_delay_s": 600,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        }
        app = build_deployment(
            ckpt,
            num_kv_blocks=128,
            server={"served_model_name": "m"},
            autoscaling_config=autoscaling,
            ray_actor_options=_ACTOR_OPTS,
        )
        serve.run(app, name="dynserve", route_prefix="/", blocking=False)
        assert serve.status().applications["dynserve"].status == "RUNNING"
        assert _running_replicas() == 1

        url = f"http://127.0.0.1:{port}/v1/completions"

        async def one(client: httpx.AsyncClient, prompt: str) -> tuple[int, str]:
            body = {"model": "m", "prompt": prompt, "max_tokens": 48, "ignore_eos": True, "stream": True}
            text = ""
            async with client.stream("POST", url, json=body) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunk = json.loads(line[len("data: ") :])
                        if chunk.get("choices"):
                            text += chunk["choices"][0]["text"]
                return resp.status_code, text

        async def drive() -> tuple[bool, list[tuple[int, str]]]:
            # rounds of 8 concurrent streams (8 ongoing >> target 1) while polling the replica count
            deadline = time.monotonic() + 60
            results: list[tuple[int, str]] = []
            scaled = False
            async with httpx.AsyncClient(timeout=60) as client:
                while not scaled and time.monotonic() < deadline:
                    streams = asyncio.gather(*(one(client, p) for p in PROMPTS + PROMPTS[:2]))
                    while not streams.done() and not scaled:
                        await asyncio.sleep(0.5)
                        scaled = await asyncio.to_thread(_running_replicas) == 2
                    results += await streams
            return scaled, results

        scaled, results = asyncio.run(drive())
        assert scaled, f"still {_running_replicas()} RUNNING replica(s) after 60 s of 8 concurrent streams"
        assert results and all(code == 200 and text for code, text in results)
