"""The API's schema: requests (`requests.py`) and responses (`responses.py`)."""

from .requests import (ChatCompletionRequest, ChatMessage, CompletionRequest, ContentPart, DetokenizeRequest,
                       FieldError, ImagePart, ImageURL, ResponsesRequest, StreamOptions, TextPart, TokenizeRequest,
                       VideoPart)
from .responses import (AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChoiceLogprobs, ChunkChoice,
                        Completion, CompletionChoice, CompletionLogprobs, Delta, DetokenizeResponse, ErrorDetail,
                        ErrorResponse, FunctionCall, Health, ModelCard, ModelList, PromptLogprob, ResponseObject,
                        ResponseOutputMessage, ResponseOutputText, ResponseUsage, TokenizeResponse,
                        TokenLogprob, ToolCall, ToolCallDelta, TopLogprob, Usage, Version, usage_of)

__all__ = [
    "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "ContentPart", "DetokenizeRequest", "FieldError",
    "ImagePart", "ImageURL", "ResponsesRequest", "ResponseObject", "ResponseOutputMessage", "ResponseOutputText",
    "ResponseUsage", "StreamOptions", "TextPart", "TokenizeRequest", "VideoPart", "AssistantMessage",
    "ChatCompletion", "ChatCompletionChunk", "Choice", "ChoiceLogprobs", "ChunkChoice", "Completion",
    "CompletionChoice", "CompletionLogprobs", "Delta", "DetokenizeResponse", "ErrorDetail", "ErrorResponse",
    "FunctionCall", "Health", "ModelCard", "ModelList", "PromptLogprob", "TokenizeResponse", "TokenLogprob",
    "ToolCall", "ToolCallDelta", "TopLogprob", "Usage", "Version", "usage_of",
]
