"""The OpenAI-compatible HTTP server: FastAPI app over an AsyncEngine, and `run_server` (uvicorn).

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (JSON or SSE),
GET /health, GET /version, POST /tokenize, POST /detokenize, GET /metrics.
Every error uses OpenAI's body {"error": {"message", "type", "param", "code"}}; validation errors
are 400. A client that goes away (streaming or not) aborts its request in the engine.

Bounded and off the event loop: request bodies are capped (413) before they are parsed; large bodies
are parsed and validated, prompts rendered and tokenised in a small thread pool (the tokenizer
releases the GIL), and the engine thread gets token ids, never text to tokenise; a text prompt that
cannot fit the context whatever it tokenises to is rejected without tokenising it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar, get_type_hints

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import dynserve
from dynserve.config import EngineConfig
from dynserve.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineStoppedError,
    QueueFullError,
    RequestAbortedError,
    RequestFailedError,
    RequestStream,
)
from dynserve.engine.outputs import ExpertUsage, RequestOutput, TokenLogprobs
from dynserve.sampling_params import SamplingParams
from dynserve.server.metrics import ServerMetrics
from dynserve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    InvalidRequestError,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UsageInfo,
    conversation,
)

logger = logging.getLogger("dynserve.server")

_LOGPROB_FLOOR = -9999.0  # JSON has no -inf
# Bodies and texts below this size are parsed / tokenised on the event loop (well under a millisecond);
# above it they go to the worker threads, so a large request never stalls the other connections.
_INLINE_BYTES = 16 * 1024
# After a SIGTERM, requests still running at --shutdown-timeout are aborted; their handlers then get
# this long to send the error (an SSE error event and [DONE]) before uvicorn cuts the connections.
_ABORT_GRACE_S = 5.0
# After the engine died: how long in-flight handlers may take to send their error before uvicorn cuts them.
_DEATH_GRACE_S = 3.0
_T = TypeVar("_T")


@dataclass
class ServerSettings:
    """How the HTTP server runs (the engine's own options live in EngineConfig).

    api_key None falls back to the DYNSERVE_API_KEY environment variable; empty means no auth. The key
    guards every route but the probes (/health, /metrics, /version) and, with public_docs, the API docs.
    served_model_name None falls back to EngineConfig.served_model_name, then the model path.
    max_request_bytes caps a request body (413 beyond it); max_prompts_per_request caps the prompts of
    one completions request (400). engine_death_exit_timeout: after the engine died, a process whose
    graceful stop takes longer than this is ended with os._exit(1) (`run_server` / `serve_engine`).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_queued_requests: int | None = None
    shutdown_timeout: float = 30.0
    enable_expert_token_metrics: bool = False
    log_level: str = "info"
    retry_after_s: int = 1
    max_request_bytes: int = 8 * 1024 * 1024
    max_prompts_per_request: int = 256
    public_docs: bool = False
    engine_death_exit_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get("DYNSERVE_API_KEY") or None
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be at least 1, got {self.max_request_bytes}")
        if self.max_prompts_per_request < 1:
            raise ValueError(f"max_prompts_per_request must be at least 1, got {self.max_prompts_per_request}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be non-negative, got {self.shutdown_timeout}")


# ------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error to answer with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message, param = _encodable(message), _encodable(param) if param is not None else None
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _encodable(text: str) -> str:
    """`text` with whatever UTF-8 cannot encode (lone surrogates echoed from a request) written as `\\udXXX`,
    so that an error body can always be sent."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _engine_error(e: BaseException, retry_after: int, prompt_param: str = "prompt") -> ApiError:
    """Map an AsyncEngine / engine exception to the API error the client sees."""
    if isinstance(e, InvalidRequestError):
        return ApiError(400, e.message, param=e.param, code=e.code)
    if isinstance(e, QueueFullError):
        return ApiError(
            503,
            str(e),
            "server_error",
            code="server_overloaded",
            headers={"Retry-After": str(max(1, round(e.retry_after or retry_after)))},
        )
    if isinstance(e, EngineStoppedError):
        return ApiError(503, str(e), "server_error", code="shutting_down", headers={"Retry-After": str(retry_after)})
    if isinstance(e, EngineDeadError):
        return ApiError(500, str(e), "server_error", code="engine_dead")
    if isinstance(e, RequestFailedError):
        return ApiError(500, f"the request failed: {e}", "server_error", code="request_failed")
    if isinstance(e, RequestAbortedError):
        reason = str(e)
        return ApiError(
            503,
            reason if "abort" in reason else f"the request was aborted: {reason or 'by the server'}",
            "server_error",
            code="request_aborted",
            headers={"Retry-After": str(retry_after)},
        )
    if isinstance(e, ValueError):
        msg = str(e)
        if msg.startswith("This model's maximum context length") or type(e).__name__ == "ContextLengthError":
            return ApiError(400, msg, param=prompt_param, code="context_length_exceeded")
        return ApiError(400, msg, param=prompt_param if "prompt" in msg else None)
    logger.exception("internal error", exc_info=e)
    return ApiError(500, f"internal server error: {type(e).__name__}", "server_error")


def _loc_to_param(loc: Iterable[Any]) -> str | None:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
            else:
                parts.append(f"[{item}]")
        else:
            parts.append(str(item))
    return ".".join(parts) or None


def _validation_error(errors: list[Any]) -> ApiError:
    """The 400 for pydantic / FastAPI validation errors (FastAPI's locations start with "body")."""
    if not errors:
        return ApiError(400, "invalid request")
    err = errors[0]
    loc = list(err.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    if err.get("type") == "json_invalid":
        detail = str((err.get("ctx") or {}).get("error", ""))
        if "surrogate" in detail or "hex escape" in detail:
            detail += " (strings must be valid Unicode: a lone surrogate escape such as \\ud800 is not)"
        return ApiError(400, f"invalid JSON body: {detail}".rstrip(": "), code="invalid_json")
    if err.get("type") == "missing" and not loc:
        return ApiError(400, "a JSON request body is required")
    if err.get("type") in ("model_attributes_type", "dict_type", "model_type") and not loc:
        if isinstance(err.get("input"), bytes | bytearray):  # not parsed: a non-JSON content type
            return ApiError(400, "the request body must be JSON: send it with Content-Type: application/json")
        return ApiError(400, "the request body must be a JSON object")
    param = _loc_to_param(loc)
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        msg = "field required"
    elif err.get("type") == "extra_forbidden":
        msg = "unknown field"
    message = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return ApiError(400, message, param=param)


_HTTP_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
}


# ------------------------------------------------------------------------------- middleware
_PROBE_PATHS = ("/health", "/metrics", "/version")


def _route_path(scope: Scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on every route except `open_paths` (probes, scrapers and,
    with --public-docs, the API docs): a route added later is guarded without anyone remembering to.
    Pure ASGI, so streaming responses pass through untouched."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Iterable[str] = _PROBE_PATHS) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._open = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") != "OPTIONS" and _route_path(scope) not in self._open:
            auth = b""
            for k, v in scope.get("headers", []):
                if k == b"authorization":
                    auth = v
                    break
            if not secrets.compare_digest(auth, self._expected):
                err = ApiError(
                    401,
                    "Incorrect API key provided.",
                    "authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Answers 413 (OpenAI's error body, code `request_too_large`) to a request whose body is larger than
    `max_bytes`: at once when Content-Length says so (the body is never read), else as soon as the bytes
    received so far (a chunked body) pass the limit; the app then sees a disconnect and whatever it sends
    is dropped. uvicorn discards the rest of the body. Pure ASGI, so streaming responses pass through."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | None) -> ApiError:
        told = f" ({size} bytes)" if size is not None else ""
        return ApiError(
            413,
            f"The request body{told} is larger than this server accepts ({self.max_bytes} bytes).",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                with contextlib.suppress(ValueError):
                    declared = int(v)
        if declared is not None and declared > self.max_bytes:
            await _send_error(self._too_large(declared), send)
            return
        received = 0
        rejected = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    rejected = True
                    if not response_started:
                        await _send_error(self._too_large(None), send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if rejected and not response_started:
                return  # the 413 went out instead
            response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not rejected:
                raise  # a body cut short by the 413 may make the app raise: nothing left to tell anyone


async def _send_error(err: ApiError, send: Send) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------- JSON bodies
class _JSONBodyRoute(APIRoute):
    """A route whose JSON body is parsed and validated by pydantic in one pass (`model_validate_json`),
    in the worker threads when it is large. pydantic's parser rejects what Python's `json` lets through:
    a lone surrogate escape (`"\\ud800"`) in any string of the request is a 400 `invalid_json`, before any
    field is looked at, and invalid UTF-8 too. FastAPI then gets the validated model."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()
        model = _body_model(self.endpoint)
        if model is None:
            return handler

        async def parse_then_handle(request: Request) -> Response:
            if _is_json(request.headers.get("content-type")):
                body = await request.body()
                if body:  # an empty body is left to FastAPI ("a JSON request body is required")
                    srv: _Server = request.app.state.server
                    try:
                        parsed = await srv.offload(len(body), model.model_validate_json, body)
                    except ValidationError as e:
                        return _validation_error(e.errors(include_url=False)).response()
                    request = _ParsedRequest(request, body, parsed)
            return await handler(request)

        return parse_then_handle


class _ParsedRequest(Request):
    """A request whose body was already read and parsed: FastAPI's `json()` gets the validated model."""

    def __init__(self, request: Request, body: bytes, parsed: Any) -> None:
        super().__init__(request.scope, request.receive)
        self._raw_body, self._parsed = body, parsed
        self.body_size = len(body)

    async def body(self) -> bytes:
        return self._raw_body

    async def json(self) -> Any:
        return self._parsed


def _body_model(endpoint: Callable[..., Any]) -> type[BaseModel] | None:
    try:
        hints = get_type_hints(endpoint)
    except Exception:  # an annotation that does not resolve: leave the route to FastAPI
        return None
    models = [t for k, t in hints.items() if k != "return" and isinstance(t, type) and issubclass(t, BaseModel)]
    return models[0] if len(models) == 1 else None


def _is_json(content_type: str | None) -> bool:
    if not content_type:  # FastAPI parses a body without a content type as JSON (strict_content_type=False)
        return True
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


# ------------------------------------------------------------------------------- helpers
def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


_SSE_DONE = "data: [DONE]\n\n"


def _finite(x: float) -> float:
    return x if x == x and x > _LOGPROB_FLOOR else _LOGPROB_FLOOR


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable alphabet, inverted: each of the 256 bytes is written as one
    character (printable Latin-1 bytes as themselves, the rest shifted to 256 + i)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    char_of = {b: b for b in printable}
    shift = 0
    for b in range(256):
        if b not in char_of:
            char_of[b] = 256 + shift
            shift += 1
    return {chr(c): b for b, c in char_of.items()}


_BYTE_OF_CHAR = _byte_level_alphabet()


class _TokenText:
    """Per-request cache of one token's (display string, UTF-8 bytes) for logprobs.

    A token that is only part of a UTF-8 character (byte-level BPE, byte-fallback) has no text of
    its own; its raw bytes are recovered from the vocabulary entry and it is shown as
    `bytes:\\xNN...` the way OpenAI does, so distinct tokens keep distinct strings."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._resolve(token_id)
        return hit

    def _resolve(self, token_id: int) -> tuple[str, bytes]:
        if self._tok is None:
            return f"<{token_id}>", b""
        try:
            text = self._tok.decode([token_id], skip_special_tokens=False)
        except Exception:
            text = ""
        if "\ufffd" not in text:
            return text, text.encode("utf-8")
        raw = self._raw_bytes(token_id)
        if raw is None:
            return text, text.encode("utf-8")
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw

    def _raw_bytes(self, token_id: int) -> bytes | None:
        piece = None
        with contextlib.suppress(Exception):
            piece = self._tok.id_to_token(token_id)
        if not piece:
            return None
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
            with contextlib.suppress(ValueError):
                return bytes([int(piece[3:5], 16)])
        if all(ch in _BYTE_OF_CHAR for ch in piece):
            return bytes(_BYTE_OF_CHAR[ch] for ch in piece)
        return None


def _completion_logprobs(lps: list[TokenLogprobs], text: _TokenText, offset: int) -> tuple[dict[str, Any], int]:
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for lp in lps:
        tok, raw = text(lp.token_id)
        tokens.append(tok)
        token_logprobs.append(_finite(lp.logprob))
        entry: dict[str, float] = {}
        for t in lp.top:
            entry.setdefault(text(t.token_id)[0], _finite(t.logprob))
        entry.setdefault(tok, _finite(lp.logprob))
        top.append(entry)
        offsets.append(offset)
        offset += len(raw.decode("utf-8", errors="replace")) if raw else len(tok)
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top}, offset


def _chat_logprobs(lps: list[TokenLogprobs], text: _TokenText, num_top: int) -> dict[str, Any]:
    content = []
    for lp in lps:
        tok, raw = text(lp.token_id)
        tops = []
        for t in lp.top[:num_top]:
            s, b = text(t.token_id)
            tops.append({"token": s, "logprob": _finite(t.logprob), "bytes": list(b)})
        content.append({"token": tok, "logprob": _finite(lp.logprob), "bytes": list(raw), "top_logprobs": tops})
    return {"content": content}


def _usage(finals: list[RequestOutput]) -> dict[str, Any]:
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    expert = ExpertUsage.merge([o.expert_usage for o in finals]) if finals else ExpertUsage()
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        expert_activations=expert.expert_activations,
        avg_experts_per_token=expert.avg_experts_per_token,
        prompt_tokens_details={"cached_tokens": sum(o.num_cached_tokens for o in finals)},
    ).model_dump()


def _public_finish_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    if reason == "abort":
        raise RequestAbortedError("the request was aborted by the server")
    return reason if reason in ("stop", "length") else "stop"


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as (stream index, output)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                await queue.put((i, out))
            await queue.put((i, done))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _ClientGone(Exception):
    pass


# ------------------------------------------------------------------------------- the app
@dataclass
class _Prompt:
    """One prompt ready for the engine: token ids (the engine never tokenises), the text when there is one
    (the engine reports it back), and the text to echo."""

    text: str | None
    token_ids: list[int]
    echo: str = ""


class _Server:
    """The state behind the routes: engine, settings, metrics, model name, and the worker threads that
    parse large bodies, render chat templates and tokenise."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        cfg = engine.config
        self.model_name = settings.served_model_name or cfg.served_model_name or cfg.model.model_dir
        self.max_model_len = cfg.model.max_model_len
        self.created = int(time.time())
        self.metrics = ServerMetrics(engine.get_stats, self.model_name, settings.enable_expert_token_metrics)
        engine.add_metrics_sink(self.metrics)
        # a few threads: the tokenizer releases the GIL, but each thread is a core's worth of work
        workers = min(8, max(4, os.cpu_count() or 1))
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dynserve-prep")
        if engine.tokenizer is not None:  # scan the vocabulary for the prompt-length bound now, not mid-request
            engine.tokenizer.min_num_tokens("x")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def offload(self, size: int, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(*args)`: inline when its input (`size` bytes or characters) is small, else in a worker thread."""
        if size < _INLINE_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    @property
    def tokenizer(self) -> Any:
        tok = self.engine.tokenizer
        if tok is None:
            raise ApiError(400, "this model has no tokenizer; send token ids")
        return tok

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(
                404, f"The model `{model}` does not exist.", "not_found_error", param="model", code="model_not_found"
            )

    def check_capacity(self, num_prompts: int, param: str) -> None:
        """All prompts of a request must fit the waiting queue at once (503 + Retry-After if not now, 400 if
        never: more prompts than the queue holds)."""
        limit = self.engine.max_queued_requests
        if limit and num_prompts > limit:
            raise ApiError(
                400,
                f"this request has {num_prompts} prompts, more than the server queues at once ({limit}); "
                "send fewer per request",
                param=param,
            )
        try:
            self.engine.check_capacity(num_prompts)
        except Exception as e:
            raise _engine_error(e, self.settings.retry_after_s, param) from None

    # ---------------------------------------------------------------- prompts
    def completion_prompts(self, prompt: Any) -> list[tuple[str | None, list[int] | None]]:
        """The validated `prompt` as (text, token ids) pairs; at most --max-prompts-per-request of them."""
        if isinstance(prompt, str):
            return [(prompt, None)]
        first = prompt[0]
        if isinstance(first, int):  # one prompt of token ids
            return [(None, prompt)]
        cap = self.settings.max_prompts_per_request
        if len(prompt) > cap:
            raise ApiError(
                400,
                f"prompt: a request may carry at most {cap} prompts (--max-prompts-per-request), got {len(prompt)}",
                param="prompt",
            )
        if isinstance(first, str):
            return [(x, None) for x in prompt]
        return [(None, x) for x in prompt]

    # the methods below scale with the input: they run in the worker threads (`offload`)
    def check_text_length(self, text: str, param: str) -> None:
        """400 `context_length_exceeded`, without tokenising, for a text longer than any prompt could be:
        its UTF-8 bytes over the most bytes one token stands for already reach the context length."""
        least = self.tokenizer.min_num_tokens(text)
        if least >= self.max_model_len:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt is at "
                f"least {least} tokens long ({len(text.encode('utf-8', 'surrogatepass'))} bytes of text). "
                "Please reduce the length of the prompt.",
                param=param,
                code="context_length_exceeded",
            )

    def check_context(self, num_tokens: int, max_tokens: int | None, param: str) -> None:
        """The engine's own context check (same rule, same words), done here so that the engine thread never
        receives a prompt longer than the context."""
        limit = self.max_model_len
        completion = max_tokens if max_tokens is not None else limit - num_tokens
        if num_tokens + max(completion, 1) > limit or completion < 1:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_tokens + max(completion, 0)} tokens ({num_tokens} in the messages, {completion} in the "
                "completion). Please reduce the length of the messages or completion.",
                param=param,
                code="context_length_exceeded",
            )

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except ApiError:
            raise
        except Exception as e:
            raise ApiError(400, f"could not tokenize the {param}: {e}", param=param) from None

    def prepare_prompts(
        self, prompts: list[tuple[str | None, list[int] | None]], max_tokens: int | None, echo: bool
    ) -> list[_Prompt]:
        out = []
        for text, ids in prompts:
            if ids is None:
                assert text is not None
                self.check_text_length(text, "prompt")
                ids = self.encode(text, "prompt")
            self.check_context(len(ids), max_tokens, "prompt")
            echo_text = (text if text is not None else self.decode(ids)) if echo else ""
            out.append(_Prompt(text, ids, echo_text))
        return out

    def prepare_chat(self, req: ChatCompletionRequest, max_tokens: int | None) -> _Prompt:
        text = self.render_chat(req.messages, req.add_generation_prompt)
        self.check_text_length(text, "messages")
        ids = self.encode(text, "messages", add_special_tokens=False)
        self.check_context(len(ids), max_tokens, "messages")
        return _Prompt(text, ids)

    def render_chat(self, messages: list[Any], add_generation_prompt: bool) -> str:
        tok = self.tokenizer
        try:
            return tok.apply_chat_template(conversation(messages), add_generation_prompt=add_generation_prompt)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        except Exception as e:  # template rendering errors (jinja) are the request's fault too
            raise ApiError(400, f"could not apply the chat template: {e}", param="messages") from None

    def decode(self, ids: list[int]) -> str:
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        except Exception:
            return ""

    def tokenize(self, req: TokenizeRequest) -> bytes:
        if req.messages is not None:
            text = self.render_chat(req.messages, req.add_generation_prompt)
            ids = self.encode(text, "messages", add_special_tokens=bool(req.add_special_tokens))
        else:
            assert req.prompt is not None
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = self.encode(req.prompt, "prompt", add_special_tokens=add)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.max_model_len).model_dump_json().encode()

    def detokenize(self, tokens: list[int]) -> bytes:
        vocab = self.engine.config.model.vocab_size
        if tokens and (min(tokens) < 0 or max(tokens) >= vocab):
            bad = next(t for t in tokens if not 0 <= t < vocab)
            raise ApiError(400, f"token id {bad} is out of range for vocabulary size {vocab}", param="tokens")
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        return DetokenizeResponse(prompt=text).model_dump_json().encode()

    # ---------------------------------------------------------------- engine
    async def submit(
        self,
        base_id: str,
        prompts: list[_Prompt],
        params: SamplingParams,
        prompt_param: str,
    ) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            self.engine.check_capacity(len(prompts))  # the whole request fits, or none of it is queued
            for i, p in enumerate(prompts):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                streams.append(await self.engine.add_request(rid, p.text, params, p.token_ids))
        except BaseException as e:
            for s in streams:
                s.abort()
            if isinstance(e, Exception):
                raise _engine_error(e, self.settings.retry_after_s, prompt_param) from None
            raise
        return streams

    async def collect(self, streams: list[RequestStream], request: Request) -> list[RequestOutput]:
        """Wait for every stream's final output; abort them all if the client disconnects."""
        finals: list[RequestOutput | None] = [None] * len(streams)

        async def consume() -> None:
            async for i, out in _merge(streams):
                finals[i] = out

        task = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the handler itself was cancelled
            task.cancel()
            watcher.cancel()
            _abort_all(streams)
            raise
        watcher.cancel()
        if task not in done:
            task.cancel()
            _abort_all(streams)
            raise _ClientGone()
        exc = task.exception()
        if exc is not None:
            _abort_all(streams)
            raise _engine_error(exc, self.settings.retry_after_s)
        return [f for f in finals if f is not None]


def _abort_all(streams: list[RequestStream]) -> None:
    for s in streams:
        s.abort()


def build_app(engine: AsyncEngine, settings: ServerSettings | None = None, *, owns_engine: bool = False) -> FastAPI:
    """The FastAPI app serving `engine`. With owns_engine, app shutdown also shuts the engine
    down (what the Ray Serve replicas do; `serve_engine` stops the engine itself)."""
    settings = settings or ServerSettings()
    if settings.max_queued_requests is not None:
        engine.max_queued_requests = settings.max_queued_requests
    srv = _Server(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.remove_metrics_sink(srv.metrics)
        srv.close()
        if owns_engine:
            await engine.shutdown(timeout=1.0)

    app = FastAPI(
        title="dynserve",
        version=dynserve.__version__,
        description="OpenAI-compatible server for Mixture-of-Experts models with adaptive expert routing.",
        lifespan=lifespan,
        strict_content_type=False,
    )
    app.router.route_class = _JSONBodyRoute  # every route below parses its JSON body with pydantic
    app.state.server = srv
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    if settings.api_key:  # added last: the outermost layer, so a request without the key is never read
        open_paths = list(_PROBE_PATHS)
        if settings.public_docs:
            docs = (app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url)
            open_paths += [d for d in docs if d]
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key, open_paths=open_paths)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(list(exc.errors())).response()

    @app.exception_handler(InvalidRequestError)
    async def _invalid_params(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return ApiError(400, exc.message, param=exc.param, code=exc.code).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        type_ = _HTTP_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return ApiError(status, detail, type_, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return ApiError(500, f"internal server error: {type(exc).__name__}", "server_error").response()

    errors = {
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    }

    # ---------------------------------------------------------------- info routes
    @app.get("/health")
    async def health() -> Response:
        if engine.is_healthy:
            return JSONResponse({"status": "ok"})
        err = engine.dead_error
        return ApiError(
            503, f"the engine is not running{f': {err!r}' if err else ''}", "server_error", code="engine_dead"
        ).response()

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": dynserve.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = srv.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[_model_card(srv)])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=errors)
    async def get_model(model_id: str) -> ModelCard:
        srv.check_model(model_id)
        return _model_card(srv)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=errors)
    async def tokenize(req: TokenizeRequest, raw: Request) -> Response:
        srv.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "send exactly one of 'prompt' or 'messages'", param="prompt")
        body = await srv.offload(_work_size(raw), srv.tokenize, req)
        return Response(body, media_type="application/json")

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=errors)
    async def detokenize(req: DetokenizeRequest, raw: Request) -> Response:
        srv.check_model(req.model)
        body = await srv.offload(_work_size(raw), srv.detokenize, req.tokens)
        return Response(body, media_type="application/json")

    # ---------------------------------------------------------------- completions
    @app.post("/v1/completions", response_model=CompletionResponse, responses=errors)
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        srv.check_model(req.model)
        params = req.to_sampling_params(engine.config.routing)
        prompts = srv.completion_prompts(req.prompt)
        srv.check_capacity(len(prompts), "prompt")  # before the tokenising work, not after it
        prepared = await srv.offload(_work_size(raw), srv.prepare_prompts, prompts, params.max_tokens, req.echo)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = await srv.submit(request_id, prepared, params, "prompt")
        echo_texts = [p.echo for p in prepared] if req.echo else None
        headers = {"x-request-id": request_id}
        if req.stream:
            gen = _completion_stream(srv, req, streams, request_id, created, echo_texts, len(prompts))
            return StreamingResponse(gen, media_type="text/event-stream", headers=headers)
        try:
            finals = await srv.collect(streams, raw)
        except _ClientGone:
            return Response(status_code=499)
        choices = []
        tok_text = _TokenText(engine.tokenizer)
        for i, out in enumerate(finals):
            for c in out.outputs:
                prefix = echo_texts[i] if echo_texts else ""
                lp = None
                if c.logprobs is not None and req.logprobs is not None:
                    lp, _ = _completion_logprobs(c.logprobs, tok_text, len(prefix))
                choices.append(
                    {
                        "index": i * req.n + c.index,
                        "text": prefix + c.text,
                        "logprobs": lp,
                        "finish_reason": _finish_or_raise(srv, c.finish_reason),
                        "stop_reason": c.stop_reason,
                    }
                )
        body = CompletionResponse(
            id=request_id, created=created, model=srv.model_name, choices=choices, usage=_usage(finals)
        )
        return JSONResponse(body.model_dump(), headers=headers)

    # ---------------------------------------------------------------- chat
    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=errors)
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        srv.check_model(req.model)
        params = req.to_sampling_params(engine.config.routing)
        srv.check_capacity(1, "messages")
        prompt = await srv.offload(_work_size(raw), srv.prepare_chat, req, params.max_tokens)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = await srv.submit(request_id, [prompt], params, "messages")
        headers = {"x-request-id": request_id}
        if req.stream:
            gen = _chat_stream(srv, req, streams[0], request_id, created)
            return StreamingResponse(gen, media_type="text/event-stream", headers=headers)
        try:
            finals = await srv.collect(streams, raw)
        except _ClientGone:
            return Response(status_code=499)
        out = finals[0]
        tok_text = _TokenText(engine.tokenizer)
        num_top = req.top_logprobs or 0
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(c.logprobs, tok_text, num_top)
                if (req.logprobs and c.logprobs is not None)
                else None,
                "finish_reason": _finish_or_raise(srv, c.finish_reason),
                "stop_reason": c.stop_reason,
            }
            for c in out.outputs
        ]
        body = ChatCompletionResponse(
            id=request_id, created=created, model=srv.model_name, choices=choices, usage=_usage(finals)
        )
        return JSONResponse(body.model_dump(), headers=headers)

    return app


def _model_card(srv: _Server) -> ModelCard:
    return ModelCard(
        id=srv.model_name, created=srv.created, root=srv.engine.config.model.model_dir, max_model_len=srv.max_model_len
    )


def _finish_or_raise(srv: _Server, reason: str | None) -> str | None:
    try:
        return _public_finish_reason(reason)
    except RequestAbortedError as e:
        raise _engine_error(e, srv.settings.retry_after_s) from None


def _work_size(request: Request) -> int:
    """The size of the body behind a route's work (parsing, rendering, tokenising scale with it)."""
    return request.body_size if isinstance(request, _ParsedRequest) else _INLINE_BYTES


def _stream_error(e: Exception, srv: _Server) -> str:
    err = e if isinstance(e, ApiError) else _engine_error(e, srv.settings.retry_after_s)
    return _sse(err.body())


async def _completion_stream(
    srv: _Server,
    req: CompletionRequest,
    streams: list[RequestStream],
    request_id: str,
    created: int,
    echo_texts: list[str] | None,
    num_prompts: int,
) -> AsyncIterator[str]:
    n = req.n
    model = srv.model_name
    tok_text = _TokenText(srv.engine.tokenizer)
    offsets = [0] * (num_prompts * n)
    finals: list[RequestOutput | None] = [None] * num_prompts
    usage_null = {"usage": None} if req.include_usage else {}

    def chunk(choices: list[dict[str, Any]]) -> str:
        return _sse(
            {
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                **usage_null,
            }
        )

    try:
        if echo_texts:
            for i, t in enumerate(echo_texts):
                for j in range(n):
                    offsets[i * n + j] = len(t)
                    yield chunk([{"index": i * n + j, "text": t, "logprobs": None, "finish_reason": None}])
        ended: set[int] = set()  # choices that already sent their finish_reason (each finishes once)
        async for i, out in _merge(streams):
            if out.finished:
                finals[i] = out
            for c in out.outputs:
                idx = i * n + c.index
                if idx in ended:
                    continue
                finish = _public_finish_reason(c.finish_reason)
                if finish is not None:
                    ended.add(idx)
                lp = None
                if req.logprobs is not None and c.logprobs_delta:
                    lp, offsets[idx] = _completion_logprobs(c.logprobs_delta, tok_text, offsets[idx])
                if not c.text_delta and lp is None and finish is None:
                    continue
                choice: dict[str, Any] = {"index": idx, "text": c.text_delta, "logprobs": lp, "finish_reason": finish}
                if finish is not None:
                    choice["stop_reason"] = c.stop_reason
                yield chunk([choice])
        if req.include_usage:
            yield _sse(
                {
                    "id": request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage([f for f in finals if f is not None]),
                }
            )
        yield _SSE_DONE
    except Exception as e:  # the stream has begun: report in-band, then end it properly
        yield _stream_error(e, srv)
        yield _SSE_DONE
    finally:
        _abort_all(streams)


async def _chat_stream(
    srv: _Server, req: ChatCompletionRequest, stream: RequestStream, request_id: str, created: int
) -> AsyncIterator[str]:
    model = srv.model_name
    tok_text = _TokenText(srv.engine.tokenizer)
    num_top = req.top_logprobs or 0
    usage_null = {"usage": None} if req.include_usage else {}
    final: RequestOutput | None = None

    def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> str:
        return _sse(
            {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                **usage_null,
            }
        )

    try:
        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        ended: set[int] = set()  # choices that already sent their finish_reason (each finishes once)
        async for out in stream:
            if out.finished:
                final = out
            for c in out.outputs:
                if c.index in ended:
                    continue
                finish = _public_finish_reason(c.finish_reason)
                if finish is not None:
                    ended.add(c.index)
                lp = None
                if req.logprobs and c.logprobs_delta:
                    lp = _chat_logprobs(c.logprobs_delta, tok_text, num_top)
                if not c.text_delta and lp is None and finish is None:
                    continue
                delta = {"content": c.text_delta} if (c.text_delta or lp is not None) else {}
                yield chunk(c.index, delta, lp, finish)
        if req.include_usage:
            yield _sse(
                {
                    "id": request_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage([final] if final is not None else []),
                }
            )
        yield _SSE_DONE
    except Exception as e:  # the stream has begun: report in-band, then end it properly
        yield _stream_error(e, srv)
        yield _SSE_DONE
    finally:
        stream.abort()


# ------------------------------------------------------------------------------- run_server
def run_server(engine_config: EngineConfig, settings: ServerSettings | None = None) -> None:
    """Load the engine and serve it (`serve_engine`) until SIGINT/SIGTERM, or until the engine dies:
    then raise EngineDeadError, so that `dynserve serve` exits 1 and an orchestrator restarts it."""
    settings = settings or ServerSettings()
    level = getattr(logging, str(settings.log_level).upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.enable_expert_token_metrics and not engine_config.record_expert_token_counts:
        engine_config = replace(engine_config, record_expert_token_counts=True)
    if settings.served_model_name and not engine_config.served_model_name:
        engine_config = replace(engine_config, served_model_name=settings.served_model_name)
    engine = AsyncEngine.from_config(engine_config, max_queued_requests=settings.max_queued_requests)
    serve_engine(engine, settings)


def serve_engine(engine: AsyncEngine, settings: ServerSettings | None = None, *, hard_exit: bool = True) -> None:
    """Serve a running engine with uvicorn; stops the engine on the way out.

    SIGINT/SIGTERM: stop accepting, let in-flight requests finish for up to `settings.shutdown_timeout`
    seconds, then abort the rest (a stream ends with an SSE error event `request_aborted` and
    `data: [DONE]`, a JSON request gets a 503) and return.
    Engine death (an error that belongs to no request, or `engine.fail()`): stop accepting, give in-flight
    requests a moment to send their error, then raise EngineDeadError. With `hard_exit`, a graceful stop
    that has not ended the process `settings.engine_death_exit_timeout` seconds after the death (the
    engine thread stuck in a collective, a worker that will not stop) ends it with `os._exit(1)`.
    """
    settings = settings or ServerSettings()
    app = build_app(engine, settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=str(settings.log_level).lower(),
        # the engine aborts what is left at shutdown_timeout; the handlers then send their error events
        timeout_graceful_shutdown=settings.shutdown_timeout + _ABORT_GRACE_S,
        lifespan="on",
    )
    server = _UvicornServer(config, engine, settings, hard_exit=hard_exit)
    try:
        server.run()
    finally:
        if engine.is_healthy:
            engine.shutdown_sync(timeout=0.0)
    if server.engine_error is not None:
        raise EngineDeadError(f"the engine died: {server.engine_error!r}")


class _UvicornServer(uvicorn.Server):
    """uvicorn.Server that stops the engine with the server: the exit signal first makes the engine refuse
    new requests (503); at the shutdown deadline the engine aborts what still runs, before uvicorn would cut
    the connections; the engine's death stops the server (and, past a deadline, the process)."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, settings: ServerSettings, hard_exit: bool) -> None:
        super().__init__(config)
        self._engine = engine
        self._shutdown_timeout = settings.shutdown_timeout
        self._death_exit_timeout = settings.engine_death_exit_timeout if hard_exit else None
        self._exit_requested_at: float | None = None
        self.engine_error: BaseException | None = None
        engine.add_death_callback(self._on_engine_death)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._exit_requested_at is None:
            self._exit_requested_at = time.monotonic()
        self._engine.stop_accepting()
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals once it has shut down, which would make the process
        # die of SIGTERM; the shutdown is graceful, so `dynserve serve` exits 0 instead.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()

    def _on_engine_death(self, error: BaseException) -> None:
        """Runs on whichever thread saw the death (engine thread, a watchdog): only plain assignments and a
        timer thread here; uvicorn's loop notices `should_exit` within 0.1 s."""
        if self.engine_error is not None:
            return
        self.engine_error = error
        logger.critical("the engine died (%r): stopping the server; the process will exit with status 1", error)
        if self._death_exit_timeout is not None:
            threading.Thread(
                target=_exit_after, args=(self._death_exit_timeout,), name="dynserve-exit-deadline", daemon=True
            ).start()
        # in-flight requests got their EngineDeadError already; let their handlers send it, then cut
        grace = self.config.timeout_graceful_shutdown
        self.config.timeout_graceful_shutdown = _DEATH_GRACE_S if grace is None else min(grace, _DEATH_GRACE_S)
        self.should_exit = True

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        stop_engine = asyncio.ensure_future(self._stop_engine())
        try:
            await super().shutdown(sockets)
        finally:
            await stop_engine

    async def _stop_engine(self) -> None:
        """Let in-flight requests finish until the shutdown deadline, abort the rest (their handlers answer
        with an error while uvicorn still waits for them), then stop the engine thread."""
        if self.engine_error is not None:  # nothing to wait for; the thread may be stuck: do not wait long
            await self._engine.shutdown(timeout=0.0)
            return
        started = self._exit_requested_at if self._exit_requested_at is not None else time.monotonic()
        remaining = self._shutdown_timeout - (time.monotonic() - started)
        await self._engine.shutdown(timeout=max(0.0, remaining))


def _exit_after(seconds: float) -> None:
    time.sleep(seconds)
    logger.critical("the server did not stop within %.1f s of the engine's death: exiting now", seconds)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(1)
