"""The OpenAI-compatible HTTP server: FastAPI app over an AsyncEngine, and `run_server` (uvicorn).

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (JSON or SSE),
GET /health, GET /version, POST /tokenize, POST /detokenize, GET /metrics, and the expert-distribution
recorder (POST /expert_distribution/start, POST /expert_distribution/stop, GET /expert_distribution/dump).
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
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

import dynserve
from dynserve.config import DEMO_MODEL_NAME, default_served_model_name
from dynserve.engine import (
    AsyncEngine,
)
from dynserve.server.errors import ApiError, install_error_handlers
from dynserve.server.logprobs import TokenText, chat_logprobs, completion_logprobs, echo_logprobs, join_logprobs
from dynserve.server.middleware import PROBE_PATHS, ApiKeyMiddleware, BodyLimitMiddleware, JSONBodyRoute, ParsedRequest
from dynserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from dynserve.server.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
)
from dynserve.server.routed_experts import add_routed_experts
from dynserve.server.settings import INLINE_BYTES, ServerSettings
from dynserve.server.state import ServerState
from dynserve.server.streaming import (
    ClientGone,
    chat_stream,
    completion_stream,
    finish_or_raise,
    usage_body,
)

logger = logging.getLogger("dynserve.server")


def build_app(engine: AsyncEngine, settings: ServerSettings | None = None, *, owns_engine: bool = False) -> FastAPI:
    """The FastAPI app serving `engine`. With owns_engine, app shutdown also shuts the engine
    down (what the Ray Serve replicas do; `serve_engine` stops the engine itself)."""
    settings = settings or ServerSettings()
    if settings.max_queued_requests is not None:
        engine.max_queued_requests = settings.max_queued_requests
    srv = ServerState(engine, settings)

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
    app.router.route_class = JSONBodyRoute  # every route below parses its JSON body with pydantic
    app.state.server = srv
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    if settings.api_key:  # added last: the outermost layer, so a request without the key is never read
        open_paths = list(PROBE_PATHS)
        if settings.public_docs:
            docs = (app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url)
            open_paths += [d for d in docs if d]
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key, open_paths=open_paths)

    install_error_handlers(app)

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

    # ---------------------------------------------------------------- expert distribution recorder
    @app.post("/expert_distribution/start")
    async def expert_distribution_start() -> dict[str, Any]:
        engine.start_expert_distribution()
        return {"recording": True}

    @app.post("/expert_distribution/stop")
    async def expert_distribution_stop() -> dict[str, Any]:
        engine.stop_expert_distribution()
        return {"recording": False}

    @app.get("/expert_distribution/dump")
    async def expert_distribution_dump(per_request: bool = False) -> Response:
        body = await asyncio.to_thread(engine.dump_expert_distribution, per_request)
        return JSONResponse(body)

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
            gen = completion_stream(srv, req, streams, request_id, created, echo_texts, len(prompts))
            return StreamingResponse(gen, media_type="text/event-stream", headers=headers)
        try:
            finals = await srv.collect(streams, raw)
        except ClientGone:
            return Response(status_code=499)
        choices = []
        tok_text = TokenText(engine.tokenizer)
        for i, out in enumerate(finals):
            for c in out.outputs:
                prefix = echo_texts[i] if echo_texts else ""
                lp = None
                if c.logprobs is not None and req.logprobs is not None:
                    lp, _ = completion_logprobs(c.logprobs, tok_text, len(prefix))
                if req.echo and out.prompt_logprobs is not None:  # echo + logprobs: the prompt's first
                    lp = join_logprobs(echo_logprobs(out.prompt_token_ids, out.prompt_logprobs, tok_text)[0], lp)
                choices.append(
                    {
                        "index": i * req.n + c.index,
                        "text": prefix + c.text,
                        "logprobs": lp,
                        "finish_reason": finish_or_raise(srv, c.finish_reason),
                        "stop_reason": c.stop_reason,
                    }
                )
        body = CompletionResponse(
            id=request_id, created=created, model=srv.model_name, choices=choices, usage=usage_body(finals)
        ).model_dump()
        if req.return_token_ids:
            ids = [(out.prompt_token_ids, c.token_ids) for out in finals for c in out.outputs]
            for choice, (prompt_ids, token_ids) in zip(body["choices"], ids, strict=True):
                choice["prompt_token_ids"], choice["token_ids"] = list(prompt_ids), list(token_ids)
        if req.return_routed_experts:
            add_routed_experts(body, finals, req.n, req.routed_experts_format)
        return JSONResponse(body, headers=headers)

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
            gen = chat_stream(srv, req, streams[0], request_id, created)
            return StreamingResponse(gen, media_type="text/event-stream", headers=headers)
        try:
            finals = await srv.collect(streams, raw)
        except ClientGone:
            return Response(status_code=499)
        out = finals[0]
        tok_text = TokenText(engine.tokenizer)
        num_top = req.top_logprobs or 0
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c.logprobs, tok_text, num_top)
                if (req.logprobs and c.logprobs is not None)
                else None,
                "finish_reason": finish_or_raise(srv, c.finish_reason),
                "stop_reason": c.stop_reason,
            }
            for c in out.outputs
        ]
        body = ChatCompletionResponse(
            id=request_id, created=created, model=srv.model_name, choices=choices, usage=usage_body(finals)
        ).model_dump()
        if req.return_token_ids:
            for choice, c in zip(body["choices"], out.outputs, strict=True):
                choice["prompt_token_ids"], choice["token_ids"] = list(out.prompt_token_ids), list(c.token_ids)
        if req.return_routed_experts:
            add_routed_experts(body, finals, req.n, req.routed_experts_format)
        return JSONResponse(body, headers=headers)

    return app


def _model_card(srv: ServerState) -> ModelCard:
    model_dir = srv.engine.config.model.model_dir
    root = DEMO_MODEL_NAME if default_served_model_name(model_dir) == DEMO_MODEL_NAME else model_dir
    return ModelCard(id=srv.model_name, created=srv.created, root=root, max_model_len=srv.max_model_len)


def _work_size(request: Request) -> int:
    """The size of the body behind a route's work (parsing, rendering, tokenising scale with it)."""
    return request.body_size if isinstance(request, ParsedRequest) else INLINE_BYTES


__all__ = ["ApiError", "ServerSettings", "build_app"]
