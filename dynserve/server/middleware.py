"""What happens to a request before its handler: the API key (every route but the probes), the body
limit (413 before parsing), and JSON bodies parsed and validated by pydantic in one pass, in the worker
threads when large (a lone surrogate anywhere is a 400)."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, get_type_hints

from fastapi import Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dynserve.server.errors import ApiError, validation_error

if TYPE_CHECKING:
    from dynserve.server.state import ServerState


PROBE_PATHS = ("/health", "/metrics", "/version")


def _route_path(scope: Scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on every route except `open_paths` (probes, scrapers and,
    with --public-docs, the API docs): a route added later is guarded without anyone remembering to.
    Pure ASGI, so streaming responses pass through untouched."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Iterable[str] = PROBE_PATHS) -> None:
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
class JSONBodyRoute(APIRoute):
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
                    srv: ServerState = request.app.state.server
                    try:
                        parsed = await srv.offload(len(body), model.model_validate_json, body)
                    except ValidationError as e:
                        return validation_error(e.errors(include_url=False)).response()
                    request = ParsedRequest(request, body, parsed)
            return await handler(request)

        return parse_then_handle


class ParsedRequest(Request):
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
