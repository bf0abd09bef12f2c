"""Request validation for the two HTTP protocols, down to one GenerationSpec per prompt.

OpenAI (/v1/completions, /v1/chat/completions) and KServe v2 / Triton (infer, generate) bodies are
parsed by strict pydantic models (no type coercion; unknown fields rejected, as OpenAI does and as
Triton does for unknown inputs). Everything a user can get wrong raises ProtocolError (status,
message, param); server.py renders it in the protocol's error shape. KServe tensors (JSON data or
the binary tensor extension) are decoded in protocol_kserve.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# Algorithm names when spinserve.runtime.sparse (the registry) is not importable.
FALLBACK_SPARSE_ALGORITHMS = ("dense", "streaming", "quest", "shadowkv", "retroinfer")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class ProtocolError(Exception):
    """A request error: HTTP status, a message with the remedy, the offending field."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def openai_body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }

    def kserve_body(self) -> dict[str, Any]:
        return {"error": self.message}


def known_sparse_algorithms() -> tuple[str, ...]:
    """Names from the sparse registry when it exists, else FALLBACK_SPARSE_ALGORITHMS."""
    try:
        from spinserve.runtime import sparse
    except ImportError:
        return FALLBACK_SPARSE_ALGORITHMS
    for attr in ("available_algorithms", "algorithm_names", "list_algorithms"):
        fn = getattr(sparse, attr, None)
        if callable(fn):
            return tuple(str(n) for n in fn())
    for attr in ("REGISTRY", "ALGORITHMS"):
        table = getattr(sparse, attr, None)
        if isinstance(table, dict):
            return tuple(str(n) for n in table)
    return FALLBACK_SPARSE_ALGORITHMS


def validation_error(e: ValidationError) -> ProtocolError:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unrecognized field: remove it"
    return ProtocolError(
        400, f"invalid request: {loc}: {msg}", param=loc or None, code="invalid_value"
    )


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(
            400, f"request body is not valid UTF-8 ({e.reason} at byte {e.start}): send UTF-8 JSON"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError(
            400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    if not isinstance(value, dict):
        raise ProtocolError(400, "request body must be a JSON object")
    return value


def check_text(value: str, param: str) -> str:
    """JSON can carry lone surrogates (\\ud800) that no tokenizer can encode: reject them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(
            400, f"{param} is not valid Unicode (lone surrogate)", param=param
        ) from None
    return value


@dataclass(slots=True)
class GenerationSpec:
    """One prompt's generation, protocol-neutral. prompt is text or token ids."""

    prompt: str | list[int]
    max_tokens: int | None  # None = up to the context limit
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    sparse_algorithm: str | None = None
    sparse_budget_tokens: int | None = None
    echo_prompt: bool = False  # prepend the prompt text to the output (KServe exclude=false)
    add_special_tokens: bool = True  # False for chat-templated text (the template adds them)

    def sampling_kwargs(self, max_tokens: int) -> dict[str, Any]:
        return dict(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(self.stop),
            stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            sparse_algorithm=self.sparse_algorithm,
            sparse_budget_tokens=self.sparse_budget_tokens,
        )


def resolve_max_tokens(
    spec: GenerationSpec, prompt_len: int, max_context: int, prompt_param: str
) -> int:
    """The request's max_tokens checked against the context; None fills the context."""
    room = max_context - prompt_len
    if room < 1:
        raise ProtocolError(
            400,
            f"This model's maximum context length is {max_context} "
            f"tokens; the prompt has {prompt_len}: shorten it",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if spec.max_tokens is None:
        return room
    if spec.max_tokens > room:
        raise ProtocolError(
            400,
            f"This model's maximum context length is {max_context} "
            f"tokens; you requested {prompt_len + spec.max_tokens} "
            f"({prompt_len} in the prompt, {spec.max_tokens} max_tokens): "
            f"lower max_tokens to at most {room}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return spec.max_tokens


# ---- shared pieces --------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SparseParameters(_Strict):
    """`parameters` of any protocol: per-request sparse attention settings."""

    algorithm: str | None = None
    budget: int | None = Field(None, ge=1, le=1 << 30)

    @field_validator("algorithm")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        names = known_sparse_algorithms()
        if v is not None and v not in names:
            raise ValueError(f"unknown sparse algorithm {v!r}; known: {', '.join(names)}")
        return v


def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ProtocolError(
            400,
            f"stop: at most {MAX_STOP_STRINGS} non-empty strings of at "
            f"most {MAX_STOP_CHARS} characters",
            param="stop",
        )
    return [check_text(s, "stop") for s in stops]


# ---- OpenAI ---------------------------------------------------------------------------------
class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _OpenAIBase(_Strict):
    """Fields OpenAI clients may send as null mean "the default" (as OpenAI's API takes them)."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # spinserve / vLLM extensions
    top_k: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    parameters: SparseParameters | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k == "model"}
        return data

    def _unsupported(self) -> list[tuple[str, bool]]:
        return [
            ("n", self.n != 1),
            ("presence_penalty", self.presence_penalty != 0),
            ("frequency_penalty", self.frequency_penalty != 0),
            ("logit_bias", bool(self.logit_bias)),
        ]

    def _spec(self, prompt: str | list[int], max_tokens: int | None) -> GenerationSpec:
        for name, bad in self._unsupported():
            if bad:
                raise ProtocolError(
                    400,
                    f"{name} is not supported by spinserve: leave it at its default",
                    param=name,
                    code="unsupported",
                )
        if self.stream_options is not None and not self.stream:
            raise ProtocolError(400, "stream_options needs stream=true", param="stream_options")
        sparse = self.parameters or SparseParameters()
        return GenerationSpec(
            prompt,
            max_tokens,
            self.temperature,
            self.top_p,
            self.top_k,
            self.seed,
            _stop_list(self.stop),
            list(self.stop_token_ids or []),
            self.ignore_eos,
            sparse.algorithm,
            sparse.budget,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_OpenAIBase):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def to_spec(self) -> GenerationSpec:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ProtocolError(
                    400,
                    "send one prompt per request (batched prompts are not supported)",
                    param="prompt",
                    code="unsupported",
                )
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt or prompt == "":
            raise ProtocolError(400, "prompt is empty", param="prompt")
        for name, bad in (
            ("logprobs", self.logprobs is not None),
            ("echo", self.echo),
            ("best_of", self.best_of not in (None, 1)),
            ("suffix", bool(self.suffix)),
        ):
            if bad:
                raise ProtocolError(
                    400, f"{name} is not supported by spinserve", param=name, code="unsupported"
                )
        _check_max_tokens(self.max_tokens)
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
        return self._spec(prompt, self.max_tokens)  # type: ignore[arg-type]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict[str, str]:
        text = (
            self.content
            if isinstance(self.content, str)
            else "".join(p.text for p in self.content or [])
        )
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": check_text(text, "messages")}


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def to_spec(self) -> tuple[GenerationSpec, list[dict[str, str]]]:
        """The spec (prompt filled in by the server's chat template) and template messages."""
        for name, bad in (
            ("logprobs", self.logprobs),
            ("top_logprobs", self.top_logprobs),
            ("tools", bool(self.tools)),
            ("tool_choice", self.tool_choice not in (None, "none")),
            ("response_format", (self.response_format or {}).get("type", "text") != "text"),
        ):
            if bad:
                raise ProtocolError(
                    400, f"{name} is not supported by spinserve", param=name, code="unsupported"
                )
        max_tokens = (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )
        _check_max_tokens(max_tokens)
        messages = [m.as_template_dict() for m in self.messages]
        return self._spec("", max_tokens), messages


def _check_max_tokens(max_tokens: int | None) -> None:
    if max_tokens is not None and max_tokens < 1:
        raise ProtocolError(
            400,
            f"max_tokens must be >= 1 (got {max_tokens})",
            param="max_tokens",
            code="invalid_value",
        )
