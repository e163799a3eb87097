"""Request bodies of the proxied OpenAI endpoints, checked before anything is sent upstream.

The models follow the OpenAI API reference (Create chat completion, Create completion, Create embeddings): types,
enumerations and ranges of every documented request field, plus the few vLLM sampling extensions
services.llm_serve understands (`VLLM_EXTRAS`). Types are strict, as OpenAI's are: `"temperature": "1"` or
`"n": true` is an error, not coerced. A field that is neither documented nor a vLLM extension is answered like
OpenAI answers it, 400 "Unrecognized request argument supplied: <name>" (fail closed: nothing unknown reaches the
engine). Before the models run, `check_shape` bounds what any JSON body may cost: nesting depth, string length
and list length (`RequestLimits`, from the gateway config).

`validate_request(route, body, limits)` returns the validated model or raises `RequestError` (400, OpenAI's
`param` naming the offending field such as `messages[2].content[0].image_url.detail`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

INT64 = 2**63 - 1


@dataclass(frozen=True)
class RequestLimits:
    max_json_depth: int = 32
    max_string_chars: int = 524_288
    max_list_items: int = 4096
    max_messages: int = 2048


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        if param is not None and len(param) > 256:
            param = param[:253] + "..."
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


Float = Annotated[float, Field(allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(ge=1, le=INT64)]
Seed = Annotated[int, Field(ge=-(2**63), le=INT64)]
Stop = str | Annotated[list[str], Field(min_length=1, max_length=4)] | None
LogitBias = dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")], Annotated[int, Field(ge=-100, le=100)]]
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)
]
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class StreamOptions(_Body):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class VllmExtras(_Body):
    """vLLM's sampling extensions (vllm.entrypoints.openai ... protocol), accepted on chat and completions."""

    top_k: Annotated[int, Field(ge=-1, le=INT64)] | None = None
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=INT64)] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT64)]] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None


VLLM_EXTRAS = tuple(VllmExtras.model_fields)


# ---------------------------------------------------------------------------------------- chat messages


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageUrl(_Body):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(_Body):
    data: str
    format: Literal["wav", "mp3"]


class AudioPart(_Body):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileRef(_Body):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class FilePart(_Body):
    type: Literal["file"]
    file: FileRef


class RefusalPart(_Body):
    type: Literal["refusal"]
    refusal: str


UserPart = Annotated[TextPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")]
AssistantPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]
TextContent = str | Annotated[list[TextPart], Field(min_length=1)]


class SystemMessage(_Body):
    role: Literal["system"]
    content: TextContent
    name: str | None = None


class DeveloperMessage(_Body):
    role: Literal["developer"]
    content: TextContent
    name: str | None = None


class UserMessage(_Body):
    role: Literal["user"]
    content: str | Annotated[list[UserPart], Field(min_length=1)]
    name: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AudioRef(_Body):
    id: str


class AssistantMessage(_Body):
    role: Literal["assistant"]
    content: str | Annotated[list[AssistantPart], Field(min_length=1)] | None = None
    refusal: str | None = None
    name: str | None = None
    audio: AudioRef | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None  # deprecated by OpenAI, still accepted


class ToolMessage(_Body):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str


class FunctionMessage(_Body):  # deprecated by OpenAI, still accepted
    role: Literal["function"]
    content: str | None
    name: str


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
    Field(discriminator="role"),
]


# ---------------------------------------------------------------------------------------- tools and formats


class FunctionDef(_Body):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema object
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: FunctionName


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: FunctionName
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextFormat(_Body):
    type: Literal["text"]


class JsonObjectFormat(_Body):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(_Body):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")
]


class Prediction(_Body):
    type: Literal["content"]
    content: TextContent


class AudioOutput(_Body):
    voice: str
    format: Literal["wav", "aac", "mp3", "flac", "opus", "pcm16"]


def _needs_stream(self: Any) -> None:
    if self.stream_options is not None and self.stream is not True:
        raise RequestError("stream_options is only allowed when stream is true", "stream_options")


# ---------------------------------------------------------------------------------------- requests


class ChatCompletionRequest(VllmExtras):
    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[Message], Field(min_length=1)]
    audio: AudioOutput | None = None
    frequency_penalty: Penalty | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None  # deprecated
    functions: Annotated[list[FunctionDef], Field(min_length=1, max_length=128)] | None = None  # deprecated
    logit_bias: LogitBias | None = None
    logprobs: bool | None = None
    max_completion_tokens: PositiveInt | None = None
    max_tokens: PositiveInt | None = None
    metadata: Metadata | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    parallel_tool_calls: bool | None = None
    prediction: Prediction | None = None
    presence_penalty: Penalty | None = None
    prompt_cache_key: str | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    response_format: ResponseFormat | None = None
    safety_identifier: str | None = None
    seed: Seed | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    stop: Stop = None
    store: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    top_p: Probability | None = None
    user: str | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @model_validator(mode="after")
    def _cross_field(self) -> ChatCompletionRequest:
        _needs_stream(self)
        if self.top_logprobs is not None and self.logprobs is not True:
            raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        if not self.tools:
            for name in ("tool_choice", "parallel_tool_calls"):
                if getattr(self, name) is not None:
                    raise RequestError(f"{name} is only allowed when tools are specified", name)
        return self


Prompt = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | Annotated[list[Annotated[int, Field(ge=0, le=INT64)]], Field(min_length=1)]
    | Annotated[
        list[Annotated[list[Annotated[int, Field(ge=0, le=INT64)]], Field(min_length=1)]], Field(min_length=1)
    ]
)


class CompletionRequest(VllmExtras):
    model: Annotated[str, Field(min_length=1)]
    prompt: Prompt
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None
    echo: bool | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    max_tokens: PositiveInt | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    presence_penalty: Penalty | None = None
    seed: Seed | None = None
    stop: Stop = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _cross_field(self) -> CompletionRequest:
        _needs_stream(self)
        if self.best_of is not None and self.best_of < (self.n or 1):
            raise RequestError(f"best_of ({self.best_of}) must be at least n ({self.n})", "best_of")
        return self


class EmbeddingRequest(_Body):
    model: Annotated[str, Field(min_length=1)]
    input: Prompt
    dimensions: PositiveInt | None = None
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None


REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "chat/completions": ChatCompletionRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
}


# ---------------------------------------------------------------------------------------- checks


def _param(loc: tuple[Any, ...], body: Any) -> str | None:
    """Pydantic's error location -> OpenAI's `param` (`messages[0].content`), dropping the union tags pydantic
    inserts (`user`, `list[str]`): a location step is kept only when it indexes the body itself."""
    out, cur = "", body
    for step in loc:
        if isinstance(step, int) and isinstance(cur, list) and 0 <= step < len(cur):
            out, cur = f"{out}[{step}]", cur[step]
        elif isinstance(step, str) and isinstance(cur, dict) and (step in cur or step == loc[-1]):
            out, cur = (f"{out}.{step}" if out else step), cur.get(step)
    return out[:256] or None


def check_shape(body: Any, limits: RequestLimits) -> None:
    """Bounds on any JSON value, walked without recursion: depth, string length, list length."""
    stack: list[tuple[Any, int, str]] = [(body, 1, "")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, dict | list) and depth > limits.max_json_depth:
            raise RequestError(
                f"The request body is nested more than {limits.max_json_depth} levels deep (at {where[:200]}).",
                where or None,
            )
        if isinstance(value, str) and len(value) > limits.max_string_chars:
            raise RequestError(
                f"A string in the request is {len(value)} characters long; the limit is "
                f"{limits.max_string_chars}.",
                where or None,
                "string_above_max_length",
            )
        if isinstance(value, dict):
            for k, v in value.items():
                if len(k) > limits.max_string_chars:
                    raise RequestError("A key in the request body is too long.", where or None)
                stack.append((v, depth + 1, f"{where}.{k}" if where else k))
        elif isinstance(value, list):
            if len(value) > limits.max_list_items:
                raise RequestError(
                    f"{where or 'the body'} has {len(value)} items; the limit is {limits.max_list_items}.",
                    where or None,
                    "array_above_max_length",
                )
            stack.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(value))


def validate_request(route: str, body: Any, limits: RequestLimits) -> BaseModel:
    """The validated request for POST /v1/<route>, or RequestError naming the first problem."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", None, "invalid_json")
    check_shape(body, limits)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise RequestError("you must provide a model parameter", "model", "missing_required_parameter")
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise RequestError(
            f"messages has {len(messages)} items; the limit is {limits.max_messages}.",
            "messages",
            "array_above_max_length",
        )
    try:
        return REQUEST_MODELS[route].model_validate(body)
    except RequestError:
        raise
    except ValidationError as exc:
        # the deepest error is the most specific one (a union reports one error per member); among equals,
        # a broken constraint says more than a type mismatch
        err = max(
            exc.errors(include_url=False), key=lambda e: (len(e["loc"]), not e["type"].endswith("_type"))
        )
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            name = _param(loc, body) or ".".join(map(str, loc))
            raise RequestError(
                f"Unrecognized request argument supplied: {name}", name, "unknown_parameter"
            ) from None
        if err["type"] == "missing":
            name = _param(loc, body) or ".".join(map(str, loc))
            raise RequestError(
                f"Missing required parameter: '{name}'.", name, "missing_required_parameter"
            ) from None
        name = _param(loc, body)
        ctx = err.get("ctx", {})
        inner = ctx.get("error") if isinstance(ctx.get("error"), RequestError) else None
        if inner is not None:  # a cross-field rule above
            raise inner from None
        shown = repr(err.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise RequestError(
            f"Invalid value for '{name or 'body'}': {err['msg']} (got {shown}).", name
        ) from None
