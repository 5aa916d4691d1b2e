"""Load generator for any OpenAI-compatible server (dynserve, vLLM, ...), loopback only.

    python -m loadtests.loadgen --base-url http://127.0.0.1:8000 --num-requests 200 \\
        --request-rate 4 --input-len 128 --output-len 64 --result-file result.json
    python -m loadtests.loadgen --concurrency 8 --num-requests 100 --max-duration 120

Arrivals: open loop (Poisson at --request-rate, `inf` = all at once; --concurrency then caps the
requests in flight) or closed loop (--concurrency workers, each sending its next request when the
last one ends). Prompts and output lengths: synthetic (uniform around --input-len/--output-len by
--range-ratio) or a JSONL file. Streaming responses are parsed by hand (SSE `data:` lines, `[DONE]`).
Reported with `vllm bench serve`'s field names: request_throughput, output_throughput,
total_token_throughput, mean_/median_/p99_{ttft,tpot,itl,e2el}_ms (and p50/p90/std), completed,
failed, duration; plus disconnected/incomplete counts, an error histogram and, when the server
reports it (dynserve), the average number of experts per token.

Every run is bounded by --num-requests and --max-duration; targets other than loopback are
refused unless --allow-remote is given.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")

# Short common words: with a byte-level BPE most are one token, with a word-level tokenizer each
# is exactly one; the synthetic prompt of length L is L of them.
WORDS = (
    "the of and to in is for on that with as it be by this are from or an at not was have which "
    "def return import class self print if else for while in range list dict str int true false none "
    "data value name file path line code test model token expert layer route time user text result "
    "fox dog quick brown jumps over lazy hello world open read write start stop next first last"
).split()


class TargetNotAllowedError(ValueError):
    """The target URL is not on loopback (and --allow-remote was not given)."""


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and literal loopback addresses (127.0.0.0/8, ::1); no DNS lookup."""
    h = host.strip("[]").lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_target(base_url: str, allow_remote: bool = False) -> str:
    """Validate the server URL; return it without a trailing slash (and without a trailing /v1).

    Raises TargetNotAllowedError for a host that is not loopback unless allow_remote."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetNotAllowedError(f"not an http(s) URL: {base_url!r}")
    if not allow_remote and not is_loopback_host(parts.hostname):
        raise TargetNotAllowedError(
            f"refusing to send load to {parts.hostname!r}: only loopback targets (127.0.0.0/8, ::1, "
            "localhost) are allowed; pass --allow-remote to target another host you own"
        )
    url = base_url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


# ------------------------------------------------------------------------------- workload
@dataclass
class RequestSpec:
    """One request of a workload: its prompt (text, token ids, or chat messages) and output budget."""

    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int = 16
    prompt_len: int = 0  # estimated prompt tokens (used when the server reports no usage)
    stream: bool = True
    disconnect_after: float | None = None  # seconds after sending: the client goes away


@dataclass
class LoadConfig:
    """Everything one load run needs: target, arrival process, workload and request options."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first id from GET /v1/models
    api_key: str | None = None
    allow_remote: bool = False
    # bounds
    num_requests: int = 100
    max_duration: float = 300.0  # seconds for the whole run; unfinished requests are cancelled
    request_timeout: float = 300.0
    # arrivals
    request_rate: float = math.inf  # requests/s, Poisson; inf = all at once
    concurrency: int | None = None  # closed loop if request_rate is inf, else a cap on in-flight
    # workload
    dataset_path: str | None = None  # JSONL: {"prompt": str|[int]} or {"messages": [...]}, opt. "max_tokens"
    input_len: int = 64
    output_len: int = 32
    range_ratio: float = 0.0  # lengths uniform in [L*(1-r), L*(1+r)]
    prompt_format: str = "text"  # text | token-ids
    token_id_range: tuple[int, int] = (100, 200)  # for token-ids prompts: ids uniform in [lo, hi)
    prompt_prefix: str = ""  # prepended to every text prompt (e.g. to keep runs from sharing prefix cache)
    seed: int = 0
    # per request
    stream_ratio: float = 1.0  # fraction of requests sent with "stream": true
    disconnect_prob: float = 0.0  # fraction of requests whose client goes away early
    disconnect_max_delay: float = 1.0  # ...after uniform(0, this) seconds
    temperature: float = 0.0
    ignore_eos: bool = True
    routing: dict[str, Any] | None = None  # dynserve per-request routing, e.g. {"policy": "top_p", "p": 0.5}
    extra_body: dict[str, Any] = field(default_factory=dict)
    warmup_requests: int = 0  # sent (closed loop, concurrency 1) before the measured run

    def validate(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")
        if self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        if not (0 < self.max_duration < math.inf):
            raise ValueError("max_duration must be a positive finite number of seconds")
        if not self.request_rate > 0:
            raise ValueError("request_rate must be > 0 (inf for all at once)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.prompt_format not in ("text", "token-ids"):
            raise ValueError("prompt_format must be 'text' or 'token-ids'")
        if self.prompt_format == "token-ids" and self.endpoint != "/v1/completions":
            raise ValueError("token-id prompts need /v1/completions")
        for name in ("stream_ratio", "disconnect_prob", "range_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("input_len and output_len must be >= 1")

    @property
    def mode(self) -> str:
        return "closed-loop" if (self.concurrency is not None and math.isinf(self.request_rate)) else "open-loop"


def _lengths(rng: random.Random, mean: int, ratio: float) -> int:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(lo, hi)


def synthetic_requests(cfg: LoadConfig) -> list[RequestSpec]:
    """num_requests synthetic prompts (random words or token ids) with lengths around input_len
    and output budgets around output_len; the same seed gives the same workload."""
    rng = random.Random(cfg.seed)
    specs = []
    for _ in range(cfg.num_requests):
        n_in = _lengths(rng, cfg.input_len, cfg.range_ratio)
        n_out = _lengths(rng, cfg.output_len, cfg.range_ratio)
        if cfg.prompt_format == "token-ids":
            lo, hi = cfg.token_id_range
            specs.append(
                RequestSpec(prompt=[rng.randrange(lo, hi) for _ in range(n_in)], max_tokens=n_out, prompt_len=n_in)
            )
            continue
        text = cfg.prompt_prefix + " ".join(rng.choice(WORDS) for _ in range(n_in))
        if cfg.endpoint == "/v1/chat/completions":
            specs.append(RequestSpec(messages=[{"role": "user", "content": text}], max_tokens=n_out, prompt_len=n_in))
        else:
            specs.append(RequestSpec(prompt=text, max_tokens=n_out, prompt_len=n_in))
    return specs


def load_jsonl(path: str | Path, cfg: LoadConfig) -> list[RequestSpec]:
    """num_requests requests from a JSONL file, cycling through its lines in order.

    Each line: {"prompt": "text" | [token ids]} or {"messages": [...]}, with optional
    "max_tokens" (or "output_len"); without it, output_len is used."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict) or ("prompt" not in obj and "messages" not in obj):
                raise ValueError(f"{path}:{lineno}: each line needs a 'prompt' or 'messages' field")
            rows.append(obj)
    if not rows:
        raise ValueError(f"{path}: no requests")
    specs = []
    for i in range(cfg.num_requests):
        obj = rows[i % len(rows)]
        max_tokens = int(obj.get("max_tokens", obj.get("output_len", cfg.output_len)))
        if "messages" in obj:
            if cfg.endpoint != "/v1/chat/completions":
                raise ValueError("chat 'messages' in the dataset need --endpoint /v1/chat/completions")
            n_in = sum(len(str(m.get("content", "")).split()) for m in obj["messages"])
            specs.append(RequestSpec(messages=obj["messages"], max_tokens=max_tokens, prompt_len=n_in))
            continue
        prompt = obj["prompt"]
        n_in = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        if cfg.endpoint == "/v1/chat/completions":
            if not isinstance(prompt, str):
                raise ValueError("token-id prompts need /v1/completions")
            specs.append(
                RequestSpec(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, prompt_len=n_in)
            )
        else:
            specs.append(RequestSpec(prompt=prompt, max_tokens=max_tokens, prompt_len=n_in))
    return specs


def build_requests(cfg: LoadConfig) -> list[RequestSpec]:
    """The workload of a run, with each request's streaming and disconnect decided by the seed."""
    specs = load_jsonl(cfg.dataset_path, cfg) if cfg.dataset_path else synthetic_requests(cfg)
    rng = random.Random(cfg.seed + 1)
    for s in specs:
        s.stream = rng.random() < cfg.stream_ratio
        if cfg.disconnect_prob > 0 and rng.random() < cfg.disconnect_prob:
            s.disconnect_after = rng.uniform(0.0, cfg.disconnect_max_delay)
    return specs


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of n requests arriving as a Poisson process of the
    given rate; all zeros for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed + 2)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# ------------------------------------------------------------------------------- SSE
class SSEDecoder:
    """Incremental Server-Sent Events decoder over text lines: collects `data:` fields into events
    (dispatched on a blank line, or at the end), skips `:` comments and other fields."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Feed one line (without its newline); return an event's data when one completes."""
        line = line.rstrip("\r")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return None

    def flush(self) -> str | None:
        """The last event's data if the stream ended without a blank line."""
        return self._dispatch()

    def _dispatch(self) -> str | None:
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return data

    def events(self, lines: Iterable[str]) -> Iterator[str]:
        for line in lines:
            ev = self.feed(line)
            if ev is not None:
                yield ev
        ev = self.flush()
        if ev is not None:
            yield ev


# ------------------------------------------------------------------------------- one request
@dataclass
class RequestResult:
    """What the client saw of one request: outcome, timings (seconds) and token counts."""

    success: bool = False
    error: str = ""
    disconnected: bool = False  # the client went away on purpose (not a failure)
    cancelled: bool = False  # still running when the run's max_duration ended
    stream: bool = True
    start: float = 0.0  # perf_counter at send
    ttft: float | None = None  # streaming only
    itl: list[float] = field(default_factory=list)  # gaps between successive content chunks
    latency: float = 0.0  # end-to-end
    prompt_tokens: int = 0
    output_tokens: int = 0
    usage_reported: bool = False
    expert_activations: int | None = None
    avg_experts_per_token: float | None = None
    finish_reason: str | None = None
    text: str = ""


def request_body(cfg: LoadConfig, spec: RequestSpec, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": spec.max_tokens, "temperature": cfg.temperature}
    if spec.messages is not None:
        body["messages"] = spec.messages
    else:
        body["prompt"] = spec.prompt
    if spec.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        if cfg.prompt_format == "token-ids":  # a model without a tokenizer streams no text: time the token ids
            body["return_token_ids"] = True
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.routing is not None:
        body["routing"] = cfg.routing
    body.update(cfg.extra_body)
    return body


def _chunk_text(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


def _apply_usage(res: RequestResult, usage: dict[str, Any] | None) -> None:
    if not usage:
        return
    res.usage_reported = True
    res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    res.output_tokens = int(usage.get("completion_tokens") or 0)
    if usage.get("expert_activations") is not None:
        res.expert_activations = int(usage["expert_activations"])
    if usage.get("avg_experts_per_token") is not None:
        res.avg_experts_per_token = float(usage["avg_experts_per_token"])


def _error_text(r: httpx.Response, body: bytes) -> str:
    try:
        msg = json.loads(body)["error"]["message"]
    except Exception:  # noqa: BLE001 - not an OpenAI error body
        msg = body[:200].decode("utf-8", "replace")
    return f"HTTP {r.status_code}: {msg}"


async def _send_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], res: RequestResult) -> None:
    chunks = 0
    last = res.start
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            res.error = _error_text(r, await r.aread())
            return
        decoder = SSEDecoder()
        done = False

        def handle(data: str) -> bool:
            nonlocal chunks, last
            if data.strip() == "[DONE]":
                return True
            obj = json.loads(data)
            if "error" in obj and not obj.get("choices"):
                err = obj["error"]
                res.error = "stream error: " + (err.get("message", "") if isinstance(err, dict) else str(err))
                return True
            now = time.perf_counter()
            for choice in obj.get("choices") or []:
                text = _chunk_text(choice)
                if choice.get("finish_reason"):
                    res.finish_reason = choice["finish_reason"]
                if text or choice.get("token_ids"):  # new text, or new tokens (return_token_ids)
                    if res.ttft is None:
                        res.ttft = now - res.start
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
                    res.text += text
            _apply_usage(res, obj.get("usage"))
            return False

        end = 0.0
        async for line in r.aiter_lines():
            if done:  # drain the rest of the body so the connection can be reused
                continue
            data = decoder.feed(line)
            if data is not None and handle(data):
                done, end = True, time.perf_counter()
        if not done:
            data = decoder.flush()
            done = data is not None and handle(data)
    res.latency = (end or time.perf_counter()) - res.start
    if res.error:
        return
    if not done:
        res.error = "stream ended without [DONE]"
        return
    if not res.usage_reported:
        res.output_tokens = chunks
    res.success = True


async def _send_json(client: httpx.AsyncClient, url: str, body: dict[str, Any], res: RequestResult) -> None:
    r = await client.post(url, json=body)
    res.latency = time.perf_counter() - res.start
    if r.status_code != 200:
        res.error = _error_text(r, r.content)
        return
    obj = r.json()
    choices = obj.get("choices") or []
    if choices:
        c = choices[0]
        res.text = c.get("text") if "text" in c else ((c.get("message") or {}).get("content") or "")
        res.finish_reason = c.get("finish_reason")
    _apply_usage(res, obj.get("usage"))
    res.success = True


async def send_request(
    client: httpx.AsyncClient, cfg: LoadConfig, spec: RequestSpec, model: str, base_url: str
) -> RequestResult:
    """Send one request and measure it; never raises (errors are recorded in the result)."""
    res = RequestResult(stream=spec.stream, prompt_tokens=spec.prompt_len)
    url = base_url + cfg.endpoint
    body = request_body(cfg, spec, model)
    res.start = time.perf_counter()
    send = _send_stream if spec.stream else _send_json
    try:
        if spec.disconnect_after is not None:
            await asyncio.wait_for(send(client, url, body, res), spec.disconnect_after)
        else:
            await send(client, url, body, res)
    except TimeoutError:
        if spec.disconnect_after is not None:  # wait_for ran out: the planned disconnect
            res.disconnected, res.success, res.error = True, False, ""
        else:
            res.error = "timeout"
    except httpx.TimeoutException:
        res.error = "timeout"
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
    except (json.JSONDecodeError, ValueError) as e:
        res.error = f"bad response: {e}"[:200]
    if not res.latency:
        res.latency = time.perf_counter() - res.start
    return res


# ------------------------------------------------------------------------------- the run
@dataclass
class RunOutput:
    """Raw per-request results of one run and its wall time."""

    results: list[RequestResult]
    duration: float
    not_sent: int


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def make_client(cfg: LoadConfig, max_connections: int | None = None) -> httpx.AsyncClient:
    """An httpx client that ignores proxy environment variables (traffic stays on loopback)."""
    timeout = httpx.Timeout(cfg.request_timeout, connect=10.0)
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(timeout=timeout, limits=limits, headers=_auth_headers(cfg.api_key), trust_env=False)


async def discover_model(client: httpx.AsyncClient, base_url: str) -> str:
    r = await client.get(f"{base_url}/v1/models")
    r.raise_for_status()
    return str(r.json()["data"][0]["id"])


async def run_requests(cfg: LoadConfig, specs: Sequence[RequestSpec], model: str | None = None) -> RunOutput:
    """Send `specs` with cfg's arrival process; stop at cfg.max_duration (cancelling what is in
    flight, which counts as `cancelled`)."""
    base_url = check_target(cfg.base_url, cfg.allow_remote)
    specs = list(specs)[: cfg.num_requests]
    results: list[RequestResult | None] = [None] * len(specs)
    cap = cfg.concurrency
    async with make_client(cfg, max_connections=cap) as client:
        if model is None:
            model = cfg.model or await discover_model(client, base_url)
        started = [False] * len(specs)
        t0 = time.perf_counter()
        deadline = t0 + cfg.max_duration

        async def one(i: int) -> None:
            started[i] = True
            results[i] = await send_request(client, cfg, specs[i], model, base_url)

        async def closed_loop() -> None:
            it = iter(range(len(specs)))

            async def worker() -> None:
                for i in it:
                    if time.perf_counter() >= deadline:
                        return
                    await one(i)

            await asyncio.gather(*(worker() for _ in range(min(cap or 1, len(specs)))))

        async def open_loop() -> None:
            sem = asyncio.Semaphore(cap) if cap else None
            tasks = []

            async def limited(i: int) -> None:
                if sem is None:
                    await one(i)
                    return
                async with sem:
                    if time.perf_counter() < deadline:
                        await one(i)

            try:
                for i, at in enumerate(poisson_arrivals(len(specs), cfg.request_rate, cfg.seed)):
                    if t0 + at >= deadline:
                        break
                    delay = t0 + at - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.ensure_future(limited(i)))
                await asyncio.gather(*tasks)
            finally:  # max_duration reached: cancel what is still in flight
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        runner = closed_loop() if cfg.mode == "closed-loop" else open_loop()
        try:
            await asyncio.wait_for(runner, max(0.0, deadline - time.perf_counter()))
        except TimeoutError:
            pass
        duration = time.perf_counter() - t0
    out: list[RequestResult] = []
    not_sent = 0
    for i, r in enumerate(results):
        if r is not None:
            out.append(r)
        elif started[i]:
            out.append(RequestResult(cancelled=True, stream=specs[i].stream, latency=duration))
        else:
            not_sent += 1
    return RunOutput(out, duration, not_sent)


# ------------------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _describe(prefix: str, seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000.0 for s in seconds]
    n = len(ms)
    mean = sum(ms) / n if n else 0.0
    std = math.sqrt(sum((x - mean) ** 2 for x in ms) / n) if n else 0.0
    out = {f"mean_{prefix}_ms": mean, f"median_{prefix}_ms": percentile(ms, 50), f"std_{prefix}_ms": std}
    for p in PERCENTILES:
        out[f"p{p}_{prefix}_ms"] = percentile(ms, p)
    return out


def summarize(run: RunOutput, cfg: LoadConfig | None = None) -> dict[str, Any]:
    """Aggregate a run into `vllm bench serve`-style fields (ms, tokens/s, counts)."""
    ok = [r for r in run.results if r.success]
    failed = [r for r in run.results if not r.success and not r.disconnected and not r.cancelled]
    duration = max(run.duration, 1e-9)
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    itls = [x for r in ok for x in r.itl]
    e2els = [r.latency for r in ok]
    out: dict[str, Any] = {
        "duration": run.duration,
        "completed": len(ok),
        "failed": len(failed),
        "disconnected": sum(r.disconnected for r in run.results),
        "incomplete": sum(r.cancelled for r in run.results),
        "not_sent": run.not_sent,
        "num_streaming": sum(r.stream for r in ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        out.update(_describe(name, values))
    out["errors"] = dict(Counter(r.error for r in failed).most_common())
    acts = [(r.expert_activations, r.avg_experts_per_token) for r in ok if r.expert_activations is not None]
    if acts:
        positions = sum(a / avg for a, avg in acts if avg and avg > 0)
        total_acts = sum(a for a, _ in acts)
        out["expert_activations"] = total_acts
        out["avg_experts_per_token"] = total_acts / positions if positions else 0.0
    else:
        out["expert_activations"] = None
        out["avg_experts_per_token"] = None
    if cfg is not None:
        out["config"] = {
            k: v for k, v in asdict(cfg).items() if k != "api_key" and not (isinstance(v, float) and math.isinf(v))
        }
        out["config"]["mode"] = cfg.mode
        if math.isinf(cfg.request_rate):
            out["config"]["request_rate"] = "inf"
    return out


async def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """Build the workload, warm up if asked, run it, and summarise (see summarize)."""
    cfg.validate()
    base_url = check_target(cfg.base_url, cfg.allow_remote)
    model = cfg.model
    if model is None:
        async with make_client(cfg) as client:
            model = await discover_model(client, base_url)
    if cfg.warmup_requests > 0:
        warm = LoadConfig(
            **{
                **asdict(cfg),
                "num_requests": cfg.warmup_requests,
                "concurrency": 1,
                "request_rate": math.inf,
                "disconnect_prob": 0.0,
                "seed": cfg.seed + 1000,
                "dataset_path": None,
                "warmup_requests": 0,
                "token_id_range": tuple(cfg.token_id_range),
            }
        )
        await run_requests(warm, build_requests(warm), model)
    run = await run_requests(cfg, build_requests(cfg), model)
    summary = summarize(run, cfg)
    summary["model"] = model
    return summary


# ------------------------------------------------------------------------------- CLI
def format_summary(s: dict[str, Any], title: str = "load test") -> str:
    lines = [f"{'=' * 18} {title} {'=' * 18}"]

    def row(label: str, value: Any, fmt: str = "{:.2f}") -> None:
        v = fmt.format(value) if isinstance(value, float) else str(value)
        lines.append(f"{label:<36}{v:>14}")

    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    if s.get("disconnected"):
        row("Client disconnects:", s["disconnected"])
    if s.get("incomplete") or s.get("not_sent"):
        row("Cut by max-duration (sent/not sent):", f"{s['incomplete']}/{s['not_sent']}")
    row("Duration (s):", s["duration"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    for name, label in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        lines.append(f"{'-' * 12} {label} {'-' * 12}")
        for stat in ("mean", "median", "p90", "p99"):
            row(f"{stat.capitalize()} {name.upper()} (ms):", s[f"{stat}_{name}_ms"])
    if s.get("avg_experts_per_token") is not None:
        lines.append("-" * 40)
        row("Avg experts per token:", s["avg_experts_per_token"], "{:.3f}")
    if s.get("errors"):
        lines.append("errors: " + json.dumps(s["errors"])[:500])
    return "\n".join(lines)


def add_load_args(p: argparse.ArgumentParser) -> None:
    """The options of a load run (shared by the scenario scripts)."""
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (loopback only by default)")
    p.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS)
    p.add_argument("--model", default=None, help="model name (default: first of GET /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--allow-remote", action="store_true", help="allow a target that is not on loopback")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--max-duration", type=float, default=300.0, help="seconds for the whole run")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: all at once)"
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="closed loop with this many clients (with --request-rate: cap on requests in flight)",
    )
    p.add_argument("--dataset", dest="dataset_path", default=None, help="JSONL file of prompts")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--prompt-format", default="text", choices=["text", "token-ids"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream-ratio", type=float, default=1.0, help="fraction of streaming requests")
    p.add_argument("--disconnect-prob", type=float, default=0.0, help="fraction of requests the client abandons")
    p.add_argument("--disconnect-max-delay", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let requests stop at EOS (default: ignore_eos so output lengths are exact)",
    )
    p.add_argument(
        "--routing",
        type=json.loads,
        default=None,
        help='per-request routing JSON, e.g. \'{"policy": "top_p", "p": 0.5}\'',
    )
    p.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request body")
    p.add_argument("--warmup-requests", type=int, default=0)


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    names = set(LoadConfig.__dataclass_fields__)
    return LoadConfig(**{k: v for k, v in vars(args).items() if k in names})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.loadgen",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_load_args(p)
    p.add_argument("--result-file", default=None, help="write the summary JSON here")
    p.add_argument("--label", default=None, help="a name stored in the result JSON")
    return p


def write_result(path: str | Path, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    try:
        cfg.validate()
        check_target(cfg.base_url, cfg.allow_remote)
    except ValueError as e:
        print(f"loadgen: error: {e}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(run_load(cfg))
    except httpx.HTTPError as e:
        print(f"loadgen: cannot reach {cfg.base_url}: {e}", file=sys.stderr)
        return 1
    if args.label:
        summary["label"] = args.label
    print(format_summary(summary))
    if args.result_file:
        write_result(args.result_file, summary)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
