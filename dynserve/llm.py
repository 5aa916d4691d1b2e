"""LLM: the offline Python API. `LLM(model_dir, **engine_options).generate(prompts, params)`."""

from __future__ import annotations

import itertools
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
        prompts: str | Seq[str] | Seq[Seq[int]] | None = None,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        prompt_token_ids: Seq[Seq[int]] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, or token id lists); returns outputs in prompt order.
        `sampling_params` may be one for all prompts or one per prompt (each may carry its own
        routing override, so one call can mix routing policies)."""
        items: list[tuple[str | None, list[int] | None]] = []
        if prompt_token_ids is not None:
            items = [(None, list(p)) for p in prompt_token_ids]
        elif isinstance(prompts, str):
            items = [(prompts, None)]
        elif prompts is not None:
            for p in prompts:
                items.append((p, None) if isinstance(p, str) else (None, list(p)))
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
        return [done[r] for r in ids]

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
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
