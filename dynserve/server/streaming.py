"""Engine outputs to the wire: SSE framing, merged streams of several prompts, the completions and chat
streams (errors in-band, then [DONE]), usage bodies, and the finish-reason rule."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from fastapi import Request

from dynserve.engine import (
    ExpertUsage,
    RequestAbortedError,
    RequestOutput,
    RequestStream,
)
from dynserve.server.errors import ApiError, engine_error
from dynserve.server.logprobs import TokenText, chat_logprobs, completion_logprobs, echo_logprobs
from dynserve.server.protocol import ChatCompletionRequest, CompletionRequest
from dynserve.server.responses import UsageInfo
from dynserve.server.routed_experts import RoutedStreamer

if TYPE_CHECKING:
    from dynserve.server.state import ServerState


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage_body(finals: list[RequestOutput]) -> dict[str, Any]:
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    expert = ExpertUsage.merge([o.expert_usage for o in finals]) if finals else ExpertUsage()
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        expert_activations=expert.expert_activations,
        avg_experts_per_token=expert.avg_experts_per_token,
        expert_budget_min=expert.expert_budget_min,
        prompt_tokens_details={"cached_tokens": sum(o.num_cached_tokens for o in finals)},
    ).model_dump()


def public_finish_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    if reason == "abort":
        raise RequestAbortedError("the request was aborted by the server")
    return reason if reason in ("stop", "length") else "stop"


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
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


async def wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    pass


def abort_all(streams: list[RequestStream]) -> None:
    for s in streams:
        s.abort()


def finish_or_raise(srv: ServerState, reason: str | None) -> str | None:
    try:
        return public_finish_reason(reason)
    except RequestAbortedError as e:
        raise engine_error(e, srv.settings.retry_after_s) from None


def stream_error(e: Exception, srv: ServerState) -> str:
    err = e if isinstance(e, ApiError) else engine_error(e, srv.settings.retry_after_s)
    return sse(err.body())


async def completion_stream(
    srv: ServerState,
    req: CompletionRequest,
    streams: list[RequestStream],
    request_id: str,
    created: int,
    echo_texts: list[str] | None,
    num_prompts: int,
) -> AsyncIterator[str]:
    n = req.n
    model = srv.model_name
    tok_text = TokenText(srv.engine.tokenizer)
    offsets = [0] * (num_prompts * n)
    finals: list[RequestOutput | None] = [None] * num_prompts
    usage_null = {"usage": None} if req.include_usage else {}

    def chunk(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
        return sse(
            {
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                **usage_null,
                **(extra or {}),
            }
        )

    def echo_chunks(i: int, out: RequestOutput | None) -> Iterator[str]:
        assert echo_texts is not None
        lp = None
        if out is not None and out.prompt_logprobs is not None:
            lp = echo_logprobs(out.prompt_token_ids, out.prompt_logprobs, tok_text)[0]
        for j in range(n):
            offsets[i * n + j] = len(echo_texts[i])
            yield chunk([{"index": i * n + j, "text": echo_texts[i], "logprobs": lp, "finish_reason": None}])

    # with logprobs the echo waits for the prompt's logprobs, which come with the prompt's first output
    echo_later = bool(echo_texts) and req.logprobs is not None
    try:
        if echo_texts and not echo_later:
            for i in range(len(echo_texts)):
                for text in echo_chunks(i, None):
                    yield text
        echoed: set[int] = set()
        ended: set[int] = set()  # choices that already sent their finish_reason (each finishes once)
        ids_started: set[int] = set()  # choices that sent their prompt_token_ids (return_token_ids)
        routed = RoutedStreamer(req.return_routed_experts, req.routed_experts_format)
        async for i, out in merge_streams(streams):
            if echo_later and i not in echoed:
                echoed.add(i)
                for text in echo_chunks(i, out):
                    yield text
            if out.finished:
                finals[i] = out
            for c in out.outputs:
                idx = i * n + c.index
                if idx in ended:
                    continue
                finish = public_finish_reason(c.finish_reason)
                if finish is not None:
                    ended.add(idx)
                lp = None
                if req.logprobs is not None and c.logprobs_delta:
                    lp, offsets[idx] = completion_logprobs(c.logprobs_delta, tok_text, offsets[idx])
                rows, top = routed.rows(c), routed.prompt(i, out)
                new_ids = c.token_ids_delta if req.return_token_ids else None
                if not c.text_delta and lp is None and finish is None and rows is None and not top and not new_ids:
                    continue
                choice: dict[str, Any] = {"index": idx, "text": c.text_delta, "logprobs": lp, "finish_reason": finish}
                if finish is not None:
                    choice["stop_reason"] = c.stop_reason
                if req.return_token_ids:
                    if idx not in ids_started:  # the prompt's ids once per choice, with its first chunk
                        ids_started.add(idx)
                        choice["prompt_token_ids"] = list(out.prompt_token_ids)
                    choice["token_ids"] = list(c.token_ids_delta)
                routed.add(choice, rows)
                yield chunk([choice], top)
        if req.include_usage:
            yield sse(
                {
                    "id": request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage_body([f for f in finals if f is not None]),
                }
            )
        yield SSE_DONE
    except Exception as e:  # the stream has begun: report in-band, then end it properly
        yield stream_error(e, srv)
        yield SSE_DONE
    finally:
        abort_all(streams)


async def chat_stream(
    srv: ServerState, req: ChatCompletionRequest, stream: RequestStream, request_id: str, created: int
) -> AsyncIterator[str]:
    model = srv.model_name
    tok_text = TokenText(srv.engine.tokenizer)
    num_top = req.top_logprobs or 0
    usage_null = {"usage": None} if req.include_usage else {}
    final: RequestOutput | None = None

    def chunk(
        index: int,
        delta: dict[str, Any],
        logprobs: Any = None,
        finish: str | None = None,
        extra: dict[str, Any] | None = None,
        choice_extra: dict[str, Any] | None = None,
    ) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish, **(choice_extra or {})}
        return sse(
            {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
                **usage_null,
                **(extra or {}),
            }
        )

    try:
        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        ended: set[int] = set()  # choices that already sent their finish_reason (each finishes once)
        ids_started: set[int] = set()  # choices that sent their prompt_token_ids (return_token_ids)
        routed = RoutedStreamer(req.return_routed_experts, req.routed_experts_format)
        async for out in stream:
            if out.finished:
                final = out
            for c in out.outputs:
                if c.index in ended:
                    continue
                finish = public_finish_reason(c.finish_reason)
                if finish is not None:
                    ended.add(c.index)
                lp = None
                if req.logprobs and c.logprobs_delta:
                    lp = chat_logprobs(c.logprobs_delta, tok_text, num_top)
                rows, top = routed.rows(c), routed.prompt(0, out)
                new_ids = c.token_ids_delta if req.return_token_ids else None
                if not c.text_delta and lp is None and finish is None and rows is None and not top and not new_ids:
                    continue
                delta = {"content": c.text_delta} if (c.text_delta or lp is not None) else {}
                extra: dict[str, Any] = {}
                if req.return_token_ids:
                    if c.index not in ids_started:  # the prompt's ids once per choice, with its first chunk
                        ids_started.add(c.index)
                        extra["prompt_token_ids"] = list(out.prompt_token_ids)
                    extra["token_ids"] = list(c.token_ids_delta)
                routed.add(extra, rows)
                yield chunk(c.index, delta, lp, finish, top, extra)
        if req.include_usage:
            yield sse(
                {
                    "id": request_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage_body([final] if final is not None else []),
                }
            )
        yield SSE_DONE
    except Exception as e:  # the stream has begun: report in-band, then end it properly
        yield stream_error(e, srv)
        yield SSE_DONE
    finally:
        stream.abort()
