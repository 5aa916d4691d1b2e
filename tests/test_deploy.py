"""deploy/: Dockerfiles, Kubernetes manifests, the Prometheus scrape config and the Grafana dashboard
agree with the app: probe paths and ports are routes and flags the server has, container args parse
with the real CLI, the grace period outlasts the shutdown timeout, and every metric that the
dashboard, the autoscaler and the adapter query is one the server exports (checked against a real
app's /metrics after traffic)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from dynserve.cli import build_parser
from dynserve.config import EngineConfig
from dynserve.engine.async_engine import AsyncEngine
from dynserve.server.app import ServerSettings, build_app

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
OVERLAYS = DEPLOY / "kubernetes-overlays"


# ------------------------------------------------------------------------------- helpers
def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s() -> dict[str, dict]:
    """kind -> object, over every manifest in deploy/kubernetes (one object per kind here)."""
    out = {}
    for f in sorted(K8S.glob("*.yaml")):
        for d in _docs(f):
            if "kind" in d and "apiVersion" in d:
                assert d["kind"] not in out, f"two {d['kind']} objects"
                out[d["kind"]] = d
    return out


def _container() -> dict:
    (c,) = _k8s()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def _serve_args(args: list[str]):
    """Parse `dynserve serve ARGS` with the real CLI parser (SystemExit on an unknown flag)."""
    return build_parser().parse_args(["serve", *args])


_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "atan2",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers left after removing strings, label
    matchers, ranges, grouping clauses, Grafana variables, function calls and keywords.
    For Grafana's `label_values(metric, label)` only the metric counts."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr)
    if m:
        expr = m.group(1)
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)
    names = set()
    for tok in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        before = e[tok.start() - 1] if tok.start() else " "
        if before.isdigit() or before == ".":  # exponent of a number such as 1e3
            continue
        if e[tok.end() :].lstrip().startswith("(") or tok.group(0).lower() in _KEYWORDS:
            continue
        names.add(tok.group(0))
    return names


def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dynserve-dashboard.json").read_text())


def _dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expression) for every query in panels and template variables."""
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']}", q))
    return out


def _dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ins, _, rest = line.partition(" ")
            out.append((ins.upper(), rest.strip()))
    return out


# ------------------------------------------------------------------------------- the real app
@pytest.fixture(scope="module")
def app(checkpoint_factory):
    """A real app (engine on a tiny MoE checkpoint) after some traffic: its routes and the sample
    names its /metrics exports."""
    cfg = EngineConfig.create(
        str(checkpoint_factory("mixtral")), num_kv_blocks=64, max_num_seqs=4, record_expert_token_counts=True
    )
    engine = AsyncEngine.from_config(cfg)
    try:
        application = build_app(
            engine, ServerSettings(served_model_name="m", api_key="", enable_expert_token_metrics=True)
        )
        client = TestClient(application)
        r = client.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200, r.text
        r = client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "import os"}],
                "max_tokens": 5,
                "stream": True,
                "routing": {"policy": "top_p", "p": 0.5},
                "ignore_eos": True,
            },
        )
        assert r.status_code == 200 and "[DONE]" in r.text
        text = client.get("/metrics").text
        samples = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
        routes = {(m, r.path) for r in application.routes for m in getattr(r, "methods", None) or ()}
        yield {"samples": samples, "routes": routes, "health": client.get("/health").status_code}
    finally:
        engine.shutdown_sync(timeout=0)


# ------------------------------------------------------------------------------- tests
def test_promql_extractor():
    assert promql_metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(dynserve_time_to_first_token_seconds_bucket"
        '{instance=~"$instance"}[$__rate_interval])))'
    ) == {"dynserve_time_to_first_token_seconds_bucket"}
    assert promql_metric_names(
        "sum by (layer) (rate(a_sum[5m])) / ignoring(le) group_left sum(rate(a_count[5m])) > 1e3"
    ) == {"a_sum", "a_count"}
    assert promql_metric_names('vllm:num_requests_waiting{model_name="x"} offset 5m') == {"vllm:num_requests_waiting"}
    assert promql_metric_names("label_values(dynserve_num_requests_running, instance)") == {
        "dynserve_num_requests_running"
    }


def test_every_manifest_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 7
    for f in files:
        assert _docs(f), f"{f} is empty"
    kinds = _k8s()
    for kind in (
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "PersistentVolumeClaim",
    ):
        assert kind in kinds
    kust = _docs(K8S / "kustomization.yaml")[0]
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res


def test_deployment_probes_ports_args_and_grace(app):
    dep = _k8s()["Deployment"]
    pod = dep["spec"]["template"]
    c = _container()
    args = _serve_args(c["args"])  # every flag in the manifest exists in the CLI
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == args.port and args.host == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert ("GET", get["path"]) in app["routes"], probe
        assert ports.get(get["port"], get["port"]) == args.port
    assert app["health"] == 200
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300  # slow model loads
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.shutdown_timeout + pre_stop
    req = c["resources"]["requests"]
    assert req.get("cpu") and req.get("memory")
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True and pod["spec"]["securityContext"]["runAsUser"] > 0
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert args.model_dir in mounts and mounts[args.model_dir]["readOnly"] is True
    ann = pod["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) == args.port and ("GET", ann["prometheus.io/path"]) in app["routes"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_service_and_servicemonitor_reach_the_pod(app):
    k = _k8s()
    svc, mon = k["Service"], k["ServiceMonitor"]
    pod_labels = k["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in container_ports or port["targetPort"] in container_ports.values()
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = mon["spec"]["endpoints"]
    assert ep["port"] == port["name"] and ("GET", ep["path"]) in app["routes"]


def test_autoscaler_scales_the_deployment_on_an_exported_metric(app):
    k = _k8s()
    hpa = k["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["spec"]["scaleTargetRef"]["name"] == k["Deployment"]["metadata"]["name"]
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert names == ["dynserve_num_requests_waiting"]
    assert set(names) <= app["samples"]
    adapter = _docs(K8S / "prometheus-adapter-values.yaml")[0]
    rules = adapter["rules"]["custom"]
    assert {r["name"]["as"] for r in rules} >= set(names)
    for r in rules:
        assert promql_metric_names(r["seriesQuery"]) <= app["samples"], r["seriesQuery"]


def test_prometheus_scrape_config(app):
    prom = _docs(DEPLOY / "prometheus" / "prometheus.yml")[0]
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    default_port = _serve_args([]).port
    static = jobs["dynserve"]
    assert ("GET", static["metrics_path"]) in app["routes"]
    assert static["static_configs"][0]["targets"] == [f"127.0.0.1:{default_port}"]
    pods = jobs["dynserve-pods"]
    relabel = " ".join(str(r.get("source_labels")) for r in pods["relabel_configs"])
    for ann in ("prometheus_io_scrape", "prometheus_io_port", "prometheus_io_path"):
        assert ann in relabel


def test_dashboard_queries_only_exported_metrics(app):
    dash = _dashboard()
    exprs = _dashboard_exprs(dash)
    used: set[str] = set()
    for title, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        missing = names - app["samples"]
        assert not missing, f"panel {title!r} queries metrics the server does not export: {missing}"
        used |= names
    # the panels the dashboard promises
    for needed in (
        "dynserve_generation_tokens_total",
        "dynserve_request_success_total",
        "dynserve_time_to_first_token_seconds_bucket",
        "dynserve_inter_token_latency_seconds_bucket",
        "dynserve_kv_cache_usage_ratio",
        "dynserve_num_requests_waiting",
        "dynserve_experts_per_token_sum",
        "dynserve_experts_per_token_count",
        "dynserve_expert_load_balance",
        "dynserve_experts_touched_per_step_sum",
    ):
        assert needed in used, needed
    by_layer = [e for t, e in exprs if "dynserve_experts_per_token_sum" in e and "by (layer)" in e]
    assert by_layer, "no experts-per-token-by-layer panel"
    flagged = [t for t, e in exprs if "dynserve_expert_tokens_total" in e]
    assert all("--enable-expert-token-metrics" in t for t in flagged)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles(name):
    ins = _dockerfile(name)
    get = lambda key: [rest for i, rest in ins if i == key]  # noqa: E731
    user = get("USER")[-1]
    assert user.split(":")[0] not in ("root", "0") and user.split(":")[0].isdigit()
    assert json.loads(get("ENTRYPOINT")[-1]) == ["dynserve", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dynserve"] == "dynserve.cli:main"
    cmd = json.loads(get("CMD")[-1])
    args = _serve_args(cmd)
    assert args.model_dir in json.loads(get("VOLUME")[-1])
    assert int(get("EXPOSE")[-1]) == args.port and args.host == "0.0.0.0"
    assert "/health" in get("HEALTHCHECK")[-1] and str(args.port) in get("HEALTHCHECK")[-1]
    ignore = (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
    for copy in get("COPY"):
        *sources, _dest = shlex.split(copy)
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is excluded by the .dockerignore"
    assert any("pip install ." in r for i, r in ins if i == "RUN")
    if name == "Dockerfile.cpu":  # the native CPU kernels need a C compiler at run time
        assert any("apt-get install" in r and " gcc " in f" {r} " for i, r in ins if i == "RUN")
    if name == "Dockerfile.cuda":
        base = [r for i, r in ins if i == "ARG" and r.startswith("BASE_IMAGE=")][0]
        assert base.split("=", 1)[1].startswith("pytorch/pytorch:") and "cuda" in base
        assert "--device" in cmd and args.device == "cuda"


def _merge(base: object, patch: object) -> object:
    """A strategic-merge patch as kustomize applies ours: maps merge, `null` deletes a key, lists of
    objects merge by `name` (or `mountPath`), `$patch: delete` drops an item, other lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _merge(out[key], value)
            else:
                out[key] = value
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) for i in base + patch):
        out = [dict(i) for i in base]
        for item in patch:
            key = "name" if "name" in item else "mountPath"
            match = [i for i, b in enumerate(out) if b.get(key) == item[key]]
            if item.get("$patch") == "delete":
                out = [b for i, b in enumerate(out) if i not in match]
            elif match:
                out[match[0]] = _merge(out[match[0]], item)
            else:
                out.append(item)
        return out
    return patch


def _render(directory: Path) -> dict[str, dict]:
    """kind -> object after kustomize's resources, images and patches (the subset these files use)."""
    kust = _docs(directory / "kustomization.yaml")[0]
    objects: dict[str, dict] = {}
    for res in kust["resources"]:
        if (directory / res).is_dir():
            objects.update(_render(directory / res))
        else:
            objects.update({d["kind"]: d for d in _docs(directory / res)})
    for image in kust.get("images", []):
        for c in objects["Deployment"]["spec"]["template"]["spec"].get("containers", []):
            if c["image"].split(":")[0] == image["name"]:
                c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for entry in kust.get("patches", []):
        patch = yaml.safe_load(entry["patch"]) if "patch" in entry else _docs(directory / entry["path"])[0]
        assert objects[patch["kind"]]["metadata"]["name"] == patch["metadata"]["name"]
        if patch.get("$patch") == "delete":
            del objects[patch["kind"]]
        else:
            objects[patch["kind"]] = _merge(objects[patch["kind"]], patch)
    return objects


def test_the_default_volume_works_with_every_provisioner():
    """ReadWriteOnce (local-path, EBS, ... offer no ReadOnlyMany), and the replicas stay on its node."""
    k = _k8s()
    assert k["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = k["Deployment"]["spec"]["template"]
    (term,) = pod["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (vol,) = [v for v in pod["spec"]["volumes"] if v["name"] == "model"]
    assert vol["persistentVolumeClaim"]["claimName"] == k["PersistentVolumeClaim"]["metadata"]["name"]


def test_the_download_overlay_fills_an_emptydir_before_the_server_starts():
    objects = _render(OVERLAYS / "download")
    assert "PersistentVolumeClaim" not in objects
    spec = objects["Deployment"]["spec"]["template"]["spec"]
    assert "affinity" not in spec
    (vol,) = [v for v in spec["volumes"] if v["name"] == "model"]
    assert set(vol) == {"name", "emptyDir"}
    (init,) = spec["initContainers"]
    (c,) = spec["containers"]
    assert init["image"] == c["image"]
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["model"] == _serve_args(c["args"]).model_dir
    env = {e["name"]: e for e in init["env"]}
    assert "/" in env["MODEL_REPO"]["value"] and env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    script = init["command"][-1]
    compile(script, "fetch-model", "exec")
    assert "snapshot_download" in script and 'local_dir="/models"' in script
    assert env["HF_XET_CHUNK_CACHE_SIZE_BYTES"]["value"] == "0"  # no multi-GB cache in the 2 GiB /tmp
    # the memory is sized for the bf16 weights (the default dtype is float32: twice that); args is a
    # list, so the patch repeats the base Deployment's arguments and adds the dtype
    base = _container()["args"]
    assert c["args"][: len(base)] == base and _serve_args(c["args"]).dtype == "bfloat16"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("directory", ["kubernetes", "kubernetes-overlays/download", "kubernetes-overlays/baked"])
def test_kustomize_renders_what_the_tests_check(directory):
    """kubectl kustomize accepts each directory (no cycle, patches that match) and renders what _render does."""
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = {d["kind"]: d for d in yaml.safe_load_all(out.stdout) if d}
    assert rendered == _render(DEPLOY / directory)


def test_the_baked_overlay_has_no_model_volume():
    objects = _render(OVERLAYS / "baked")
    assert "PersistentVolumeClaim" not in objects
    spec = objects["Deployment"]["spec"]["template"]["spec"]
    assert "affinity" not in spec and "model" not in {v["name"] for v in spec["volumes"]}
    (c,) = spec["containers"]
    assert "/models" not in {m["mountPath"] for m in c["volumeMounts"]} and c["image"] == "dynserve:cpu-model"


def test_the_docs_state_the_minimum_version_and_wait_before_copying():
    readme = (DEPLOY / "README.md").read_text()
    assert "Kubernetes >= 1.30" in readme and "Kubernetes >= 1.30" in (K8S / "deployment.yaml").read_text()
    assert readme.index("kubectl wait --for=condition=Ready pod/model-copy") < readme.index("kubectl cp ")
    for command in ("helm install kube-prometheus-stack", "helm install prometheus-adapter", "--set prometheus.url="):
        assert command in readme


def test_manifests_match_the_kubernetes_schemas():
    """Strict validation against the Kubernetes OpenAPI schemas bundled with `kubernetes-validate` (in
    the dev extra; offline): 1.30, the oldest with the preStop `sleep` action enabled by default, and
    the newest bundled; the base manifests and each overlay's result. The ServiceMonitor is a CRD and
    has no bundled schema."""
    kv = pytest.importorskip("kubernetes_validate")
    objects = [d for f in sorted(K8S.glob("*.yaml")) for d in _docs(f)]
    objects += [d for overlay in ("download", "baked") for d in _render(OVERLAYS / overlay).values()]
    checked = 0
    for d in objects:
        if "kind" not in d or d["apiVersion"].startswith(("monitoring.coreos.com", "kustomize")):
            continue
        for version in ("1.30.0", kv.latest_version()):
            kv.validate(d, version, strict=True)
        checked += 1
    assert checked >= 8
