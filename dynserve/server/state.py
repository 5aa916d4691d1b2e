"""ServerState: what the routes share (engine, settings, metrics, model name) and the work that scales
with a request's size (prompt checks, chat templates, tokenising), done in worker threads."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request

from dynserve.engine import (
    AsyncEngine,
    ContextLengthError,
    RequestOutput,
    RequestStream,
    resolve_max_tokens,
)
from dynserve.sampling_params import SamplingParams
from dynserve.server.errors import ApiError, engine_error
from dynserve.server.metrics import ServerMetrics
from dynserve.server.protocol import ChatCompletionRequest, TokenizeRequest, conversation
from dynserve.server.responses import DetokenizeResponse, TokenizeResponse
from dynserve.server.settings import INLINE_BYTES, ServerSettings
from dynserve.server.streaming import (
    ClientGone,
    abort_all,
    merge_streams,
    wait_disconnect,
)

_T = TypeVar("_T")


@dataclass
class Prompt:
    """One prompt ready for the engine: token ids (the engine never tokenises), the text when there is one
    (the engine reports it back), and the text to echo."""

    text: str | None
    token_ids: list[int]
    echo: str = ""


class ServerState:
    """The state behind the routes: engine, settings, metrics, model name, and the worker threads that
    parse large bodies, render chat templates and tokenise."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        cfg = engine.config
        self.model_name = settings.served_model_name or cfg.model_name
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
        if size < INLINE_BYTES:
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
            raise engine_error(e, self.settings.retry_after_s, param) from None

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
        """The engine's own context rule, checked here so that the engine thread never receives a prompt
        longer than the context."""
        try:
            resolve_max_tokens(num_tokens, max_tokens, self.max_model_len)
        except ContextLengthError as e:
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except ApiError:
            raise
        except Exception as e:
            raise ApiError(400, f"could not tokenize the {param}: {e}", param=param) from None

    def prepare_prompts(
        self, prompts: list[tuple[str | None, list[int] | None]], max_tokens: int | None, echo: bool
    ) -> list[Prompt]:
        out = []
        for text, ids in prompts:
            if ids is None:
                assert text is not None
                self.check_text_length(text, "prompt")
                ids = self.encode(text, "prompt")
            self.check_context(len(ids), max_tokens, "prompt")
            echo_text = (text if text is not None else self.decode(ids)) if echo else ""
            out.append(Prompt(text, ids, echo_text))
        return out

    def prepare_chat(self, req: ChatCompletionRequest, max_tokens: int | None) -> Prompt:
        text = self.render_chat(req.messages, req.add_generation_prompt)
        self.check_text_length(text, "messages")
        ids = self.encode(text, "messages", add_special_tokens=False)
        self.check_context(len(ids), max_tokens, "messages")
        return Prompt(text, ids)

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
        prompts: list[Prompt],
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
                raise engine_error(e, self.settings.retry_after_s, prompt_param) from None
            raise
        return streams

    async def collect(self, streams: list[RequestStream], request: Request) -> list[RequestOutput]:
        """Wait for every stream's final output; abort them all if the client disconnects."""
        finals: list[RequestOutput | None] = [None] * len(streams)

        async def consume() -> None:
            async for i, out in merge_streams(streams):
                finals[i] = out

        task = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the handler itself was cancelled
            task.cancel()
            watcher.cancel()
            abort_all(streams)
            raise
        watcher.cancel()
        if task not in done:
            task.cancel()
            abort_all(streams)
            raise ClientGone()
        exc = task.exception()
        if exc is not None:
            abort_all(streams)
            raise engine_error(exc, self.settings.retry_after_s)
        return [f for f in finals if f is not None]
