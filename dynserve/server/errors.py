"""Errors as OpenAI writes them: `ApiError` (status + {"error": {message, type, param, code}}), the
mapping from engine exceptions and validation errors to it, and the app's exception handlers."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dynserve.engine import (
    EngineDeadError,
    EngineStoppedError,
    QueueFullError,
    RequestAbortedError,
    RequestFailedError,
)
from dynserve.server.protocol import InvalidRequestError

logger = logging.getLogger("dynserve.server")


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


def engine_error(e: BaseException, retry_after: int, prompt_param: str = "prompt") -> ApiError:
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
        if msg.startswith("routing."):  # RoutingConfig.check_model: the field it names
            return ApiError(400, msg, param=msg.split(" ", 1)[0].rstrip(":"))
        return ApiError(400, msg, param=prompt_param if "prompt" in msg else None)
    logger.exception("internal error", exc_info=e)
    return ApiError(500, f"internal server error: {type(e).__name__}", "server_error")


# pydantic names the member of a union that failed in the location ("constrained-float",
# "list[constrained-float]"): not a field, so not part of the param
_UNION_TAG = re.compile(r"[a-z]+(-[a-z]+)+(\[.*\])?|[a-z]+\[.*\]")


def _loc_to_param(loc: Iterable[Any]) -> str | None:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, str) and _UNION_TAG.fullmatch(item):
            continue
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
            else:
                parts.append(f"[{item}]")
        else:
            parts.append(str(item))
    return ".".join(parts) or None


def validation_error(errors: list[Any]) -> ApiError:
    """The 400 for pydantic / FastAPI validation errors (FastAPI's locations start with "body")."""
    if not errors:
        return ApiError(400, "invalid request")
    # a value that fails every member of a union (a number or a list of numbers) reports each; the
    # member of the value's own type says what is wrong ("p[1]: less than or equal to 1", not "not a number")
    errors = sorted(errors, key=lambda e: str(e.get("type", "")).endswith("_type"))
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


HTTP_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
}


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app raises leaves as OpenAI's error body: ApiError as it is, validation errors as
    400 naming the field, Starlette's HTTP errors with their status, anything else as a 500."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(InvalidRequestError)
    async def _invalid_params(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return ApiError(400, exc.message, param=exc.param, code=exc.code).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        type_ = HTTP_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return ApiError(status, detail, type_, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return ApiError(500, f"internal server error: {type(exc).__name__}", "server_error").response()
