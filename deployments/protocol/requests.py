"""OpenAI-compatible requests (pydantic): chat and text completions with vLLM's extensions, tokenize
and detokenize. Every field OpenAI or vLLM defines that is not served is refused by name (`refusal`);
fields neither defines are reported (`unknown_fields`) and ignored."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from vlm_core.engine.params import MAX_LOGPROBS, MAX_N, SamplingParams, StructuredOutput


class FieldError(ValueError):
    """A request field (or combination) this server cannot honour: the field and why."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def _unicode(text: str) -> str:
    """JSON can carry lone UTF-16 surrogates ("\\ud800"), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text holds an unpaired surrogate {text[e.start]!r} at character {e.start}; send valid "
                         f"Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class ImageURL(BaseModel):
    url: str = Field(description="data:image/...;base64,..., file:// under an allowed folder, or http(s) when enabled")
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | None = None
    uuid: str | None = Field(None, min_length=1, max_length=128, description=(
        "extension (vLLM): a name for this picture; a later request may send the uuid without image_url to "
        "reuse it (no upload, decode or encode), while this server remembers it"))

    @model_validator(mode="after")
    def _url_or_uuid(self):
        if self.image_url is None and self.uuid is None:
            raise ValueError("an image part needs image_url, or the uuid of a picture sent before")
        return self


class VideoFrames(BaseModel):
    frames: list[str] = Field(min_length=1, description="the video's frames in order, each an image URL as in "
                                                        "image_url (decode the video on the client)")


class VideoPart(BaseModel):
    """Extension for VILA-family models: a video as a list of frames."""
    type: Literal["video"]
    video: VideoFrames


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class CalledFunction(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class HistoryToolCall(BaseModel):
    """A tool call of an earlier assistant turn, as the answer that made it carried it."""
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="'developer' is OpenAI's newer name for a system message and is treated as one; 'tool' carries "
                    "a tool's result back (tool_call_id names the call)")
    content: Text | list[ContentPart] | None = None
    tool_calls: list[HistoryToolCall] | None = Field(None, description="an assistant turn's tool calls")
    tool_call_id: str | None = None
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, role: str) -> str:
        return "system" if role == "developer" else role

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message carries tool_calls")
        if self.role == "tool" and not isinstance(self.content, str) and any(p.type != "text" for p in self.content):
            raise ValueError("a tool message's content is text")
        return self

    def history_text(self) -> str | list | None:
        """This message as a turn of the conversation the model sees: an assistant's tool calls
        appended as the JSON each call was generated as (`{"name", "arguments"}`), a tool's result as
        a user turn that names the call (the fallback for templates without tool roles)."""
        if self.role == "tool":
            text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
            called = self.name or self.tool_call_id
            return f"Result of tool call {called}: {text}" if called else f"Tool result: {text}"
        if not self.tool_calls:
            return self.content
        calls = "\n".join(json.dumps({"name": c.function.name, "arguments": _json_or_text(c.function.arguments)})
                          for c in self.tool_calls)
        if not self.content:
            return calls
        return self.content + "\n" + calls if isinstance(self.content, str) else \
            [*self.content, TextPart(type="text", text="\n" + calls)]


def _json_or_text(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="extension: usage in every streamed chunk")


# OpenAI chat-completions fields not served here: refused with a 400 naming them when set (to
# anything but their neutral value), never silently ignored.
_REFUSED = {
    "audio": "audio output is not supported",
    "modalities": "only text output is supported (modalities: ['text'])",
    "prediction": "predicted outputs are not supported",
    "functions": "functions (function calling) are not supported",
    "function_call": "functions (function calling) are not supported",
    "reasoning_effort": "this model does not reason; reasoning_effort is not supported",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
}


# vLLM's extension fields not served here: refused the same way (their neutral values pass).
_REFUSED.update({
    "use_beam_search": "beam search is not supported (use n for several sampled answers)",
    "length_penalty": "length_penalty applies to beam search, which is not supported",
    "bad_words": "bad_words is not supported (logit_bias can ban single tokens)",
    "include_stop_str_in_output": "include_stop_str_in_output is not supported: a stop string is never part of "
                                  "the answer",
    "skip_special_tokens": "skip_special_tokens: false is not supported: special tokens are never in the text",
    "spaces_between_special_tokens": "spaces_between_special_tokens: false is not supported",
    "truncate_prompt_tokens": "truncate_prompt_tokens is not supported: a prompt longer than the context is refused",
    "continue_final_message": "continue_final_message is not supported: the answer always starts a new assistant "
                              "turn",
    "add_generation_prompt": "add_generation_prompt: false is not supported",
    "chat_template": "a request's own chat_template is not supported: the model's template renders every prompt",
    "chat_template_kwargs": "chat_template_kwargs are not supported",
    "mm_processor_kwargs": "mm_processor_kwargs are not supported: pictures are cut as the model's config says",
    "documents": "documents (retrieval-augmented templates) are not supported",
    "guided_whitespace_pattern": "guided_whitespace_pattern is not supported: JSON output is compact",
    "guided_decoding_backend": "guided_decoding_backend is not selectable: structured output uses xgrammar",
    "return_token_ids": "return_token_ids is not supported (logprobs carry the tokens)",
    "return_tokens_as_token_ids": "return_tokens_as_token_ids is not supported",
    "logits_processors": "custom logits_processors are not supported",
    "kv_transfer_params": "kv_transfer_params (disaggregated prefill) are not supported",
    "vllm_xargs": "vllm_xargs are not supported",
})

def first_refused(body: BaseModel, refused: dict[str, str], neutral: dict[str, tuple]) -> tuple[str, str] | None:
    """(field, why) for the first of `refused` that the request sets to anything but a neutral value."""
    for name, why in refused.items():
        value = getattr(body, name, None)
        if value is not None and value not in neutral.get(name, ()):
            return name, why
    return None


_NEUTRAL = {"modalities": (["text"],), "use_beam_search": (False,), "length_penalty": (1.0,),
            "bad_words": ([],), "include_stop_str_in_output": (False,), "skip_special_tokens": (True,),
            "spaces_between_special_tokens": (True,), "continue_final_message": (False,),
            "add_generation_prompt": (True,), "chat_template_kwargs": ({},), "mm_processor_kwargs": ({},),
            "return_token_ids": (False,), "return_tokens_as_token_ids": (False,)}


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, any JSON object, or JSON following a schema."""
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs extension: exactly one of its fields."""
    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[Text] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None


def _structured(kind: str, value) -> StructuredOutput:
    if kind == "json":
        return StructuredOutput("json_schema", value if isinstance(value, str) else json.dumps(value))
    if kind == "choice":
        return StructuredOutput("choice", json.dumps(list(value)))
    if kind == "json_object":
        return StructuredOutput("json_object")
    return StructuredOutput(kind, value)


class _GenerationRequest(BaseModel):
    """Fields chat and text completions share: sampling, streaming, vLLM's extensions, and the
    fields OpenAI defines that are refused here by name."""

    model_config = ConfigDict(extra="allow")

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 63 - 1, description="a 64-bit signed integer, as "
                                                                             "OpenAI and vLLM take it")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N, description="choices, generated from one prefill of the prompt")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    user: str | None = Field(None, description="an end-user id; accepted, no effect on the answer")
    # vLLM's extensions
    top_k: int = Field(0, ge=-1, description="extension: keep the k most likely tokens (0 or -1: all)")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="extension (vLLM): drop tokens below min_p x the most "
                                                          "likely one's probability (after temperature)")
    allowed_token_ids: list[int] | None = Field(None, min_length=1, max_length=100_000,
                                                description="extension (vLLM): only these tokens may be produced")
    min_tokens: int = Field(0, ge=0, description="extension: EOS and stop_token_ids held back until this many")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="extension: transformers' repetition "
                                                                       "penalty over prompt and output")
    stop_token_ids: list[int] | None = Field(None, description="extension: token ids that end the answer")
    ignore_eos: bool = Field(False, description="extension: keep generating past EOS up to max_tokens")
    request_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$",
                                   description="extension (vLLM): the request's id (the answer's `id`; also taken "
                                               "from an X-Request-Id header); two at once with one id: 400")
    cache_salt: str | None = Field(None, min_length=1, max_length=256,
                                   description="extension (vLLM): prefix-cache blocks are shared only between "
                                               "requests with the same salt (tenants kept apart)")
    priority: int = Field(0, ge=-2 ** 31, le=2 ** 31 - 1,
                          description="extension (vLLM): lower is admitted first and preempted last; equal "
                                      "priorities keep arrival order")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                        description="extension (vLLM): each prompt token's log-probability, rank "
                                                    "and the k most likely tokens at its position; not with stream")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(None, description="extension (vLLM): json, regex, choice "
                                                                           "or grammar (EBNF)")
    guided_json: dict[str, Any] | str | None = Field(None, description="extension (vLLM, older name)")
    guided_regex: str | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: str | None = None

    def refusal(self) -> tuple[str, str] | None:
        """(field, why) for the first field set that is not served, or a combination that is invalid."""
        found = first_refused(self, _REFUSED, _NEUTRAL)
        if found is not None:
            return found
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed with stream: true"
        if self.prompt_logprobs is not None and self.stream:
            return "prompt_logprobs", "prompt_logprobs are not available with stream: true"
        if self.min_tokens > self.max_new_tokens_or(None):
            return "min_tokens", "min_tokens exceeds max_tokens"
        for key in self.logit_bias or {}:
            if not re.fullmatch(r"-?[0-9]{1,10}", key):
                return "logit_bias", f"logit_bias keys are token ids; got {key!r}"
        try:
            self.structured()
        except FieldError as e:
            return e.field, e.message
        return None

    def structured(self) -> StructuredOutput | None:
        """The output's grammar, from response_format or the extensions (at most one of them)."""
        found = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", StructuredOutput("json_object")))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise FieldError("response_format", "response_format of type json_schema needs json_schema.schema")
            found.append(("response_format", StructuredOutput("json_schema", json.dumps(rf.json_schema.schema_))))
        so = self.structured_outputs
        if so is not None:
            given = [(k, v) for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                         ("grammar", so.grammar), ("json_object", so.json_object)) if v]
            if len(given) != 1:
                raise FieldError("structured_outputs", "structured_outputs takes exactly one of json, regex, choice, "
                                                       "grammar, json_object")
            k, v = given[0]
            found.append(("structured_outputs", _structured(k, v)))
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                found.append((name, _structured(kind, getattr(self, name))))
        if len(found) > 1:
            raise FieldError(found[1][0], f"{found[1][0]} and {found[0][0]} both constrain the output; give one")
        return found[0][1] if found else None

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def max_new_tokens_or(self, default: int | None) -> int:
        given = self.requested_max_tokens()
        return given if given is not None else (default if default is not None else 2 ** 31)

    def num_logprobs(self) -> int | None:
        return None

    def num_prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_new_tokens=self.max_new_tokens_or(default_max_tokens), temperature=self.temperature,
            top_p=self.top_p, top_k=max(0, self.top_k), seed=self.seed, stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, min_tokens=self.min_tokens,
            logit_bias=tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
            logprobs=self.num_logprobs(), prompt_logprobs=self.num_prompt_logprobs(), n=self.n,
            structured=self.structured(), min_p=self.min_p,
            allowed_token_ids=tuple(self.allowed_token_ids) if self.allowed_token_ids else None)


class ChatCompletionRequest(_GenerationRequest):
    """OpenAI's chat-completions request. Every OpenAI field is honoured or refused (`refusal()`);
    vLLM's extensions `top_k`, `min_tokens`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`
    and `stream_options.continuous_usage_stats` are honoured; other fields are ignored with a
    logged warning (`unknown_fields()`)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    safety_identifier: str | None = Field(None, description="accepted, no effect on the answer")
    prompt_cache_key: str | None = Field(None, description="accepted; prefix caching is automatic")
    metadata: dict[str, str] | None = Field(None, description="accepted, not stored")
    store: bool | None = Field(None, description="only false: nothing is stored")
    service_tier: Literal["auto", "default"] | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="'required' or a named function: the answer is a call whose arguments follow the "
                          "function's schema; 'auto' (or tools without tool_choice) needs the server's "
                          "ingress.tool_parser, which reads the calls the model writes")
    parallel_tool_calls: bool | None = Field(None, description="at most one call per answer either way")
    # declared so that they can be refused by name (see _REFUSED)
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    functions: Any = None
    function_call: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    def refusal(self) -> tuple[str, str] | None:
        found = super().refusal()
        if found is not None:
            return found
        if self.store:
            return "store", "store: true is not supported; nothing is stored"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            return "tool_choice", "tool_choice needs tools"
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
                t.function.name for t in self.tools or ()}:
            return "tool_choice", f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools"
        return None

    def may_call_tool(self) -> bool:
        """Tools given and the model left to decide (tool_choice auto, or none given)."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    def calls_tool(self) -> bool:
        return bool(self.tools) and self.tool_choice not in (None, "none", "auto")

    def structured(self) -> StructuredOutput | None:
        """A forced tool call's grammar: the named function's parameters, or for 'required' an object
        {"name": one of the tools, "arguments": that tool's parameters}."""
        if not self.calls_tool():
            return super().structured()
        if self.response_format is not None and self.response_format.type != "text" or self.structured_outputs:
            raise FieldError("tool_choice", "a forced tool call and response_format / structured_outputs both "
                                            "constrain the output; give one")
        if isinstance(self.tool_choice, NamedToolChoice):
            tool = next((t for t in self.tools if t.function.name == self.tool_choice.function.name), None)
            if tool is None:
                raise FieldError("tool_choice", f"tool_choice names {self.tool_choice.function.name!r}, which is "
                                                f"not among the tools")
            return StructuredOutput("json_schema", json.dumps(tool.function.parameters))
        return StructuredOutput("json_schema", json.dumps({"anyOf": [
            {"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters},
             "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]}))

    def tool_call_of(self, text: str) -> tuple[str, str] | None:
        """(function name, arguments as JSON text) of a finished forced call's output."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name, text
        try:
            call = json.loads(text)
            return call["name"], json.dumps(call["arguments"])
        except (ValueError, KeyError, TypeError):
            return None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_GenerationRequest):
    """OpenAI's (legacy) text-completions request: a text prompt (or its token ids), no chat template."""

    prompt: Text | list[int] | list[Text] | list[list[int]] = Field(
        description="the text or its token ids, or a list of either: each prompt gets its n choices, numbered "
                    "prompt by prompt (index = prompt * n + choice)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="log-probabilities of this many most "
                                                                          "likely tokens per position")
    echo: bool = Field(False, description="the prompt's text before the completion")
    suffix: Any = None
    best_of: int | None = Field(None, ge=1)

    def refusal(self) -> tuple[str, str] | None:
        found = super().refusal()
        if found is not None:
            return found
        if self.suffix is not None:
            return "suffix", "suffix (insertion) is not supported"
        if self.best_of is not None and self.best_of > 1:
            return "best_of", "best_of > 1 is not supported"
        if isinstance(self.prompt, (list, str)) and len(self.prompt) == 0 or any(len(p) == 0 for p in self.prompts()):
            return "prompt", "the prompt is empty"
        return None

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one text or id list, or each of a list of them."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            return list(self.prompt)
        return [self.prompt]

    def text_or_ids(self) -> str | list[int]:
        """The first prompt (the only one, for most requests)."""
        return self.prompts()[0]

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def num_prompt_logprobs(self) -> int | None:
        """echo with logprobs scores the echoed prompt too (as many top entries as `logprobs`)."""
        if self.echo and self.logprobs is not None:
            return max(self.logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a text prompt, or chat messages (text parts) rendered with the template."""
    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = Field(True, description="BOS for a text prompt (the template decides for messages)")
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    tokens: list[int]


# ---- /v1/responses ----------------------------------------------------------------------------

class ResponseInputText(BaseModel):
    type: Literal["input_text", "output_text"]
    text: Text


class ResponseInputImage(BaseModel):
    type: Literal["input_image"]
    image_url: str | None = Field(None, description="a data: URL, file:// or http(s) as for image_url parts")
    detail: str | None = None
    file_id: str | None = None


ResponseContent = Annotated[Union[ResponseInputText, ResponseInputImage], Field(discriminator="type")]


class ResponseInputMessage(BaseModel):
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ResponseContent]


class ResponseTextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseTextConfig(BaseModel):
    format: ResponseTextFormat | None = None
    verbosity: str | None = None


# Responses-API fields not served: refused by name (stateless; no tools, reasoning or background runs)
_RESPONSES_REFUSED = {
    "previous_response_id": "previous_response_id is not supported: nothing is stored; send the conversation as input",
    "conversation": "conversations are not stored here; send the conversation as input",
    "tools": "tools are not supported on /v1/responses (use /v1/chat/completions)",
    "reasoning": "this model does not reason; reasoning is not supported",
    "background": "background responses are not supported",
    "include": "include is not supported",
    "prompt": "stored prompts are not supported",
    "max_tool_calls": "tools are not supported on /v1/responses",
}
_RESPONSES_NEUTRAL = {"include": ([],), "background": (False,), "tools": ([],)}


class ResponsesRequest(BaseModel):
    """OpenAI's Responses API, stateless: text and image input, instructions, sampling, text.format."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: Text | None = None
    input: Text | list[ResponseInputMessage]
    instructions: Text | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    store: bool | None = Field(None, description="only false (or left out): nothing is stored")
    text: ResponseTextConfig | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["disabled", "auto"] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    # the fields of _RESPONSES_REFUSED arrive as extras and are refused by name

    def refusal(self) -> tuple[str, str] | None:
        found = first_refused(self, _RESPONSES_REFUSED, _RESPONSES_NEUTRAL)
        if found is not None:
            return found
        if self.store:
            return "store", "store: true is not supported; nothing is stored (send store: false)"
        if self.tool_choice not in (None, "none"):
            return "tool_choice", "tools are not supported on /v1/responses"
        if self.truncation == "auto":
            return "truncation", "truncation 'auto' is not supported: a prompt longer than the context is refused"
        return None

    def unknown_fields(self) -> list[str]:
        return sorted(set(self.model_extra or {}) - set(_RESPONSES_REFUSED))

    def as_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion (what serves it)."""
        messages: list[dict] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [ResponseInputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for m in items:
            if isinstance(m.content, str):
                messages.append({"role": m.role, "content": m.content})
                continue
            parts = []
            for p in m.content:
                if p.type == "input_image":
                    if p.image_url is None:
                        raise FieldError("input", "an input_image needs image_url (file_id is not supported)")
                    parts.append({"type": "image_url", "image_url": {"url": p.image_url, "detail": p.detail}})
                else:
                    parts.append({"type": "text", "text": p.text})
            messages.append({"role": m.role, "content": parts})
        fmt = self.text.format if self.text is not None else None
        response_format = None
        if fmt is not None and fmt.type == "json_object":
            response_format = {"type": "json_object"}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.schema_ is None:
                raise FieldError("text", "text.format of type json_schema needs schema")
            response_format = {"type": "json_schema", "json_schema": {"name": fmt.name or "output",
                                                                      "schema": fmt.schema_, "strict": fmt.strict}}
        return ChatCompletionRequest(model=self.model, messages=messages, max_tokens=self.max_output_tokens,
                                     temperature=self.temperature, top_p=self.top_p, stream=self.stream,
                                     response_format=response_format,
                                     stream_options={"include_usage": True} if self.stream else None)
