"""OpenAI protocol models (pydantic v2): completions and chat completions requests, responses and
stream chunks, plus the dynserve extensions (sampling extras, per-request `routing`, expert usage).

Request models are strict: a wrong JSON type (a string for a number, a float for an integer, a
bool for a number) is rejected rather than coerced, and the server turns every validation error
into a 400 naming the field path in `error.param`. Fields vLLM accepts beyond OpenAI's are
accepted here with vLLM's names and meanings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, WithJsonSchema
from pydantic_core import PydanticCustomError

from dynserve.config import MAX_STEERING_VALUES, ROUTING_POLICIES, RoutingConfig
from dynserve.sampling_params import SamplingParams

MAX_N = 128
MAX_LOGPROBS = 20
# every engine step checks each stop string and stop token of every running sequence: bounded, so that
# one request cannot slow everyone else's steps (OpenAI allows 4 stop strings; vLLM sets no limit)
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024


class InvalidRequestError(ValueError):
    """A request that parsed but cannot be served as asked (-> 400 with `param`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


# ------------------------------------------------------------------------------- field types
_STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Bool = Annotated[bool, Field(strict=True)]
Str = Annotated[str, Field(strict=True)]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The element checks of a list prompt run in pydantic-core (Rust), not in a Python loop, and stop at the
# first bad element: a body of millions of token ids is never iterated by the interpreter, and a list of
# millions of wrong elements does not build millions of error records.
_FAST = Field(fail_fast=True)
_STRS = TypeAdapter(Annotated[list[Str], _FAST])
_IDS = TypeAdapter(Annotated[list[Int], _FAST])
_ID_LISTS = TypeAdapter(Annotated[list[Annotated[list[Int], Field(min_length=1, fail_fast=True)]], _FAST])


def _check_prompt(v: Any) -> Any:
    msg = "prompt must be a string, a list of strings, a list of token ids, or a list of token id lists"
    if isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise PydanticCustomError("prompt_type", msg)
    if not v:
        raise PydanticCustomError("prompt_empty", "prompt must not be empty")
    first = v[0]
    adapter = _STRS if isinstance(first, str) else _IDS if _is_int(first) else _ID_LISTS
    try:
        return adapter.validate_python(v)
    except ValidationError as e:
        if adapter is _ID_LISTS and all(err["type"] == "too_short" for err in e.errors(include_url=False)):
            raise PydanticCustomError("prompt_empty", "prompt token id lists must not be empty") from None
        raise PydanticCustomError("prompt_type", msg) from None


def _check_stop(v: Any) -> Any:
    if v is None:
        return v
    if isinstance(v, str):
        v = [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        if len(v) > MAX_STOP_STRINGS:
            raise PydanticCustomError(
                "stop_count", "stop may hold at most {limit} strings", {"limit": MAX_STOP_STRINGS}
            )
        if any(len(x) > MAX_STOP_STRING_CHARS for x in v):
            raise PydanticCustomError(
                "stop_length", "a stop string may be at most {limit} characters long", {"limit": MAX_STOP_STRING_CHARS}
            )
        return v
    raise PydanticCustomError("stop_type", "stop must be a string or a list of strings")


def _check_content(v: Any) -> Any:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list):
        for part in v:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise PydanticCustomError("content_type", "content parts must be objects with a 'type'")
            if part["type"] != "text":
                raise PydanticCustomError(
                    "content_type", "only text content parts are supported, got '{kind}'", {"kind": part["type"]}
                )
            if not isinstance(part.get("text"), str):
                raise PydanticCustomError("content_type", "a text content part needs a string 'text'")
        return v
    raise PydanticCustomError("content_type", "content must be a string or a list of text content parts")


_PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1}, "minItems": 1},
    ]
}
_STOP_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]}

_CONTENT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                "required": ["type", "text"],
            },
        },
        {"type": "null"},
    ]
}

PromptInput = Annotated[Any, AfterValidator(_check_prompt), WithJsonSchema(_PROMPT_SCHEMA)]
StopInput = Annotated[Any, AfterValidator(_check_stop), WithJsonSchema(_STOP_SCHEMA)]
ContentInput = Annotated[Any, AfterValidator(_check_content), WithJsonSchema(_CONTENT_SCHEMA)]


# ------------------------------------------------------------------------------- request parts
MAX_MOE_LAYERS = 1024  # per-layer routing lists (the longest real models have ~100 MoE layers)
MAX_ENTROPY_BINS = 64
_P = Annotated[Float, Field(gt=0.0, le=1.0)]
_Threshold = Annotated[Float, Field(ge=0.0, le=1.0)]
_K = Annotated[Int, Field(ge=1)]
_V = TypeVar("_V")
_PerLayer = Annotated[list[_V], Field(min_length=1, max_length=MAX_MOE_LAYERS)]


def _steering_checker(name: str) -> Any:
    """A validator of `routing.<name>`: RoutingConfig's own checks (types, ids >= 0, finite bounded
    biases, layer keys), reported on the field itself."""

    def check(v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, list) and len(v) > MAX_STEERING_VALUES:
            raise PydanticCustomError("steering_size", "at most {n} values", {"n": MAX_STEERING_VALUES})
        try:
            RoutingConfig(**{name: v})
        except ValueError as e:
            msg = str(e).removeprefix(f"routing.{name}").lstrip(": ")
            raise PydanticCustomError("steering", "{msg}", {"msg": msg}) from None
        return v

    return check


_IDS_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_BIAS_SCHEMA = {"type": "array", "items": {"type": "number"}, "minItems": 1}
ExpertIds = Annotated[
    Any,
    AfterValidator(_steering_checker("exclude_experts")),
    WithJsonSchema({"anyOf": [_IDS_SCHEMA, {"type": "object", "additionalProperties": _IDS_SCHEMA}, {"type": "null"}]}),
]
ExpertBias = Annotated[
    Any,
    AfterValidator(_steering_checker("expert_bias")),
    WithJsonSchema(
        {"anyOf": [_BIAS_SCHEMA, {"type": "object", "additionalProperties": _BIAS_SCHEMA}, {"type": "null"}]}
    ),
]


class RoutingParams(BaseModel):
    """Per-request expert routing (dynserve extension). Fields left out keep the engine's
    default routing; see dynserve.config.RoutingConfig for their meaning."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    policy: Literal[ROUTING_POLICIES] | None = None  # type: ignore[valid-type]
    # p, threshold and k: one value, or a list with one value per MoE layer
    p: _P | _PerLayer[_P] | None = None
    threshold: _Threshold | _PerLayer[_Threshold] | None = None
    k: _K | _PerLayer[_K] | None = None
    min_experts: Int | None = Field(default=None, ge=0)
    max_experts: Int | None = Field(default=None, ge=1)
    renormalize: Bool | None = None
    budget: Literal["auto", "fixed"] | None = None  # "fixed": never reduced by the server's expert budget
    entropy_thresholds: list[Annotated[Float, Field(ge=0.0)]] | None = Field(default=None, max_length=MAX_ENTROPY_BINS)
    entropy_k: list[Annotated[Int, Field(ge=0)]] | None = Field(default=None, max_length=MAX_ENTROPY_BINS + 1)
    # steering: ids / one bias per expert for every MoE layer, or per MoE layer ({"0": [...]}); checked
    # against the model (ids, layers, lengths) by the engine
    exclude_experts: ExpertIds = None
    expert_bias: ExpertBias = None

    def to_routing_config(self, default: RoutingConfig) -> RoutingConfig:
        """The fields this request set, as a RoutingConfig that the engine lays over its default
        (`RoutingConfig.overlay`, the one rule for Python and HTTP); checked against `default` here so
        that a combination that cannot work (min_experts above the default's max_experts) is a 400."""
        changes = {name: getattr(self, name) for name in self.model_fields_set}
        for name in (
            "policy",
            "p",
            "threshold",
            "min_experts",
            "entropy_thresholds",
            "entropy_k",
            "budget",
        ):  # not nullable
            if name in changes and changes[name] is None:
                del changes[name]
        try:
            request = RoutingConfig(**changes)
            default.overlay(request)
        except ValueError as e:
            msg = str(e)
            param = msg.split(" ", 1)[0].rstrip(":") if msg.startswith("routing.") else "routing"
            raise InvalidRequestError(msg, param=param) from None
        return request


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: Bool | None = None
    continuous_usage_stats: Bool | None = None


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

    model_config = _STRICT

    model: Str | None = None
    n: Int = Field(default=1, ge=1, le=MAX_N)
    temperature: Float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: Float | None = Field(default=None, gt=0.0, le=1.0)
    presence_penalty: Float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: Int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: StopInput = None
    user: Str | None = None
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Float] | None = None
    # vLLM extras
    top_k: Int | None = Field(default=None, ge=-1)
    min_p: Float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: Float | None = Field(default=None, gt=0.0)
    min_tokens: Int = Field(default=0, ge=0)
    ignore_eos: Bool = False
    stop_token_ids: list[Int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: Bool = True
    include_stop_str_in_output: Bool = False
    # the prompt's and each choice's token ids in the response (streamed: each chunk's new ids), as vLLM's
    return_token_ids: Bool = False
    # dynserve extensions
    routing: RoutingParams | None = None
    return_routed_experts: Bool = False
    routed_experts_start_len: Int | None = Field(default=None, ge=0)
    routed_experts_format: Literal["json", "base64"] | None = None

    def check_common(self) -> None:
        if not self.return_routed_experts:
            for name in ("routed_experts_start_len", "routed_experts_format"):
                if getattr(self, name) is not None:
                    raise InvalidRequestError(f"{name} requires return_routed_experts to be true", name)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options can only be set when stream is true", "stream_options")
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported", "logit_bias")
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if any(not s for s in stops):
                raise InvalidRequestError("stop strings must not be empty", "stop")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        default_routing: RoutingConfig,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        routing = self.routing.to_routing_config(default_routing) if self.routing is not None else None
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(
                n=self.n,
                temperature=1.0 if self.temperature is None else float(self.temperature),
                top_p=1.0 if self.top_p is None else float(self.top_p),
                top_k=-1 if self.top_k in (None, 0) else self.top_k,
                min_p=0.0 if self.min_p is None else float(self.min_p),
                presence_penalty=float(self.presence_penalty or 0.0),
                frequency_penalty=float(self.frequency_penalty or 0.0),
                repetition_penalty=1.0 if self.repetition_penalty is None else float(self.repetition_penalty),
                seed=self.seed,
                max_tokens=max_tokens,
                min_tokens=self.min_tokens,
                stop=stop,
                stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=self.ignore_eos,
                include_stop_str_in_output=self.include_stop_str_in_output,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=self.skip_special_tokens,
                routing=routing,
                return_routed_experts=self.return_routed_experts,
                routed_experts_start_len=self.routed_experts_start_len or 0,
            )
        except ValueError as e:
            msg = str(e)
            head = msg.split(" ", 1)[0]
            raise InvalidRequestError(msg, param=head if head in type(self).model_fields else None) from None


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: PromptInput
    suffix: Str | None = None
    echo: Bool = False
    logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_tokens: Int | None = Field(default=16, ge=0)  # 0 with echo: the prompt alone (and its logprobs)
    best_of: Int | None = Field(default=None, ge=1, le=MAX_N)

    def to_sampling_params(self, default_routing: RoutingConfig) -> SamplingParams:
        """Validate what pydantic cannot and build the engine's SamplingParams."""
        self.check_common()
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of is not supported (it must equal n)", "best_of")
        prompt_logprobs = self.logprobs if self.echo else None  # echo + logprobs: every prompt token's too
        return self._sampling_params(self.max_tokens, self.logprobs, default_routing, prompt_logprobs)


class ChatMessage(BaseModel):
    """One chat message; content is a string or a list of text parts (joined with newlines)."""

    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: ContentInput = None
    name: Str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part["text"] for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(default=None, ge=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: Bool | None = False
    top_logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: Bool = True

    def to_sampling_params(self, default_routing: RoutingConfig) -> SamplingParams:
        self.check_common()
        if self.tools:
            raise InvalidRequestError("tools are not supported", "tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice is not supported", "tool_choice")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise InvalidRequestError("response_format other than {'type': 'text'} is not supported", "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        for i, m in enumerate(self.messages):
            if m.content is None and m.role != "assistant":
                raise InvalidRequestError(
                    f"messages[{i}].content must not be null for role {m.role!r}", f"messages[{i}].content"
                )
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, default_routing)


def conversation(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the plain dicts a chat template expects."""
    return [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]


class TokenizeRequest(BaseModel):
    """POST /tokenize: either a prompt or chat messages."""

    model_config = _STRICT

    model: Str | None = None
    prompt: Str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: Bool | None = None
    add_generation_prompt: Bool = True


class DetokenizeRequest(BaseModel):
    model_config = _STRICT

    model: Str | None = None
    tokens: list[Int]
