"""Tokenizer: a Hugging Face model directory's tokenizer, without `transformers` at runtime.

Reads `tokenizer.json` with the `tokenizers` library and `tokenizer_config.json` for the named special
tokens, `add_bos_token` / `add_eos_token` and the chat template (also `chat_template.jinja`,
`chat_template.json` and `additional_chat_templates/*.jinja`). Chat templates are rendered in a jinja2
sandbox set up the way `transformers` sets it up, so prompts match what `AutoTokenizer` produces.
Long texts are encoded (and long id lists decoded) with the GIL released, and `min_num_tokens` bounds
a text's token count from its byte length without tokenising it (for the server's early 400s).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _HFTokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# Above this many characters / ids, encode and decode go through the tokenizers batch API, which releases
# the GIL while it works (the single-text calls hold it: an 8 MB text is seconds of a frozen interpreter).
_RELEASE_GIL_ABOVE = 2048

_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _token_content(tok: Any) -> str | None:
    """A special token from tokenizer_config.json: a plain string or an AddedToken-style dict."""
    if tok is None:
        return None
    if isinstance(tok, str):
        return tok
    if isinstance(tok, Mapping):
        content = tok.get("content")
        return content if isinstance(content, str) else None
    return str(tok)


def _added_token(tok: Any, special: bool = True) -> AddedToken:
    if isinstance(tok, Mapping):
        return AddedToken(
            tok["content"],
            single_word=bool(tok.get("single_word", False)),
            lstrip=bool(tok.get("lstrip", False)),
            rstrip=bool(tok.get("rstrip", False)),
            normalized=bool(tok.get("normalized", not special)),
            special=bool(tok.get("special", special)),
        )
    return AddedToken(str(tok), special=special, normalized=False)


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types, so the sandbox sees no foreign methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """Templates read a message's reasoning as `reasoning_content` (or `thinking`); accept any name."""
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@lru_cache(maxsize=16)
def _compile_template(source: str) -> Any:
    """Compile a chat template once. Environment as transformers builds it: an immutable sandbox with
    trim_blocks and lstrip_blocks, loop controls, a `tojson` that keeps non-ASCII text and accepts
    indent/separators/sort_keys, and the globals `raise_exception` and `strftime_now`."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    # `{% generation %}` blocks (assistant-mask tracking in transformers) render their body unchanged
    source = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", source)
    return env.from_string(source)


_CLEANUP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def _byte_level_chars() -> frozenset[str]:
    """The 256 symbols byte-level BPE writes bytes with (printable Latin-1 as themselves, others 256 + i)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in printable]
    return frozenset([chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))])


_BYTE_LEVEL_CHARS = _byte_level_chars()
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_WHITESPACE = re.compile(r"\s+")

# Input bytes per output byte a normalizer can fold at most: a compatibility mapping takes a 4-byte
# character to 1 byte (U+1D400 MATHEMATICAL BOLD CAPITAL A -> "A"), composition 3 jamo (9 bytes) into one
# 3-byte syllable, lowercasing the 3-byte KELVIN SIGN to "k". Kinds not listed may delete text (None).
_NORMALIZER_SHRINK = {"NFC": 4.0, "NFD": 4.0, "NFKC": 4.0, "NFKD": 4.0, "Lowercase": 3.0, "Prepend": 1.0}
_NORMALIZER_SHRINK["ByteLevel"] = 1.0
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation"}


def _has_type(spec: Any, kind: str) -> bool:
    if not isinstance(spec, Mapping):
        return False
    if spec.get("type") == kind:
        return True
    return any(_has_type(s, kind) for key in ("normalizers", "pretokenizers", "decoders") for s in spec.get(key) or [])


def _normalizer_shrink(spec: Any) -> float | None:
    """How many input bytes a normalizer may fold into one output byte (1 = never shrinks), None if it may
    delete text (Strip, StripAccents, BertNormalizer, Precompiled, a regex Replace, ...)."""
    if spec is None:
        return 1.0
    kind = spec.get("type")
    if kind == "Sequence":
        total = 1.0
        for sub in spec.get("normalizers") or []:
            factor = _normalizer_shrink(sub)
            if factor is None:
                return None
            total *= factor
        return total
    if kind == "Replace":
        pattern, content = spec.get("pattern") or {}, spec.get("content") or ""
        if "String" not in pattern or not content or not pattern["String"]:
            return None
        return max(1.0, len(pattern["String"].encode("utf-8")) / len(content.encode("utf-8")))
    return _NORMALIZER_SHRINK.get(kind)


def _pre_tokenizer_keeps_input(spec: Any) -> bool:
    """True when the pre-tokenizer only splits (or re-writes) text and never drops any of it."""
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_pre_tokenizer_keeps_input(s) for s in spec.get("pretokenizers") or [])
    if kind not in _KEEPING_PRE_TOKENIZERS:
        return False  # Whitespace, WhitespaceSplit, BertPreTokenizer, CharDelimiterSplit drop separators
    return str(spec.get("behavior", "")).lower() != "removed"


class Tokenizer:
    """Owns a model's tokenizer: the `tokenizers` backend, its special tokens and its chat templates.

    `vocab_size` counts every id the tokenizer can produce, added tokens included (like
    `len(AutoTokenizer)`); the model's embedding may be larger. `all_special_ids` holds the named
    special tokens (bos/eos/unk/sep/pad/cls/mask), `additional_special_tokens` and every added token
    that tokenizer.json marks special (those are what `skip_special_tokens` drops).
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        config: Mapping[str, Any] | None = None,
        chat_template: str | dict[str, str] | None = None,
    ) -> None:
        self._tok = backend
        cfg = dict(config or {})
        self.config = cfg
        self.clean_up_tokenization_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
        self.model_max_length: int | None = cfg.get("model_max_length")

        # tokens tokenizer_config.json declares that tokenizer.json lacks are added, as transformers does
        missing: list[AddedToken] = []
        decl = cfg.get("added_tokens_decoder") or {}
        for _, t in sorted(decl.items(), key=lambda kv: int(kv[0])):
            content = _token_content(t)
            if content is not None and backend.token_to_id(content) is None:
                missing.append(_added_token(t))
        self.special_tokens: dict[str, str] = {}
        for name in _NAMED_SPECIAL:
            content = _token_content(cfg.get(name))
            if content is None:
                continue
            self.special_tokens[name] = content
            if backend.token_to_id(content) is None and all(m.content != content for m in missing):
                missing.append(_added_token(cfg[name]))
        extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
        if isinstance(extra, Mapping):  # model-specific named tokens, e.g. {"image_token": "<image>"}
            extra = list(extra.values())
        self.additional_special_tokens = [c for c in (_token_content(t) for t in extra) if c is not None]
        for t in extra:
            content = _token_content(t)
            if content is not None and backend.token_to_id(content) is None:
                missing.append(_added_token(t))
        if missing:
            backend.add_special_tokens(missing)

        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token")
        self.unk_token = self.special_tokens.get("unk_token")

        # add_bos_token / add_eos_token, when the config sets either (or tokenizer.json has no
        # post-processor), decide what `encode(..., add_special_tokens=True)` adds; otherwise
        # tokenizer.json's own post-processor does.
        explicit = "add_bos_token" in cfg or "add_eos_token" in cfg
        if explicit or backend.post_processor is None:
            add_bos = bool(cfg.get("add_bos_token", False)) and self.bos_token_id is not None
            add_eos = bool(cfg.get("add_eos_token", False)) and self.eos_token_id is not None
            single = " ".join(
                ([f"{self.bos_token}:0"] if add_bos else []) + ["$A:0"] + ([f"{self.eos_token}:0"] if add_eos else [])
            )
            pair = (
                single
                + " "
                + " ".join(
                    ([f"{self.bos_token}:1"] if add_bos else [])
                    + ["$B:1"]
                    + ([f"{self.eos_token}:1"] if add_eos else [])
                )
            )
            specials = ([(self.bos_token, self.bos_token_id)] if add_bos else []) + (
                [(self.eos_token, self.eos_token_id)] if add_eos else []
            )
            backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

        if chat_template is None:
            chat_template = cfg.get("chat_template")
        if isinstance(chat_template, list):  # [{"name": ..., "template": ...}, ...]
            chat_template = {t["name"]: t["template"] for t in chat_template}
        self.chat_template: str | dict[str, str] | None = chat_template

        specials = {backend.token_to_id(t) for t in (*self.special_tokens.values(), *self.additional_special_tokens)}
        specials |= {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        specials.discard(None)
        self.all_special_ids: list[int] = sorted(specials)  # type: ignore[arg-type]
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json` and chat templates) from a model directory."""
        path = Path(path)
        tok_file = path / TOKENIZER_FILE
        if not tok_file.is_file():
            raise FileNotFoundError(
                f"no {TOKENIZER_FILE} in {path}: dynserve needs a fast (tokenizers-library) tokenizer file "
                f"'{TOKENIZER_FILE}' in the model directory"
            )
        backend = _HFTokenizer.from_file(str(tok_file))
        cfg: dict[str, Any] = {}
        cfg_file = path / TOKENIZER_CONFIG_FILE
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        template: str | dict[str, str] | None = cfg.get("chat_template")
        if isinstance(template, list):
            template = {t["name"]: t["template"] for t in template}
        json_file = path / CHAT_TEMPLATE_JSON_FILE
        if template is None and json_file.is_file():
            template = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
        jinja_file = path / CHAT_TEMPLATE_FILE
        if jinja_file.is_file():  # the separate file wins over the config's copy, as in transformers
            default = jinja_file.read_text(encoding="utf-8")
            template = {**template, "default": default} if isinstance(template, dict) else default
        extra_dir = path / CHAT_TEMPLATE_DIR
        if extra_dir.is_dir():
            named = {f.stem: f.read_text(encoding="utf-8") for f in sorted(extra_dir.glob("*.jinja"))}
            if named:
                base = template if isinstance(template, dict) else ({"default": template} if template else {})
                template = {**base, **named}
        return cls(backend, cfg, template)

    @staticmethod
    def exists(path: str | Path) -> bool:
        """True when `path` holds a tokenizer.json that `from_dir` can load."""
        return (Path(path) / TOKENIZER_FILE).is_file()

    # ------------------------------------------------------------------ ids
    @property
    def backend(self) -> _HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (hot paths call it directly)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        f = self._tok.id_to_token
        return [f(int(i)) for i in ids]

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    # ------------------------------------------------------------------ text
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. add_special_tokens adds what the post-processor adds (e.g. BOS).
        Long texts are encoded with the GIL released, so other Python threads (an event loop) run meanwhile."""
        if len(text) > _RELEASE_GIL_ABOVE:
            batch = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch  # _fast: no offsets
            return batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; long id lists are decoded with the GIL released."""
        ids = list(ids)
        if len(ids) > _RELEASE_GIL_ABOVE:
            text = self._tok.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        else:
            text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for a, b in _CLEANUP:
                text = text.replace(a, b)
        return text

    # ------------------------------------------------------------------ length bounds
    @cached_property
    def max_token_bytes(self) -> int:
        """Bytes of text the longest vocabulary entry (added tokens included) stands for: one per symbol of
        a byte-level BPE piece, one for a byte-fallback piece `<0xNN>`, else the piece's UTF-8 length
        (an upper bound, e.g. for SentencePiece's 3-byte `\u2581` that stands for one space). Computed once."""
        byte_level = self._byte_level
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        longest = 1
        for piece in self._tok.get_vocab(with_added_tokens=True):
            if len(piece) * 4 <= longest:  # no UTF-8 character is longer than 4 bytes
                continue
            if byte_level and piece not in added and all(c in _BYTE_LEVEL_CHARS for c in piece):
                n = len(piece)
            elif _BYTE_FALLBACK.fullmatch(piece):
                n = 1
            else:
                n = len(piece.encode("utf-8"))
            longest = max(longest, n)
        return longest

    def min_num_tokens(self, text: str) -> int:
        """A lower bound on `len(encode(text))`, found without tokenising: the UTF-8 bytes of `text` over the
        most bytes one token can stand for. 0 when no bound holds for this tokenizer (one whose normalizer,
        pre-tokenizer or model may drop or fold input, e.g. BERT's WordPiece)."""
        per_token = self._max_bytes_per_token
        if per_token is None or not text:
            return 0
        if self._strips_whitespace:  # an added token with lstrip/rstrip swallows any run of whitespace
            text = _WHITESPACE.sub("", text)
        n_bytes = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        return math.ceil(n_bytes / per_token)

    @cached_property
    def _pipeline(self) -> dict[str, Any]:
        return json.loads(self._tok.to_str())

    @cached_property
    def _byte_level(self) -> bool:
        spec = self._pipeline
        return _has_type(spec.get("pre_tokenizer"), "ByteLevel") or _has_type(spec.get("decoder"), "ByteLevel")

    @cached_property
    def _strips_whitespace(self) -> bool:
        return any(t.lstrip or t.rstrip for t in self._tok.get_added_tokens_decoder().values())

    @cached_property
    def _max_bytes_per_token(self) -> float | None:
        """Most input bytes one token can cover, or None where tokenisation may drop or fold input."""
        spec = self._pipeline
        shrink = _normalizer_shrink(spec.get("normalizer"))
        if shrink is None or not _pre_tokenizer_keeps_input(spec.get("pre_tokenizer")):
            return None
        model = spec.get("model") or {}
        kind = model.get("type")
        per_token = float(self.max_token_bytes)
        if kind == "BPE":
            if self._byte_level and not model.get("byte_fallback"):
                vocab = self._tok.get_vocab(with_added_tokens=False)
                if any(c not in vocab for c in _BYTE_LEVEL_CHARS):  # a byte with no symbol would be dropped
                    return None
            elif not model.get("byte_fallback"):
                if model.get("unk_token") is None or model.get("fuse_unk"):
                    return None  # unknown characters dropped, or a whole run of them folded into one <unk>
                per_token = max(per_token, 4.0)  # one <unk> per unknown character
        elif kind == "Unigram":
            if not model.get("byte_fallback"):
                return None
        else:  # WordPiece (one [UNK] for a whole word), WordLevel
            return None
        return per_token * shrink

    # ------------------------------------------------------------------ chat
    def get_chat_template(self, tools: list[dict[str, Any]] | None = None, name: str | None = None) -> str:
        """The template source: a named one, else `tool_use` when tools are given, else `default`."""
        tpl = self.chat_template
        if isinstance(tpl, dict):
            if name is not None:
                if name not in tpl:
                    raise ValueError(f"no chat template named {name!r}; available: {sorted(tpl)}")
                return tpl[name]
            if tools is not None and "tool_use" in tpl:
                return tpl["tool_use"]
            if "default" in tpl:
                return tpl["default"]
            raise ValueError(f"this model has several chat templates and none is 'default': {sorted(tpl)}")
        if tpl is None:
            raise ValueError(
                "this model's tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
                f"{CHAT_TEMPLATE_FILE}); use the completions API with a plain prompt instead"
            )
        return tpl

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt text, as `transformers` does with `tokenize=False`.

        The template sees `messages`, `tools`, `documents`, `add_generation_prompt`, the special tokens
        (`bos_token`, `eos_token`, ...) and any extra keyword (e.g. `enable_thinking`), which overrides
        a special token of the same name. `chat_template` picks a named template or is a template source.
        Many templates already emit the BOS token: tokenize the result with `encode_chat` (or
        `encode(text, add_special_tokens=False)`), as vLLM and transformers do, so BOS is not doubled.
        """
        if chat_template is not None and isinstance(self.chat_template, dict) and chat_template in self.chat_template:
            source = self.chat_template[chat_template]
        elif chat_template is not None:
            source = chat_template
        else:
            source = self.get_chat_template(tools)
        template = _compile_template(source)
        chat = [_alias_reasoning(m) for m in _plain(list(messages))]
        for m in chat:
            if not isinstance(m, dict):
                raise TypeError(f"chat messages must be dicts, got {m!r}")
        variables: dict[str, Any] = {**self.special_tokens, **_plain(kwargs)}
        return template.render(
            messages=chat,
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **variables,
        )

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Prompt token ids of a conversation: the rendered template encoded with add_special_tokens=False
        (the template decides about BOS; this is what vLLM and transformers' tokenize=True do)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools, **kwargs), False)
