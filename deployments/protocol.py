"""OpenAI-compatible request models (pydantic; the user-facing boundary)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from vlm_core.engine.request import RequestOutput
from vlm_core.engine.sampling import SEED_RANGE, SamplingParams


def _unicode(text: str) -> str:
    """JSON can carry lone UTF-16 surrogates ("\\ud800"), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text holds an unpaired surrogate {text[e.start]!r} at character {e.start}; send valid "
                         f"Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class APIError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers or {}

    def __reduce__(self):   # crosses process boundaries (handle callers get it back as raised)
        return type(self), (self.status, self.message, self.type, self.param, self.headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, server_overloaded, server_error")
    param: str | None = None
    code: int = Field(description="the HTTP status")


class ErrorResponse(BaseModel):
    """Every error answer, in OpenAI's shape."""
    error: ErrorDetail


class ServerOverloadedError(Exception):
    """A replica refused a request because its queue is full (answered 503 + Retry-After)."""


class ImageURL(BaseModel):
    url: str = Field(description="data:image/...;base64,..., file:// under an allowed folder, or http(s) when enabled")
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoFrames(BaseModel):
    frames: list[str] = Field(min_length=1, description="the video's frames in order, each an image URL as in "
                                                        "image_url (decode the video on the client)")


class VideoPart(BaseModel):
    """Extension for VILA-family models: a video as a list of frames."""
    type: Literal["video"]
    video: VideoFrames


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text | list[ContentPart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating past EOS up to max_tokens")

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(max_new_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
                              temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=tuple(stop),
                              ignore_eos=self.ignore_eos)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] = Field(default_factory=dict, description="cached_tokens: prefix-cache hits")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


def usage_of(out: RequestOutput) -> Usage:
    """Usage from the last engine output of a request."""
    return Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                 total_tokens=out.prompt_tokens + out.completion_tokens,
                 prompt_tokens_details={"cached_tokens": out.cached_tokens})


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlm-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
