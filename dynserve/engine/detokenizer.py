"""Incremental detokenization and stop-string detection for one sequence.

Per new token, only a short window of tokens is decoded (vLLM's prefix/read offsets), so the cost per
step does not grow with the length of the output. Text is released only when it is final: never while
it ends in an incomplete UTF-8 character, and never while its tail could still become a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from dynserve.sampling_params import may_stop
from dynserve.tokenizer import Tokenizer

# prompt tokens decoded as left context of the first output token (a leading space after the prompt
# survives decoders that strip it at the start of a text, e.g. SentencePiece's Metaspace)
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Owns the output text of one sequence: decoding, hold-back, and stop strings.

    Feed tokens with `update`. `output_text` is the text released so far; `get_delta()` returns what
    was released since its previous call. Text is held back while
      - the decoded window ends in U+FFFD (a multi-byte character split across tokens is incomplete),
      - its tail is a proper prefix of a stop string (at most len(longest stop) - 1 characters; nothing
        is held for stop strings when `include_stop_str_in_output`, the output is the same either way).
    A stop string is found anywhere in the new text, also across token boundaries. On a hit, the text
    is cut before the stop string (or after it with `include_stop_str_in_output`), `stop_string_hit`
    records which one, and later updates are ignored. When several stop strings occur, the one that
    starts first wins. Stop strings count only once more than `min_tokens` tokens were produced (vLLM).

    `finish()` ends the sequence for any other reason (EOS, stop token, length): it releases the held
    text, including an incomplete trailing character as U+FFFD. It may be called more than once.

    Without a stop string, the concatenated deltas equal the text the output tokens add after the
    prompt: `tokenizer.decode(output_token_ids)` for byte-level BPE; for decoders that drop a leading
    space at the start of a text (SentencePiece's Metaspace) the space after the prompt is kept, as in
    vLLM, because the last prompt tokens are decoded as left context.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] | None = None,
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self._decode = tokenizer.backend.decode  # hot path: the Rust decoder, no Python wrapper
        self.skip_special_tokens = skip_special_tokens
        self.stop: list[str] = [s for s in (stop or []) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.min_tokens = min_tokens
        self.max_stop_len = max((len(s) for s in self.stop), default=0)

        ctx = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._tokens: list[int] = ctx  # context tokens + output tokens not yet out of the window
        self._prefix_offset = 0  # window start: decoded only as left context
        self._read_offset = len(ctx)  # tokens before this are already turned into text
        self._prefix_text = self._decode_window(0, len(ctx))
        self.num_output_tokens = 0

        self.output_text = ""  # released text
        self._pending = ""  # decoded but held back (could start a stop string)
        self._delta_start = 0  # get_delta(): start of the not-yet-returned part of output_text
        self.stop_string_hit: str | None = None
        self.finished = False

    def _decode_window(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._decode(self._tokens[start:end], skip_special_tokens=self.skip_special_tokens)

    @property
    def stopped(self) -> bool:
        """True once a stop string was hit or `finish()` was called: further tokens are ignored."""
        return self.finished or self.stop_string_hit is not None

    def update(self, new_token_ids: Sequence[int]) -> str | None:
        """Feed the sequence's new output tokens; return the stop string hit, or None."""
        if self.stopped:
            return self.stop_string_hit
        self.num_output_tokens += len(new_token_ids)
        self._tokens.extend(new_token_ids)
        new_text = self._decode_window(self._prefix_offset, len(self._tokens))
        if new_text.endswith(_REPLACEMENT_CHAR) or len(new_text) <= len(self._prefix_text):
            return None  # an incomplete character, or nothing visible yet (e.g. a skipped special token)
        delta = new_text[len(self._prefix_text) :]
        # slide the window: the tokens just turned into text become the next left context
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        self._prefix_text = self._decode_window(self._prefix_offset, self._read_offset)
        if self._prefix_offset > 64:  # forget tokens that fell out of the window
            del self._tokens[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        self._append(delta)
        return self.stop_string_hit

    def _append(self, delta: str) -> None:
        text = self._pending + delta
        if self.stop and may_stop(self.num_output_tokens, self.min_tokens):
            # With include_stop_str_in_output nothing is held back, so a stop string may begin in text
            # already released: search from there too, but only for stop strings ending in new text.
            tail = ""
            if self.include_stop_str_in_output and self.max_stop_len > 1:
                tail = self.output_text[-(self.max_stop_len - 1) :]
            window = tail + text
            hit_at, hit = -1, None
            for s in self.stop:
                i = window.find(s, max(0, len(tail) - len(s) + 1))
                if i != -1 and (hit_at == -1 or i < hit_at):
                    hit_at, hit = i, s
            if hit is not None:
                end = hit_at + len(hit) if self.include_stop_str_in_output else hit_at
                self.output_text += window[len(tail) : end]
                self._pending = ""
                self.stop_string_hit = hit
                return
        hold = 0 if self.include_stop_str_in_output else self._held_suffix_len(text)
        self.output_text += text[: len(text) - hold]
        self._pending = text[len(text) - hold :]

    def _held_suffix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def get_delta(self) -> str:
        """Text released since the previous call."""
        delta = self.output_text[self._delta_start :]
        self._delta_start = len(self.output_text)
        return delta

    def finish(self) -> str:
        """The sequence ended for a reason other than a stop string: release everything held back.
        Returns the text this call released (it is also part of the next `get_delta()`)."""
        if self.stopped:
            return ""
        self.finished = True
        before = len(self.output_text)
        tail = ""
        if self._read_offset < len(self._tokens):  # undecoded tokens: an incomplete trailing character
            full = self._decode_window(self._prefix_offset, len(self._tokens))
            tail = full[len(self._prefix_text) :]
        text = self._pending + tail
        self._pending = ""
        self.output_text += text
        return self.output_text[before:]
