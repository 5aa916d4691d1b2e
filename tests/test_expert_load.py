"""Expert load: the default-on balance gauge and distinct-experts histogram (/metrics), the
expert-distribution recorder (start / stop / dump over HTTP, behind the API key, sums matching usage),
and `dynserve expert-report` (summary lines and a heatmap PNG)."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from dynserve.cli import main as cli_main
from dynserve.config import EngineConfig, RoutingConfig
from dynserve.engine.async_engine import AsyncEngine
from dynserve.routing.load import ExpertLoadTracker
from dynserve.server.app import ServerSettings, build_app
from dynserve.server.metrics import touched_buckets

KEY = "sk-load"


@pytest.fixture(scope="module")
def engine(checkpoint_factory):
    cfg = EngineConfig.create(
        str(checkpoint_factory("mixtral")), num_kv_blocks=96, routing=RoutingConfig(policy="top_p", p=0.6)
    )
    eng = AsyncEngine.from_config(cfg)
    yield eng
    eng.shutdown_sync(timeout=0)


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(build_app(engine, ServerSettings(api_key=KEY)), raise_server_exceptions=False)


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_tracker_balance_and_touched_histogram():
    t = ExpertLoadTracker(num_moe_layers=2, num_experts=4, window_steps=2)
    assert t.balance() == [None, None]
    t.add_step(torch.tensor([[1, 1, 1, 1], [4, 0, 0, 0]]))
    assert t.balance() == [1.0, 0.25]
    t.add_step(torch.tensor([[0, 0, 0, 0], [0, 4, 0, 0]]))
    t.add_step(torch.tensor([[0, 0, 0, 0], [0, 0, 4, 4]]))  # the window holds the last 2 steps only
    assert t.balance() == [None, pytest.approx(12 / 4 / 4)]
    assert t.touched_histogram() == [[2, 0, 0, 0, 1], [0, 2, 1, 0, 0]]
    assert touched_buckets(8) == [0, 1, 2, 4, 8] and touched_buckets(6) == [0, 1, 2, 4, 6]


def test_recorder_dump_sums_to_the_tokens_served(client):
    assert client.post("/expert_distribution/start").status_code == 401  # behind the API key
    assert client.get("/expert_distribution/dump").status_code == 401
    assert client.post("/expert_distribution/start", headers=AUTH).json() == {"recording": True}
    served = []
    for prompt in ("record the experts of this prompt", "and of this other, longer prompt as well"):
        body = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        r = client.post("/v1/completions", json=body, headers=AUTH)
        assert r.status_code == 200, r.text
        served.append(r.json())
    assert client.post("/expert_distribution/stop", headers=AUTH).json() == {"recording": False}
    client.post("/v1/completions", json={"prompt": "not recorded", "max_tokens": 2}, headers=AUTH)
    r = client.get("/expert_distribution/dump", params={"per_request": "true"}, headers=AUTH)
    assert r.status_code == 200, r.text
    dump = r.json()
    assert dump["recording"] is False and dump["num_moe_layers"] == 2 and dump["num_experts"] == 4
    counts = dump["expert_tokens"]
    assert len(counts) == 2 and all(len(row) == 4 for row in counts)
    assert sum(map(sum, counts)) == sum(s["usage"]["expert_activations"] for s in served)
    computed = sum(
        u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"] + u["completion_tokens"] - 1
        for u in (s["usage"] for s in served)
    )
    assert dump["num_tokens"] == computed
    per_request = dump["per_request"]
    assert set(per_request) == {s["id"] for s in served}
    for s in served:
        assert sum(map(sum, per_request[s["id"]])) == s["usage"]["expert_activations"]
    assert "per_request" not in client.get("/expert_distribution/dump", headers=AUTH).json()


def test_balance_gauge_and_touched_histogram_are_exported(client):
    client.post("/v1/completions", json={"prompt": "fill the window", "max_tokens": 3}, headers=AUTH)
    text = client.get("/metrics").text  # a probe: no key needed
    samples = {
        (s.name, s.labels.get("layer"), s.labels.get("le")): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    for layer in ("0", "1"):
        assert 0.0 < samples[("dynserve_expert_load_balance", layer, None)] <= 1.0
        steps = samples[("dynserve_experts_touched_per_step_count", layer, None)]
        assert steps > 0 and samples[("dynserve_experts_touched_per_step_bucket", layer, "+Inf")] == steps
        assert samples[("dynserve_experts_touched_per_step_bucket", layer, "4.0")] == steps


def test_expert_report_prints_and_draws(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps({"expert_tokens": [[10, 0, 5, 5], [1, 2, 3, 14]]}))
    out = tmp_path / "heatmap.png"
    assert cli_main(["expert-report", str(dump), "--out", str(out), "--top", "1"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "layer 0: 20 tokens, balance 0.500; most used 0:10; least used 1:0"
    assert lines[1].startswith("layer 1: 20 tokens") and "most used 3:14" in lines[1]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert cli_main(["expert-report", str(bad)]) == 2
