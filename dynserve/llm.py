"""LLM: the offline Python API. `LLM(model_dir, **engine_options).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from typing import Any

from dynserve.config import EngineConfig
from dynserve.engine import EngineStats, LLMEngine, RequestOutput
from dynserve.sampling_params import SamplingParams


class LLM:
    """Offline batch generation over one engine. Options are EngineConfig.create's keywords
    (dtype, device, seed, max_model_len, block_size, num_kv_blocks, max_num_seqs,
    max_num_batched_tokens, enable_prefix_caching, enable_chunked_prefill, routing, ...).
    With no model_dir, the embedded default model is served."""

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        self.engine = LLMEngine(EngineConfig.create(model, **engine_options))
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        """Build from a ready EngineConfig (what the CLI does)."""
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config)
        llm._ids = itertools.count()
        return llm

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Seq[PromptInput] | None = None,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        prompt_token_ids: Seq[Seq[int]] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns outputs in prompt order. Prompts as vLLM takes them: a
        string, `{"prompt": str}`, `{"prompt_token_ids": [int, ...]}`, a list of token ids, or a list
        mixing these; or token id lists through `prompt_token_ids=`. `sampling_params` may be one for
        all prompts or one per prompt (each may carry its own routing override, so one call can mix
        routing policies)."""
        items = _prompt_items(prompts, prompt_token_ids)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(items) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        )
        if len(params) != len(items):
            raise ValueError(f"got {len(params)} sampling params for {len(items)} prompts")
        ids = []
        try:
            for (text, toks), sp in zip(items, params, strict=True):
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(rid, text, sp, prompt_token_ids=toks)
                ids.append(rid)
            done: dict[str, RequestOutput] = {}
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:
            self.engine.abort_request(ids)
            raise
        outs = [done[r] for r in ids]
        if self.engine.tokenizer is not None:
            for out in outs:
                _decode_logprobs(out, self.engine.tokenizer)
        return outs

    def chat(
        self,
        messages: Conversation | Seq[Conversation],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template, then generate; returns one output per conversation. As in
        vLLM, `messages` is one conversation (a list of message dicts, `{"role": ..., "content": ...}`,
        content a string or a list of `{"type": "text", "text": ...}` parts) or a list of conversations;
        `sampling_params` is one for all or one per conversation. Anything else is a TypeError."""
        convs = _conversations(messages)
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer")
        ids = [tok.encode(tok.apply_chat_template(c, add_generation_prompt), add_special_tokens=False) for c in convs]
        return self.generate(prompt_token_ids=ids, sampling_params=sampling_params)

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()

    def close(self) -> None:
        """Stop the engine's worker processes (expert parallelism); also done at interpreter exit."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


PromptInput = str | Mapping[str, Any] | Seq[int]
_FORMS = 'a string, {"prompt": str}, {"prompt_token_ids": [int, ...]}, a list of token ids, or a list of these'


def _prompt_items(prompts: Any, prompt_token_ids: Seq[Seq[int]] | None) -> list[tuple[str | None, list[int] | None]]:
    """(text, token ids) per prompt from vLLM's prompt forms; TypeError naming them for anything else."""
    if prompt_token_ids is not None:
        if prompts is not None:
            raise TypeError("pass prompts or prompt_token_ids=, not both")
        return [_one_prompt({"prompt_token_ids": p}) for p in prompt_token_ids]
    if prompts is None:
        return []
    if isinstance(prompts, str | Mapping) or _is_ids(prompts):
        return [_one_prompt(prompts)]
    if isinstance(prompts, Seq):
        return [_one_prompt(p) for p in prompts]
    raise TypeError(f"prompts must be {_FORMS}; got {type(prompts).__name__}")


def _is_ids(x: Any) -> bool:
    return isinstance(x, Seq) and not isinstance(x, str) and bool(x) and all(_is_int(t) for t in x)


def _is_int(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _one_prompt(p: Any) -> tuple[str | None, list[int] | None]:
    if isinstance(p, str):
        return p, None
    if _is_ids(p):
        return None, list(p)
    if isinstance(p, Mapping):
        unknown = set(p) - {"prompt", "prompt_token_ids"}
        if unknown:
            raise TypeError(f"unknown prompt field(s) {sorted(unknown)}: a prompt is {_FORMS}")
        if "prompt_token_ids" in p:
            ids = p["prompt_token_ids"]
            if not (_is_ids(ids) or (isinstance(ids, Seq) and not isinstance(ids, str) and not ids)):
                raise TypeError(f"prompt_token_ids must be a list of integers, got {ids!r:.80}")
            text = p.get("prompt")
            return (text if isinstance(text, str) else None), list(ids)
        if isinstance(p.get("prompt"), str):
            return p["prompt"], None
    raise TypeError(f"each prompt must be {_FORMS}; got {p!r:.80}")


Conversation = Seq[Mapping[str, Any]]
_CHAT_FORMS = (
    'one conversation (a list of message dicts such as {"role": "user", "content": str}) or a list of conversations'
)


def _conversations(messages: Any) -> list[list[dict[str, Any]]]:
    """The conversations in `messages` (one, or a list of them), each a list of plain message dicts."""
    if isinstance(messages, str | Mapping) or not isinstance(messages, Seq):
        raise TypeError(f"messages must be {_CHAT_FORMS}; got {type(messages).__name__}")
    if messages and all(isinstance(m, Seq) and not isinstance(m, str) for m in messages):
        return [_conversation(c, f"messages[{i}]") for i, c in enumerate(messages)]
    return [_conversation(messages, "messages")]


def _conversation(conv: Seq[Any], where: str) -> list[dict[str, Any]]:
    if not conv:
        raise ValueError(f"{where} is an empty conversation")
    out = []
    for i, m in enumerate(conv):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise TypeError(f"{where}[{i}] is not a message dict with a 'role': messages must be {_CHAT_FORMS}")
        out.append({**m, "content": _content_text(m.get("content"), f"{where}[{i}].content")})
    return out


def _content_text(content: Any, where: str) -> str:
    """The message's text as the server renders it: a string, text parts joined with newlines, "" for None."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Seq) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "\n".join(p["text"] for p in content)
    raise TypeError(f'{where} must be a string or a list of {{"type": "text", "text": str}} parts; got {content!r:.80}')


def _decode_logprobs(out: RequestOutput, tokenizer) -> None:  # noqa: ANN001
    """Fill `Logprob.decoded` (vLLM's `decoded_token`) with each alternative's text, for the
    Python API (the server renders token text itself)."""
    positions = [lp for c in out.outputs for lp in (c.logprobs or [])] + [lp for lp in out.prompt_logprobs or [] if lp]
    cache: dict[int, str] = {}
    for pos in positions:
        for alt in pos.top:
            if alt.token_id not in cache:
                cache[alt.token_id] = tokenizer.decode([alt.token_id], skip_special_tokens=False)
            alt.decoded = cache[alt.token_id]
