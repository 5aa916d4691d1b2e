"""Logprobs in OpenAI's two wire formats (completions and chat), with each token's text and bytes:
byte-level BPE pieces that are only part of a UTF-8 character are shown as `bytes:\\xNN`."""

from __future__ import annotations

import contextlib
from typing import Any

from dynserve.engine import TokenLogprobs

LOGPROB_FLOOR = -9999.0  # JSON has no -inf


def _finite(x: float) -> float:
    return x if x == x and x > LOGPROB_FLOOR else LOGPROB_FLOOR


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


class TokenText:
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


def completion_logprobs(lps: list[TokenLogprobs], text: TokenText, offset: int) -> tuple[dict[str, Any], int]:
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


def echo_logprobs(
    prompt_token_ids: list[int], prompt_lps: list[TokenLogprobs | None], text: TokenText
) -> tuple[dict[str, Any], int]:
    """Completions logprobs of an echoed prompt (OpenAI's and vLLM's shape): the first token has
    `null` logprob and top_logprobs, every other prompt token its own; returns the end offset."""
    first, rest = prompt_token_ids[0], [lp for lp in prompt_lps[1:] if lp is not None]
    tok, raw = text(first)
    body, offset = completion_logprobs(rest, text, len(raw.decode("utf-8", errors="replace")) if raw else len(tok))
    body["text_offset"].insert(0, 0)
    body["token_logprobs"].insert(0, None)
    body["tokens"].insert(0, tok)
    body["top_logprobs"].insert(0, None)
    return body, offset


def join_logprobs(a: dict[str, Any], b: dict[str, Any] | None) -> dict[str, Any]:
    """Completions logprobs `a` followed by `b` (each list concatenated)."""
    return a if b is None else {k: a[k] + b[k] for k in a}


def chat_logprobs(lps: list[TokenLogprobs], text: TokenText, num_top: int) -> dict[str, Any]:
    content = []
    for lp in lps:
        tok, raw = text(lp.token_id)
        tops = []
        for t in lp.top[:num_top]:
            s, b = text(t.token_id)
            tops.append({"token": s, "logprob": _finite(t.logprob), "bytes": list(b)})
        content.append({"token": tok, "logprob": _finite(lp.logprob), "bytes": list(raw), "top_logprobs": tops})
    return {"content": content}
