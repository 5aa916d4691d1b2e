"""One request can never take the server down: bounded bodies and prompts, work off the event loop,
a clean end for streams at the shutdown deadline, and a process that exits non-zero when its engine dies.

Live servers: `dynserve serve` subprocesses (the CLI flags, SIGTERM, exit codes) and `serve_engine` in a
thread of this process (an engine whose model forward fails, or that a watchdog declares dead)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from dynserve.config import EngineConfig
from dynserve.engine.async_engine import AsyncEngine, EngineDeadError
from dynserve.server.run import ServerSettings, serve_engine
from dynserve.tokenizer import Tokenizer

MODEL = "tiny-moe"
KEY = "sk-limits"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BYTES = 3 * 1024 * 1024
MAX_PROMPTS = 4
MAX_QUEUED = 2
SHUTDOWN_S = 0.5
TRIGGER = 5  # token id of <|system|>: a prompt starting with it makes the patched model forward fail
ENV = {k: v for k, v in os.environ.items() if k != "DYNSERVE_API_KEY"}  # servers here set their key themselves


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen | None = None, log: Path | None = None, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:] if log else ''}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            pytest.fail("server did not become healthy")
        time.sleep(0.1)


def _sse_events(lines: Iterator[str]) -> list:
    """Every `data:` payload of an SSE body, JSON-decoded except the final [DONE]."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def _metrics(url: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


# ------------------------------------------------------------------------------- the prompt bound
def _random_texts(n: int, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    alphabet = list("ab  \n\t()=_.,xyz019") + ["<|assistant|>", "<|end|>", "caf\u00e9", "\u65e5\u672c", "\U0001f600"]
    alphabet += ["\U0001d400", "\u212a", "\u00a0"]  # fold under NFKC / lowercasing (4 and 3 bytes -> 1)
    return ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 300))) for _ in range(n)]


def _plain_bpe(normalizer=None, pre_tokenizer=None) -> Tokenizer:
    """A byte-level BPE trained here, with the given normalizer / pre-tokenizer in front."""
    from tokenizers import trainers

    tok = HFTokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_random_texts(200, seed=1), trainer=trainer)
    return Tokenizer(tok)


def test_max_token_bytes_is_the_longest_token(mixtral_dir):
    tok = Tokenizer.from_dir(mixtral_dir)
    lengths = []
    for i in range(tok.vocab_size):
        text = tok.decode([i], skip_special_tokens=False)
        if "\ufffd" not in text:  # a whole character or more: its text is what it stands for
            lengths.append(len(text.encode()))
    assert tok.max_token_bytes == max(lengths) == len("<|assistant|>")


@pytest.mark.parametrize(
    "source",
    [
        "tiny",
        "demo",
        "nfkc+lowercase",
    ],
)
def test_min_num_tokens_never_exceeds_the_real_count(mixtral_dir, source):
    if source == "tiny":
        tok = Tokenizer.from_dir(mixtral_dir)
    elif source == "demo":
        tok = Tokenizer.from_dir(Path(__file__).parent.parent / "dynserve" / "assets" / "default_model")
    else:
        tok = _plain_bpe(normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]))
    bounded = 0
    for text in _random_texts(400, seed=2) + ["\U0001d400" * 200, "\u212a" * 300, " " * 500]:
        n = len(tok.encode(text, add_special_tokens=False))
        assert tok.min_num_tokens(text) <= n, (text, n)
        bounded += tok.min_num_tokens(text) > 0
    assert bounded > 300  # and it is a bound, not always 0


def test_no_bound_where_the_tokenizer_drops_input():
    wordpiece = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cases = [
        (Tokenizer(wordpiece), "a" + " " * 1000),  # whitespace dropped; a long unknown word is one [UNK]
        (_plain_bpe(normalizers.Strip()), " " * 1000 + "a"),
        (_plain_bpe(pre_tokenizer=pre_tokenizers.WhitespaceSplit()), "a" + " " * 1000),
    ]
    for tok, text in cases:
        assert len(tok.encode(text, add_special_tokens=False)) <= 2
        assert tok.min_num_tokens(text) == 0


# ------------------------------------------------------------------------------- live `dynserve serve`
@pytest.mark.parametrize(
    "flag,value,words",
    [
        ("--max-request-bytes", "0", "max_request_bytes must be at least 1"),
        ("--max-prompts-per-request", "0", "max_prompts_per_request must be at least 1"),
    ],
)
def test_invalid_limit_flags_are_clear_errors(mixtral_dir, flag, value, words):
    r = subprocess.run(
        [sys.executable, "-m", "dynserve.cli", "serve", str(mixtral_dir), flag, value],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


@dataclass
class Live:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path


@pytest.fixture(scope="module")
def live(checkpoint_factory, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("limits") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "dynserve.cli",
        "serve",
        str(checkpoint_factory("mixtral")),
        *("--port", str(port), "--served-model-name", MODEL, "--api-key", KEY, "--log-level", "warning"),
        *("--max-num-seqs", "1", "--max-queued-requests", str(MAX_QUEUED), "--num-kv-blocks", "128"),
        *("--max-request-bytes", str(MAX_BYTES), "--max-prompts-per-request", str(MAX_PROMPTS)),
        *("--shutdown-timeout", str(SHUTDOWN_S)),
    ]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=ENV)
    server = Live(f"http://127.0.0.1:{port}", port, proc, log)
    try:
        _wait_healthy(server.url, proc, log)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    length = int(headers["content-length"])
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(rest[:length])


def _head(path: str, extra: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


def test_declared_oversize_body_is_413_without_reading_it(live):
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        t0 = time.perf_counter()
        s.sendall(_head("/v1/completions", f"Content-Length: {100 * 1024 * 1024}\r\n"))  # and no body at all
        status, body = _read_response(s)
        elapsed = time.perf_counter() - t0
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] is None
    print(f"\n413 for a declared 100 MiB body after {elapsed * 1000:.1f} ms")
    assert elapsed < 2.0


def test_chunked_body_is_413_as_soon_as_it_passes_the_limit(live):
    chunk = b" " * 65536
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.sendall(_head("/tokenize", "Transfer-Encoding: chunked\r\n") + b"1\r\n{\r\n")
        for _ in range(MAX_BYTES // len(chunk) + 1):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        # the body never ends (no closing chunk): only a server that counts as bytes arrive answers now
        status, body = _read_response(s)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # a body right at the limit is served
    at_limit = b'{"prompt": "x = 1"}'.ljust(MAX_BYTES)
    r = httpx.post(f"{live.url}/tokenize", content=at_limit, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["count"] > 0, r.text


def test_health_answers_while_big_work_runs(live):
    rnd = random.Random(0)
    # the largest body accepted, as text to tokenise (seconds of tokenizer work) ...
    text = "".join(rnd.choice("abcdefgh ijk(){}=+-*_.,;:0123456789") for _ in range(MAX_BYTES - 20))
    as_text = json.dumps({"prompt": text}).encode()
    # ... and as token ids, the costliest JSON to parse and validate per byte
    n = (MAX_BYTES - 40) // 2 // MAX_PROMPTS - 2
    as_ids = json.dumps({"prompt": [[rnd.randrange(10) for _ in range(n)]] * MAX_PROMPTS}, separators=(",", ":"))
    assert MAX_BYTES - 100 < len(as_text) <= MAX_BYTES and MAX_BYTES - 100 < len(as_ids) <= MAX_BYTES
    results: dict[str, tuple[int, float]] = {}

    def post(name: str, path: str, body: bytes) -> None:
        t0 = time.perf_counter()
        r = httpx.post(f"{live.url}{path}", content=body, headers=AUTH, timeout=120)
        results[name] = (r.status_code, time.perf_counter() - t0)

    work = [
        threading.Thread(target=post, args=("tokenize", "/tokenize", as_text)),
        threading.Thread(target=post, args=("ids", "/v1/completions", as_ids.encode())),
    ]
    latencies = []
    with httpx.Client(timeout=30) as probe:
        for t in work:
            t.start()
        while any(t.is_alive() for t in work):
            t0 = time.perf_counter()
            assert probe.get(f"{live.url}/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.02)
    for t in work:
        t.join()
    assert results["tokenize"][0] == 200 and results["ids"][0] == 400  # each id list is longer than the context
    latencies.sort()
    worst, median = latencies[-1], latencies[len(latencies) // 2]
    work_s = results["tokenize"][1]
    print(f"\n/health while tokenising {MAX_BYTES} bytes ({work_s:.2f} s) and parsing {MAX_BYTES} bytes of ids: ")
    print(f"{len(latencies)} probes, median {median * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    # what a client notices: /health never waits for the big work to finish (an absolute bound on a
    # shared 2-core machine is a timing test: 0.59 s was seen once against a 0.5 s bound)
    assert worst < work_s / 2, (worst, work_s)


def test_prompt_caps(live):
    url = f"{live.url}/v1/completions"
    r = httpx.post(url, json={"prompt": ["a"] * (MAX_PROMPTS + 1)}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert f"at most {MAX_PROMPTS} prompts" in r.json()["error"]["message"]
    r = httpx.post(url, json={"prompt": ["a"] * (MAX_QUEUED + 1)}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "more than the server queues at once" in r.json()["error"]["message"]


def test_all_prompts_of_a_request_fit_the_queue_or_none_enters(live):
    """One sequence runs at a time and two may wait: with one waiting, a two-prompt request is refused
    whole (503), and none of its prompts ever reaches the engine."""
    body = {"model": MODEL, "max_tokens": 400, "ignore_eos": True, "stream": True}

    async def run() -> tuple[int, dict, dict, dict]:
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as client:
            async with (
                client.stream("POST", f"{live.url}/v1/completions", json={**body, "prompt": "a"}) as running,
                client.stream("POST", f"{live.url}/v1/completions", json={**body, "prompt": "b"}) as waiting,
            ):
                assert running.status_code == waiting.status_code == 200
                for _ in range(200):
                    m = _metrics(live.url)
                    if m["dynserve_num_requests_waiting"] == 1 and m["dynserve_num_requests_running"] == 1:
                        break
                    await asyncio.sleep(0.05)
                before = _metrics(live.url)
                r = await client.post(
                    f"{live.url}/v1/completions", json={"prompt": ["x = 1", "y = 2"], "max_tokens": 1}
                )
                after = _metrics(live.url)
                return r.status_code, dict(r.headers), r.json(), {k: after[k] - before[k] for k in before}

    status, headers, err, delta = asyncio.run(run())
    assert status == 503 and int(headers["retry-after"]) >= 1, err
    assert err["error"]["code"] == "server_overloaded"
    assert delta["dynserve_prompt_tokens_total"] == 0  # no prompt of the refused request was queued ...
    assert delta["dynserve_request_success_total{finished_reason=abort}"] == 0  # ... and then aborted


def test_zz_sigterm_aborts_what_runs_at_the_deadline(live):
    """Last: a stream still running at --shutdown-timeout ends with an error event and [DONE], a JSON
    request with a 503, and the process exits 0."""
    events: list = []
    plain: dict = {}

    async def run() -> float:
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as client:

            async def queued() -> None:  # waits behind the stream (one sequence runs at a time)
                r = await client.post(
                    f"{live.url}/v1/completions", json={"prompt": "b", "max_tokens": 300, "ignore_eos": True}
                )
                plain.update(status=r.status_code, body=r.json())

            other = None
            body = {"model": MODEL, "prompt": "a", "max_tokens": 500, "ignore_eos": True, "stream": True}
            async with client.stream("POST", f"{live.url}/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line)
                    if other is None:
                        other = asyncio.ensure_future(queued())
                    elif len(events) == 3:
                        while _metrics(live.url)["dynserve_num_requests_waiting"] < 1:
                            await asyncio.sleep(0.01)
                        sent = time.perf_counter()
                        live.proc.send_signal(signal.SIGTERM)
            await other
            return sent

    sent = asyncio.run(run())
    assert live.proc.wait(30) == 0
    exit_s = time.perf_counter() - sent
    parsed = _sse_events(events)
    assert parsed[-1] == "[DONE]"
    err = parsed[-2]
    assert set(err) == {"error"} and err["error"]["code"] == "request_aborted", parsed[-3:]
    assert err["error"]["type"] == "server_error" and "abort" in err["error"]["message"]
    assert all("choices" in c for c in parsed[:-2])
    assert plain["status"] == 503 and plain["body"]["error"]["code"] == "request_aborted"
    print(f"\nSIGTERM with --shutdown-timeout {SHUTDOWN_S}: streams ended cleanly, process exited after {exit_s:.2f} s")
    assert exit_s < SHUTDOWN_S + 5


# ------------------------------------------------------------------------------- engine death
@contextlib.contextmanager
def _serving(engine: AsyncEngine) -> Iterator[tuple[str, threading.Thread, dict]]:
    """`serve_engine` in a thread of this process (no hard exit: it would end pytest)."""
    port = _free_port()
    outcome: dict = {}

    def run() -> None:
        settings = ServerSettings(port=port, served_model_name=MODEL, api_key="", log_level="warning")
        try:
            serve_engine(engine, settings, hard_exit=False)
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            outcome["error"] = e
        outcome["ended"] = time.perf_counter()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, timeout=60)
        yield url, thread, outcome
    finally:
        if thread.is_alive():
            engine.fail(RuntimeError("test teardown"))
            thread.join(30)


@pytest.mark.parametrize("how", ["forward raises", "watchdog calls fail()"])
def test_engine_death_ends_requests_cleanly_and_stops_the_server(mixtral_dir, how):
    engine = AsyncEngine.from_config(EngineConfig.create(str(mixtral_dir), num_kv_blocks=64, max_num_seqs=4))
    model = engine.engine.runner.model
    real_forward, broken = model.forward, threading.Event()

    def forward(batch, kv_caches):
        if broken.is_set():
            raise RuntimeError("simulated device fault")
        return real_forward(batch, kv_caches)

    model.forward = forward
    with _serving(engine) as (url, thread, outcome):
        plain: dict = {}

        def post() -> None:
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "b", "max_tokens": 400, "ignore_eos": True})
            plain.update(status=r.status_code, body=r.json())

        in_flight = threading.Thread(target=post)
        in_flight.start()
        body = {"prompt": "a", "max_tokens": 400, "ignore_eos": True, "stream": True}
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: ") and sum(x.startswith("data: ") for x in lines) == 2:
                    died = time.perf_counter()
                    if how == "forward raises":
                        broken.set()
                    else:
                        engine.fail(RuntimeError("watchdog: expert-parallel worker 1 stopped answering"))
        in_flight.join(30)
        thread.join(30)
        assert not thread.is_alive()
    events = _sse_events(lines)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_dead"
    assert plain["status"] == 500 and plain["body"]["error"]["code"] == "engine_dead"
    assert isinstance(outcome["error"], EngineDeadError)
    assert outcome["ended"] - died < 5
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


_DIE_ON_TRIGGER = """
import sys
import torch
from dynserve import cli
from dynserve.model.decoder import DecoderForCausalLM

real_forward = DecoderForCausalLM.forward

def forward(self, batch, kv_caches):
    # a prompt that starts with the trigger token: the device "fails" in the middle of a batch
    if bool(((batch.positions == 0) & (batch.input_ids == {trigger})).any()):
        raise RuntimeError("simulated device fault")
    return real_forward(self, batch, kv_caches)

DecoderForCausalLM.forward = forward
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_dynserve_serve_exits_1_when_the_engine_dies(mixtral_dir, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    script = _DIE_ON_TRIGGER.format(trigger=TRIGGER)
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, "serve", str(mixtral_dir), "--port", str(port), "--log-level", "warning"],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=ENV,
        )
    try:
        _wait_healthy(url, proc, log)
        lines = []
        body = {"prompt": "a", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: ") and sum(x.startswith("data: ") for x in lines) == 2:
                    bad = httpx.post(f"{url}/v1/completions", json={"prompt": [TRIGGER, 7]}, timeout=60)
                    died = time.perf_counter()
        assert bad.status_code == 500 and bad.json()["error"]["code"] == "engine_dead"
        events = _sse_events(lines)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_dead"
        assert proc.wait(15) == 1
        exit_s = time.perf_counter() - died
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out = log.read_text()
    assert "dynserve: error: the engine died" in out and "simulated device fault" in out
    print(f"\ndynserve serve exited 1 {exit_s:.2f} s after its engine died")
    assert exit_s < 5


_STUCK_TEARDOWN = """
import atexit, sys, time
from dynserve.config import EngineConfig
from dynserve.engine.async_engine import AsyncEngine
from dynserve.engine.stats import EngineStats
from dynserve.server.run import ServerSettings, serve_engine
from dynserve.tokenizer import Tokenizer

class BrokenEngine:
    "An LLMEngine stand-in whose first step fails with an error that belongs to no request."
    def __init__(self, model_dir):
        self.config, self.tokenizer = EngineConfig.create(model_dir), Tokenizer.from_dir(model_dir)
        self.added, self.num_steps = [], 0
    def add_request(self, request_id, *args, **kwargs):
        self.added.append(request_id)
    def has_unfinished_requests(self):
        return bool(self.added)
    def step(self):
        raise RuntimeError("simulated device fault")
    def abort_request(self, ids, report=True):
        pass
    def get_stats(self):
        return EngineStats()
    def close(self):
        pass

atexit.register(time.sleep, 3600)  # a teardown that never ends (a collective with a peer that is gone)
settings = ServerSettings(port=int(sys.argv[2]), engine_death_exit_timeout=1.5, log_level="warning")
serve_engine(AsyncEngine(BrokenEngine(sys.argv[1])), settings)
"""


def test_process_exits_even_when_teardown_hangs_after_engine_death(mixtral_dir, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-c", _STUCK_TEARDOWN, str(mixtral_dir), str(port)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=ENV,
        )
    try:
        _wait_healthy(url, proc, log)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=30)
        died = time.perf_counter()
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead"
        assert proc.wait(15) == 1
        exit_s = time.perf_counter() - died
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "did not stop within 1.5 s" in log.read_text()
    assert 1.0 < exit_s < 5.0
