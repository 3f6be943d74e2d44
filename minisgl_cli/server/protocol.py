"""The HTTP API's request and response bodies: OpenAI's shapes, plus the native /generate ones (pydantic).

Requests ignore fields they do not know (clients send OpenAI options this server does not implement).
Ranges that the engine's SamplingParams checks itself (temperature, top_p, penalties, ...) are left to it,
so each range is written once; the models bound only what the API owns (n, logprobs counts) and what must
survive the trip to the engine (integers fit in int64, strings encode as UTF-8).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator


def _encodable(text: str) -> str:
    # JSON's \ud800-style escapes decode to lone surrogates, which no tokenizer or msgpack can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate escape)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


# ---- requests


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Sampling settings every generation endpoint takes; None: the server's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: Int64 | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[Int64] | None = None
    ignore_eos: bool = False


class OpenAIRequest(SamplingFields):
    """What chat and text completions share."""

    model: str | None = None  # None: the served model
    max_tokens: Int64 | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        """Parts become one string here, so a non-text part gets one clear error instead of a union's two."""
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(
                    f"only text content parts ({{'type': 'text', 'text': ...}}) are supported, got {kind!r}"
                )
            texts.append(part["text"])
        return "\n".join(texts)

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> ChatMessage:
        # Only an assistant turn may come without content (OpenAI's, when it carried tool calls instead).
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs a 'content' field")
        return self

    def to_prompt(self) -> dict[str, str]:
        """The message as the engine's chat template takes it."""
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.content if isinstance(self.content, str) else ""}


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int64 | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


TokenIds = Annotated[list[Int64], Field(min_length=1)]


class CompletionRequest(OpenAIRequest):
    # One prompt (text or token ids) or a batch of them.
    prompt: Text | list[Text] | TokenIds | list[TokenIds]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("a prompt (and each prompt of a batch) must not be empty")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class NativeSamplingParams(SamplingFields):
    max_new_tokens: Int64 | None = None


class NativeGenerateRequest(BaseModel):
    """POST /generate: exactly one of `text` and `input_ids`."""

    text: Text | None = None
    input_ids: TokenIds | None = None
    sampling_params: NativeSamplingParams = Field(default_factory=NativeSamplingParams)
    stream: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> NativeGenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of 'text' and 'input_ids'")
        return self

    @property
    def prompt(self) -> str | list[int]:
        return self.text if self.text is not None else list(self.input_ids or [])


# ---- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int
    # {"role": "assistant", "content": ""} first, then {"content": ...}, then {} with the finish reason.
    delta: dict[str, str]
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # sent (as null until the last chunk) only with stream_options.include_usage


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]  # where each token starts in the choice's text


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    """A text completion, and each chunk of a streamed one (OpenAI uses the same object for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "minisgl"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class NativeMetaInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str | None


class NativeGenerateResponse(BaseModel):
    """/generate's answer, and each streamed delta (text and ids of that step only)."""

    text: str
    output_ids: list[int]
    meta_info: NativeMetaInfo


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
