"""OpenAI-compatible responses (pydantic): completions, chat completions and their streamed chunks,
usage, logprobs, errors, models, tokenize / detokenize answers."""

from __future__ import annotations

from typing import Iterable, Literal

from pydantic import BaseModel, Field

from vlm_core.engine.request import RequestOutput


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, server_overloaded, server_error")
    param: str | None = None
    code: int = Field(description="the HTTP status")


class ErrorResponse(BaseModel):
    """Every error answer, in OpenAI's shape."""
    error: ErrorDetail


class _Answer(BaseModel):
    """What every answer (whole or streamed chunk) starts with."""
    id: str
    created: int
    model: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] = Field(default_factory=dict, description="cached_tokens: prefix-cache hits")


class CompletionLogprobs(BaseModel):
    """With echo, the prompt's tokens come first; its first token has no log-probability (None)."""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's entry of `prompt_logprobs`: one token at one prompt position."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's shape: per prompt position, None for the first, then token id (as a string) -> entry
# for the prompt's token and the k most likely there
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class Completion(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class Version(BaseModel):
    version: str


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None


class ToolCallDelta(ToolCall):
    index: int = 0


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


def usage_of(outs: RequestOutput | Iterable[RequestOutput]) -> Usage:
    """Usage from the latest engine output of each of a request's choices: the prompt counted once
    (its cached tokens as choice 0 found them), the completion tokens of every choice summed."""
    outs = [outs] if isinstance(outs, RequestOutput) else sorted(outs, key=lambda o: o.index)
    completion = sum(o.completion_tokens for o in outs)
    return Usage(prompt_tokens=outs[0].prompt_tokens, completion_tokens=completion,
                 total_tokens=outs[0].prompt_tokens + completion,
                 prompt_tokens_details={"cached_tokens": outs[0].cached_tokens})


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


# ---- /v1/responses ----------------------------------------------------------------------------

class ResponseOutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = Field(default_factory=list)
    logprobs: list = Field(default_factory=list)


class ResponseOutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[ResponseOutputText]


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=dict)
    output_tokens: int
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int


class ResponseObject(BaseModel):
    """A Responses-API answer (stateless: `store` false, nothing kept)."""
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    model: str
    output: list[ResponseOutputMessage]
    usage: ResponseUsage | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: dict = Field(default_factory=lambda: {"format": {"type": "text"}})
    incomplete_details: dict | None = None
    error: dict | None = None
    parallel_tool_calls: bool = False
    tool_choice: str = "none"
    tools: list = Field(default_factory=list)
    store: bool = False
    metadata: dict = Field(default_factory=dict)
