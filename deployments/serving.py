"""The OpenAI serving layer: chat and text completions over a vision client and an LLM client (no Ray).

    serving = OpenAIServing(processor, IngressSettings(...), vision, llm)
    answer = await serving.chat(ChatCompletionRequest(...))              # ChatCompletion
    async for chunk in serving.chat_stream(body, include_usage=True): ...
    await serving.complete(CompletionRequest(...)); serving.complete_stream(body)
    serving.tokenize(body), serving.detokenize(body), serving.models(), serving.model_card(name)

A request goes: `RequestPreparer` (checks, media, prompt, sampling) -> `vision.encode(items,
hashes)` (returns once the embeddings exist, as a handle the LLM client passes on) ->
`LLMStream` over `llm.generate(request_id, request, embeds)` (continued on another replica when
one dies, if the rest can be continued exactly) -> `outputs()`, the one loop that consumes a
stream, cancels it when the consumer stops early and maps errors -> `answers` shapes the response.
Every error leaves as an `APIError` (`errors.py`). The Serve deployment (`ingress.py`) supplies
clients over deployment handles; tests supply plain Python ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import dataclasses
import logging
import time
import uuid
from typing import Any, AsyncIterator, Protocol, Sequence

from vlm_core.engine.request import EngineRequest, RequestOutput, merge_outputs
from vlm_core.inputs.placeholders import MultimodalPrompt

from . import answers
from .errors import APIError, api_error_of, api_errors, is_replica_death
from .preparation import RequestPreparer
from .protocol import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChunkChoice, Completion,
                       CompletionChoice, CompletionRequest, Delta, DetokenizeRequest, DetokenizeResponse, FieldError,
                       ModelCard, ModelList, ResponseObject, ResponseOutputMessage, ResponseOutputText,
                       ResponsesRequest, ResponseUsage, TokenizeRequest, TokenizeResponse, ToolCallDelta, Usage,
                       usage_of)
from .settings import IngressSettings

log = logging.getLogger("ray.serve")


class OutputStream(Protocol):
    """One request's `RequestOutput` deltas; `cancel()` aborts the request where it runs."""

    def __aiter__(self) -> "OutputStream": ...

    async def __anext__(self) -> RequestOutput: ...

    def cancel(self) -> None: ...


class VisionClient(Protocol):
    async def encode(self, items: Sequence[Any], hashes: Sequence[str]) -> Any:
        """Returns once the items' embeddings are computed: a value the LLM client hands on."""


class LLMClient(Protocol):
    def generate(self, request_id: str, request: EngineRequest, embeds: Any) -> OutputStream: ...


def summed(usages: Sequence[Usage]) -> Usage:
    """The usage of several prompts' requests together."""
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details={"cached_tokens": sum(u.prompt_tokens_details.get("cached_tokens", 0)
                                                             for u in usages)})


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


async def merged(streams: Sequence[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """(k, item) from each of `streams` as items come; a failure in any ends the whole."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(k, it):
        try:
            async for item in it:
                await queue.put((k, item))
            await queue.put((k, done))
        except BaseException as e:        # handed to the consumer, which raises it
            await queue.put((k, e))

    tasks = [asyncio.create_task(pump(k, it)) for k, it in enumerate(streams)]
    try:
        open_ = len(streams)
        while open_:
            k, item = await queue.get()
            if item is done:
                open_ -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)     # no stream is mid-read when it is closed


def new_request_id(kind: str = "chatcmpl") -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def continues_exactly(params) -> bool:
    """Whether a request cut off after some tokens can go on elsewhere from those tokens as a longer
    prompt and produce what it would have: one choice, and nothing that depends on which tokens
    were generated rather than given (a grammar's state, penalties on generated tokens, a stop
    string that may straddle the cut, a seeded sample stream)."""
    return (params.n == 1 and params.structured is None and not params.stop and params.presence_penalty == 0
            and params.frequency_penalty == 0 and (params.seed is None or params.temperature == 0))


class LLMStream:
    """One request's output stream from the LLM client that survives the death of the replica
    serving it (`errors.is_replica_death`): before its first output the request is sent again as it
    was; after, if `continues_exactly`, its prompt and the tokens produced so far go to another
    replica as the prompt of the rest (max_tokens and min_tokens reduced), and the outputs go on
    with the request's own counts. Otherwise, or after `attempts` deaths, the error is raised."""

    attempts = 3

    def __init__(self, llm: LLMClient, rid: str, request: EngineRequest, embeds):
        self.llm, self.rid, self.request, self.embeds = llm, rid, request, embeds
        self.produced: list[int] = []      # tokens already streamed out
        self.offset = 0                    # of those, made by earlier replicas
        self.cached: int | None = None     # the request's prefix-cache hit, as first reported
        self.failures = 0
        self.open_choices = request.params.n
        self.closed = False
        self.stream = self._open()

    def _open(self) -> OutputStream:
        request = self.request
        if self.produced:
            p, done = request.params, len(self.produced)
            request = dataclasses.replace(
                request, prompt=MultimodalPrompt(request.prompt.token_ids + tuple(self.produced), request.prompt.spans),
                params=dataclasses.replace(p, max_new_tokens=p.max_new_tokens - done,
                                           min_tokens=max(0, p.min_tokens - done), prompt_logprobs=None))
        self.offset = len(self.produced)
        return self.llm.generate(self.rid, request, self.embeds)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            try:
                out = await anext(self.stream)
                break
            except Exception as e:
                if not is_replica_death(e):
                    raise
                if self.open_choices == 0:         # died after its last output: nothing is missing
                    raise StopAsyncIteration from None
                self.failures += 1
                if self.failures >= self.attempts or (self.produced and not continues_exactly(self.request.params)):
                    raise
                log.warning("request %s: its LLM replica died after %d tokens; continuing on another",
                            self.rid, len(self.produced))
                await asyncio.sleep(0.1 * self.failures)      # the routers learn of the death meanwhile
                self.stream = self._open()
        self.produced += out.token_ids
        self.open_choices -= out.finish_reason is not None
        if self.cached is None:
            self.cached = out.cached_tokens
        if self.offset:
            out = dataclasses.replace(out, prompt_tokens=len(self.request.prompt.token_ids), cached_tokens=self.cached,
                                      completion_tokens=out.completion_tokens + self.offset)
        return out

    def cancel(self) -> None:
        self.stream.cancel()

    def close(self) -> None:
        """Cancel the request unless every choice has finished (once)."""
        if self.open_choices > 0 and not self.closed:
            self.closed = True
            self.cancel()


class OpenAIServing:
    def __init__(self, processor, settings: IngressSettings, vision: VisionClient, llm: LLMClient):
        self.processor, self.settings, self.vision, self.llm = processor, settings, vision, llm
        self.prepare = RequestPreparer(processor, settings)
        self.tokenizer = processor.tokenizer
        self.model_name = settings.model_name
        self.created = int(time.time())

    def errors(self, rid: str | None = None):
        return api_errors(self.settings.retry_after_s, rid)

    # ---- submitting and consuming -----------------------------------------------------------

    async def submit(self, prompt: MultimodalPrompt, items, sampling, rid: str, priority: int = 0,
                     cache_salt: str | None = None) -> tuple[LLMStream, RequestOutput]:
        """Send the media to the vision client and the request to the LLM client; returns once the
        engine has accepted it (its first output in hand)."""
        # with a cache salt the pictures' keys are the tenant's own too: encoder cache and routing
        hashes = [it.hash if not cache_salt else
                  hashlib.blake2b(f"{cache_salt}\0{it.hash}".encode(), digest_size=16).hexdigest() for it in items]
        embeds = await self.vision.encode(items, hashes) if hashes else None
        request = EngineRequest(prompt, (), sampling, tuple(hashes), priority, cache_salt)
        stream = LLMStream(self.llm, rid, request, embeds)
        return stream, await anext(stream)    # raises when not admitted (queue full, invalid)

    async def _start_chat(self, body: ChatCompletionRequest, rid: str):
        with self.errors(rid):
            prompt, items, sampling = await self.prepare.chat(body)
            return await self.submit(prompt, items, sampling, rid, body.priority, body.cache_salt)

    async def _start_text(self, body: CompletionRequest, rid: str) -> list[tuple[Any, Any, LLMStream, RequestOutput]]:
        """Every prompt of a text completion prepared (all checked before any is sent), then each
        sent: [(given prompt, prompt, stream, first output)], streams named rid, rid-1, rid-2, ..."""
        started: list = []
        try:
            with self.errors(rid):
                prepared = await self.prepare.text(body)
                for k, (given, prompt, sampling) in enumerate(prepared):
                    stream, first = await self.submit(prompt, [], sampling, rid if k == 0 else f"{rid}-{k}",
                                                      body.priority, body.cache_salt)
                    started.append((given, prompt, stream, first))
        except BaseException:
            for *_, stream, _ in started:
                stream.close()
            raise
        return started

    async def outputs(self, stream: LLMStream, first: RequestOutput, rid: str) -> AsyncIterator[RequestOutput]:
        """The stream's outputs from `first` on. A failure cancels the request and leaves as an
        APIError; a consumer that stops early (closes, disconnects, is cancelled) cancels it too."""
        out = first
        try:
            while out is not None:
                yield out
                out = await anext(stream, None)
        except Exception as e:
            raise api_error_of(e, self.settings.retry_after_s, rid) from None
        finally:
            stream.close()

    @contextlib.asynccontextmanager
    async def _consuming(self, stream: LLMStream, first: RequestOutput, rid: str):
        """`outputs()` for a block that may stop before iterating it (a streamed answer's opening
        chunks): leaving the block, however, closes the request."""
        outs = self.outputs(stream, first, rid)
        try:
            yield outs
        finally:
            await outs.aclose()
            stream.close()

    async def _gather(self, stream, first, rid: str) -> dict[int, RequestOutput]:
        """Every choice's whole output (deltas merged), by index."""
        merged: dict[int, RequestOutput] = {}
        async with self._consuming(stream, first, rid) as outs:
            async for out in outs:
                merged[out.index] = merge_outputs(merged[out.index], out) if out.index in merged else out
        return dict(sorted(merged.items()))

    # ---- chat ---------------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest) -> ChatCompletion:
        """One chat completion (n choices). Errors are raised as `APIError`."""
        rid = body.request_id or new_request_id()
        stream, first = await self._start_chat(body, rid)
        outs = await self._gather(stream, first, rid)
        choices = []
        for i, o in outs.items():
            message, finish = answers.assistant_message(body, o.text, o.finish_reason, self.settings.tool_parser)
            choices.append(Choice(index=i, message=message, finish_reason=finish,
                                  logprobs=answers.chat_logprobs(self.tokenizer, o.logprobs or [])
                                  if body.logprobs else None))
        return ChatCompletion(id=rid, created=int(time.time()), model=self.model_name, usage=usage_of(outs.values()),
                              choices=choices, prompt_logprobs=answers.prompt_logprobs(self.tokenizer, outs[0]))

    async def chat_stream(self, body: ChatCompletionRequest, include_usage: bool = True,
                          request_id: str | None = None) -> AsyncIterator[ChatCompletionChunk]:
        """Streamed chat completion chunks, each for one choice (`index`). Closing the stream early
        aborts the request in the engine."""
        rid = body.request_id or request_id or new_request_id()
        stream, first = await self._start_chat(body, rid)
        created = int(time.time())
        every = bool(body.stream_options and body.stream_options.continuous_usage_stats)

        def chunk(delta: Delta, index=0, finish=None, usage=None, choices=True, logprobs=None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=self.model_name, usage=usage,
                                       choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish,
                                                            logprobs=logprobs)] if choices else [])

        latest: dict[int, RequestOutput] = {}
        # a forced tool call (or, with a tool parser, an answer that may hold calls) goes out whole, as
        # the choice's last delta
        tool = body.calls_tool() or (body.may_call_tool() and self.settings.tool_parser != "none")
        texts: dict[int, str] = {}
        async with self._consuming(stream, first, rid) as outs:
            opening = Usage(prompt_tokens=first.prompt_tokens, completion_tokens=0, total_tokens=first.prompt_tokens,
                            prompt_tokens_details={"cached_tokens": first.cached_tokens}) if every else None
            for i in range(body.n):
                yield chunk(Delta(role="assistant", content=None if tool else ""), i, usage=opening)
            async for out in outs:
                latest[out.index] = out
                usage = usage_of(latest.values()) if every else None
                lp = answers.chat_logprobs(self.tokenizer, out.logprobs or []) if body.logprobs else None
                if tool:
                    texts[out.index] = texts.get(out.index, "") + out.text
                    if out.finish_reason is not None:
                        message, finish = answers.assistant_message(body, texts[out.index], out.finish_reason,
                                                                    self.settings.tool_parser)
                        calls = [ToolCallDelta(index=j, **c.model_dump()) for j, c in enumerate(message.tool_calls or ())]
                        yield chunk(Delta(content=message.content, tool_calls=calls or None), out.index, finish,
                                    usage=usage, logprobs=lp)
                    elif out.logprobs:
                        yield chunk(Delta(), out.index, usage=usage, logprobs=lp)
                elif out.text or out.finish_reason or out.logprobs:
                    yield chunk(Delta(content=out.text or None), out.index, out.finish_reason, usage=usage, logprobs=lp)
        if include_usage and latest:
            yield chunk(Delta(), usage=usage_of(latest.values()), choices=False)

    # ---- text completions -------------------------------------------------------------------

    async def complete(self, body: CompletionRequest) -> Completion:
        """One text completion (n choices per prompt; no chat template)."""
        rid = body.request_id or new_request_id("cmpl")
        started = await self._start_text(body, rid)
        gathered = await asyncio.gather(*(self._gather(stream, first, rid) for _, _, stream, first in started))
        choices, usages = [], []
        for k, ((given, prompt, _, _), outs) in enumerate(zip(started, gathered)):
            echo = answers.echo_text(self.tokenizer, given, prompt) if body.echo else ""
            echoed = answers.echo_logprobs(body, prompt, outs[0].prompt_logprobs)
            scored = answers.prompt_logprobs(self.tokenizer, outs[0]) if body.prompt_logprobs is not None else None
            usages.append(usage_of(outs.values()))
            choices += [CompletionChoice(index=k * body.n + i, text=echo + o.text, finish_reason=o.finish_reason,
                                         logprobs=answers.completion_logprobs(self.tokenizer, o.logprobs or [],
                                                                              body.logprobs, echoed)
                                         if body.logprobs is not None else None, prompt_logprobs=scored)
                        for i, o in outs.items()]
        return Completion(id=rid, created=int(time.time()), model=self.model_name, usage=summed(usages),
                          choices=choices)

    async def complete_stream(self, body: CompletionRequest, request_id: str | None = None
                              ) -> AsyncIterator[Completion]:
        """Streamed text-completion chunks; with several prompts their chunks interleave as they
        come, each choice numbered prompt * n + choice."""
        rid = body.request_id or request_id or new_request_id("cmpl")
        started = await self._start_text(body, rid)
        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        every = bool(body.stream_options and body.stream_options.continuous_usage_stats)

        def chunk(text: str, index=0, out=None, usage=None, choices=True, lp=None) -> Completion:
            if out is not None and body.logprobs is not None:
                lp = answers.completion_logprobs(self.tokenizer, out.logprobs or [], body.logprobs)
            return Completion(id=rid, created=created, model=self.model_name, usage=usage,
                              choices=[CompletionChoice(index=index, text=text, logprobs=lp,
                                                        finish_reason=out.finish_reason if out else None)]
                              if choices else [])

        latest: dict[tuple[int, int], RequestOutput] = {}

        def usage_now() -> Usage:
            return summed([usage_of([o for (k, _), o in latest.items() if k == p])
                           for p in sorted({k for k, _ in latest})])

        if body.echo:
            for k, (given, prompt, _, first) in enumerate(started):
                echoed = answers.echo_logprobs(body, prompt, first.prompt_logprobs)
                lp = answers.completion_logprobs(self.tokenizer, [], body.logprobs, echoed) if echoed is not None \
                    else None
                for i in range(body.n):
                    yield chunk(answers.echo_text(self.tokenizer, given, prompt), k * body.n + i, lp=lp)
        async with contextlib.AsyncExitStack() as stack:
            streams = [await stack.enter_async_context(self._consuming(stream, first, rid))
                       for _, _, stream, first in started]
            async for k, out in merged(streams):
                latest[(k, out.index)] = out
                if out.text or out.finish_reason or out.logprobs:
                    yield chunk(out.text, k * body.n + out.index, out, usage=usage_now() if every else None)
        if include_usage and latest:
            yield chunk("", usage=usage_now(), choices=False)

    # ---- /v1/responses (stateless) ----------------------------------------------------------

    def _as_chat(self, body: ResponsesRequest) -> ChatCompletionRequest:
        refused = body.refusal()
        if refused is not None:
            raise APIError(400, refused[1], param=refused[0])
        unknown = body.unknown_fields()
        if unknown:
            log.warning("ignoring fields that are neither OpenAI's nor documented extensions: %s", ", ".join(unknown))
        try:
            return body.as_chat()
        except FieldError as e:
            raise APIError(400, e.message, param=e.field) from None
        except ValueError as e:      # a part the chat request model refuses
            raise APIError(400, str(e).split("\n")[-1].strip(), param="input") from None

    def _response(self, body: ResponsesRequest, rid: str, created: int, text: str | None, finish: str | None,
                  usage=None) -> ResponseObject:
        status = "in_progress" if text is None else "incomplete" if finish == "length" else "completed"
        output = [] if text is None else [ResponseOutputMessage(id=f"msg_{rid[5:]}", status=status,
                                                                content=[ResponseOutputText(text=text)])]
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else \
            {"type": "text"}
        return ResponseObject(
            id=rid, created_at=created, status=status, model=self.model_name, output=output,
            usage=None if usage is None else ResponseUsage(
                input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
                input_tokens_details={"cached_tokens": usage.prompt_tokens_details.get("cached_tokens", 0)}),
            instructions=body.instructions, max_output_tokens=body.max_output_tokens, temperature=body.temperature,
            top_p=body.top_p, text={"format": fmt},
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            metadata=body.metadata or {})

    async def responses(self, body: ResponsesRequest) -> ResponseObject:
        """OpenAI's Responses API: the chat completion of the same input, in the Responses shape."""
        chat = self._as_chat(body)
        answer = await self.chat(chat)
        rid = "resp_" + answer.id.split("-", 1)[1]
        c = answer.choices[0]
        return self._response(body, rid, answer.created, c.message.content or "", c.finish_reason, answer.usage)

    async def responses_stream(self, body: ResponsesRequest) -> AsyncIterator[dict]:
        """The Responses API's stream events (`type`, `sequence_number`, ...), as the openai client
        parses them: created, in_progress, output item and content part added, text deltas, the
        done events, then completed (or incomplete at max_output_tokens)."""
        chat = self._as_chat(body)
        rid = new_request_id("resp").replace("resp-", "resp_")
        item = f"msg_{rid[5:]}"
        created = int(time.time())
        seq = iter(range(1 << 62))
        chunks = self.chat_stream(chat, include_usage=True)
        first = await anext(chunks)          # the engine has accepted the request
        text, finish, usage = "", None, None

        def event(kind: str, **fields) -> dict:
            return {"type": kind, "sequence_number": next(seq), **fields}

        opening = self._response(body, rid, created, None, None).model_dump()
        yield event("response.created", response=opening)
        yield event("response.in_progress", response=opening)
        yield event("response.output_item.added", output_index=0,
                    item={"type": "message", "id": item, "status": "in_progress", "role": "assistant", "content": []})
        yield event("response.content_part.added", item_id=item, output_index=0, content_index=0,
                    part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        async with contextlib.aclosing(chunks):
            async for c in _prepend(first, chunks):
                if c.usage is not None and not c.choices:
                    usage = c.usage
                for ch in c.choices:
                    if ch.delta.content:
                        text += ch.delta.content
                        yield event("response.output_text.delta", item_id=item, output_index=0, content_index=0,
                                    delta=ch.delta.content, logprobs=[])
                    finish = ch.finish_reason or finish
        done = self._response(body, rid, created, text, finish, usage)
        message = done.output[0].model_dump()
        yield event("response.output_text.done", item_id=item, output_index=0, content_index=0, text=text, logprobs=[])
        yield event("response.content_part.done", item_id=item, output_index=0, content_index=0,
                    part=message["content"][0])
        yield event("response.output_item.done", output_index=0, item=message)
        yield event("response.incomplete" if done.status == "incomplete" else "response.completed",
                    response=done.model_dump())

    # ---- the other routes ---------------------------------------------------------------------

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created)])

    def model_card(self, model: str) -> ModelCard:
        self.prepare.check_model(model)
        return ModelCard(id=self.model_name, created=self.created)

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """vLLM's /tokenize: a text prompt, or text-only chat messages rendered with the chat template."""
        self.prepare.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        tok = self.tokenizer
        if body.prompt is not None:
            self.prepare.check_prompt_chars(len(body.prompt), "prompt")
            ids = list(tok(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])
        else:
            turns = [(m, m.history_text()) for m in body.messages]
            if any(not isinstance(c, str) and any(p.type != "text" for p in c) for _, c in turns):
                raise APIError(400, "/tokenize takes text messages only (media expand when a request is served)",
                               param="messages")
            messages = [{"role": "user" if m.role == "tool" else m.role,
                         "content": c if isinstance(c, str) else "".join(p.text for p in c)} for m, c in turns]
            if sum(len(m["content"]) for m in messages) > self.prepare.max_prompt_chars:
                raise APIError(400, f"the messages hold more than {self.prepare.max_prompt_chars} characters",
                               param="messages")
            ids = list(self.processor.prepare_media(messages, {}, True)[0].token_ids)
        return TokenizeResponse(count=len(ids), max_model_len=self.prepare.max_model_len, tokens=ids,
                                token_strs=tok.convert_ids_to_tokens(ids) if body.return_token_strs else None)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.prepare.check_model(body.model)
        self.prepare.check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))
