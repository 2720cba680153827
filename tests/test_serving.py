"""The OpenAI serving layer without Ray: `OpenAIServing` over plain Python clients — the tiny model's
tower as the vision client, an in-process `AsyncLLMEngine` (or scripted streams) as the LLM client."""

import asyncio
import json
import re
import threading

import pytest
from PIL import Image

from deployments.errors import APIError, ReplicaDiedError, ServerOverloadedError
from deployments.preparation import MediaCache
from deployments.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from deployments.serving import OpenAIServing
from deployments.settings import IngressSettings
from helpers import data_url
from vlm_core.engine.engine import AsyncLLMEngine, EngineConfig
from vlm_core.engine.request import RequestOutput
from vlm_core.engine.sampling import SamplingParams
from vlm_core.errors import ImageError

Q = "What colour is the circle?"


class LocalVision:
    def __init__(self, model, fail: Exception | None = None):
        self.model, self.fail, self.calls = model, fail, 0

    async def encode(self, items, hashes):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return self.model.embed_media(items)


class EngineStream:
    def __init__(self, engine, rid, request, log):
        self.engine, self.rid, self.log = engine, rid, log
        self.it = engine.generate(rid, request)

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await anext(self.it)

    def cancel(self):
        self.log.append(self.rid)
        self.engine.abort(self.rid)


class LocalLLM:
    """The engine in this process; `die_after`: the first stream raises ReplicaDiedError after that
    many outputs (a replica that died)."""

    def __init__(self, engine, die_after: int | None = None, fail: Exception | None = None):
        self.engine, self.die_after, self.fail = engine, die_after, fail
        self.sent, self.cancelled = [], []

    def generate(self, rid, request, embeds):
        if embeds is not None:
            request = request.with_embeds(embeds)
        self.sent.append(request)
        stream = EngineStream(self.engine, f"{rid}-{len(self.sent)}", request, self.cancelled)
        if self.fail is not None or (self.die_after is not None and len(self.sent) == 1):
            return Failing(stream, self.die_after or 0, self.fail or ReplicaDiedError("replica died"))
        return stream


class Failing:
    def __init__(self, stream, after, error):
        self.stream, self.after, self.error, self.n = stream, after, error, 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.n == self.after:
            self.stream.cancel()
            raise self.error
        self.n += 1
        return await anext(self.stream)

    def cancel(self):
        self.stream.cancel()


@pytest.fixture(scope="module")
def engine(vlm):
    return AsyncLLMEngine(vlm.engine(EngineConfig(max_num_seqs=8)))


def serving(vlm, engine, settings=None, **llm_kw):
    return OpenAIServing(vlm.processor, settings or IngressSettings(), LocalVision(vlm.model), LocalLLM(engine, **llm_kw))


def image_request(image_path, question=Q, uuid=None, **kw):
    part = {"type": "image_url", "image_url": {"url": data_url(Image.open(image_path))}}
    if uuid is not None:
        part["uuid"] = uuid
    return ChatCompletionRequest(messages=[{"role": "user", "content": [part, {"type": "text", "text": question}]}],
                                 temperature=kw.pop("temperature", 0), max_tokens=kw.pop("max_tokens", 8), **kw)


def run(coro):
    return asyncio.run(coro)


async def collect(agen):
    return [c async for c in agen]


def test_chat_answers_as_the_in_process_model(vlm, engine, images):
    s = serving(vlm, engine)
    want = vlm.generate(Q, {"image": [images[0]]}, SamplingParams(max_new_tokens=8))
    got = run(s.chat(image_request(images[0])))
    assert got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.prompt_tokens == len(vlm.request(Q, {"image": [images[0]]}).prompt)
    two = run(s.chat(image_request(images[0], n=2)))
    assert [c.index for c in two.choices] == [0, 1] and {c.message.content for c in two.choices} == {want.text}
    assert two.usage.completion_tokens == 2 * len(want.token_ids)


def test_stream_with_usage_equals_the_whole_answer(vlm, engine, images):
    s = serving(vlm, engine)
    whole = run(s.chat(image_request(images[1])))
    chunks = run(collect(s.chat_stream(image_request(images[1], stream=True), include_usage=True)))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_logprobs_shapes(vlm, engine, images):
    s = serving(vlm, engine)
    got = run(s.chat(image_request(images[0], logprobs=True, top_logprobs=2)))
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == got.choices[0].message.content
    text = run(s.complete(CompletionRequest(prompt="The circle is", max_tokens=4, temperature=0, logprobs=2,
                                            echo=True)))
    lp = text.choices[0].logprobs
    assert text.choices[0].text.startswith("The circle is")
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.text_offset) == len(lp.top_logprobs)
    assert "".join(lp.tokens) == vlm.tokenizer.bos_token + text.choices[0].text     # echoed tokens: BOS first


def test_completion_stream_and_tokenize_routes(vlm, engine):
    s = serving(vlm, engine)
    body = dict(prompt="The square is", max_tokens=5, temperature=0)
    whole = run(s.complete(CompletionRequest(**body)))
    chunks = run(collect(s.complete_stream(CompletionRequest(**body, stream=True,
                                                             stream_options={"include_usage": True}))))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    ids = s.tokenize(TokenizeRequest(prompt="The square is")).tokens
    assert s.detokenize(DetokenizeRequest(tokens=ids)).prompt.endswith("The square is")
    with pytest.raises(APIError, match="outside the vocabulary"):
        s.detokenize(DetokenizeRequest(tokens=[10 ** 6]))


@pytest.mark.parametrize("kw, status, words", [
    (dict(model="other"), 404, "model 'other' does not exist"),
    (dict(max_tokens=10 ** 5), 400, "so at most"),
    (dict(store=True), 400, "store: true is not supported"),
])
def test_request_errors_name_the_problem(vlm, engine, images, kw, status, words):
    s = serving(vlm, engine)
    with pytest.raises(APIError) as e:
        run(s.chat(image_request(images[0], **kw)))
    assert e.value.status == status and words in e.value.message
    assert s.llm.sent == []            # refused before anything was sent


def test_limits_and_unknown_media_uuid(vlm, engine, images):
    s = serving(vlm, engine, IngressSettings(max_images=1))
    two = ChatCompletionRequest(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(Image.open(p))}} for p in images[:2]]}], max_tokens=4)
    with pytest.raises(APIError, match="2 images in the request; at most 1"):
        run(s.chat(two))
    unknown = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "image_url", "uuid": "pic-1"}]}],
                                    max_tokens=4)
    with pytest.raises(APIError, match="media uuid 'pic-1' is not known"):
        run(s.chat(unknown))
    first = run(s.chat(image_request(images[0], uuid="pic-1")))          # remembered with its uuid
    again = run(s.chat(ChatCompletionRequest(messages=[{"role": "user", "content": [
        {"type": "image_url", "uuid": "pic-1"}, {"type": "text", "text": Q}]}], max_tokens=8, temperature=0)))
    assert again.choices[0].message.content == first.choices[0].message.content


def test_transport_and_internal_failures_map_to_statuses_and_cancel(vlm, engine, images):
    overloaded = serving(vlm, engine, fail=ServerOverloadedError("queue full"), die_after=0)
    with pytest.raises(APIError) as e:
        run(overloaded.chat(image_request(images[0])))
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"}
    broken = serving(vlm, engine, fail=RuntimeError("boom"), die_after=2)
    with pytest.raises(APIError) as e:
        run(broken.chat(image_request(images[0])))
    assert e.value.status == 500 and "internal error (request id chatcmpl-" in e.value.message
    assert broken.llm.cancelled                                             # the engine's work stopped too
    bad_image = OpenAIServing(vlm.processor, IngressSettings(), LocalVision(vlm.model, ImageError("not a picture")),
                              LocalLLM(engine))
    with pytest.raises(APIError) as e:
        run(bad_image.chat(image_request(images[0])))
    assert e.value.status == 400 and e.value.message == "not a picture"


def test_a_replica_death_mid_answer_is_continued_with_the_same_answer(vlm, engine, images):
    whole = run(serving(vlm, engine).chat(image_request(images[2])))
    s = serving(vlm, engine, die_after=2)
    got = run(s.chat(image_request(images[2])))
    assert got.choices[0].message.content == whole.choices[0].message.content
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (whole.usage.prompt_tokens,
                                                                       whole.usage.completion_tokens)
    assert len(s.llm.sent) == 2
    assert len(s.llm.sent[1].prompt) == len(s.llm.sent[0].prompt) + 2       # the prompt plus the tokens made


def test_a_consumer_leaving_a_stream_early_cancels_the_request(vlm, engine, images):
    s = serving(vlm, engine)

    async def first_two():
        gen = s.chat_stream(image_request(images[0], stream=True, max_tokens=32))
        got = [await anext(gen), await anext(gen)]
        await gen.aclose()
        return got

    run(first_two())
    assert len(s.llm.cancelled) == 1


def test_media_cache_is_safe_across_threads():
    cache = MediaCache(64)

    def work(k):
        for i in range(500):
            cache.put(f"{k}-{i % 80}", i)
            cache.get(f"{(k + 1) % 4}-{i % 80}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 64


def test_outputs_merge_by_choice_index():
    from deployments.serving import LLMStream

    class Script:
        def __init__(self):
            self.outs = iter([RequestOutput("r", "a", [1], None, 3, 1, 0, index=0),
                              RequestOutput("r", "x", [7], None, 3, 1, 0, index=1),
                              RequestOutput("r", "b", [2], "stop", 3, 2, 0, index=0),
                              RequestOutput("r", "y", [8], "length", 3, 2, 0, index=1)])

        def __aiter__(self):
            return self

        async def __anext__(self):
            try:
                return next(self.outs)
            except StopIteration:
                raise StopAsyncIteration from None

        def cancel(self):
            raise AssertionError("a finished stream is not cancelled")

    class Client:
        def generate(self, rid, request, embeds):
            return Script()

    from vlm_core.engine.request import EngineRequest
    from vlm_core.inputs.placeholders import MultimodalPrompt

    s = OpenAIServing.__new__(OpenAIServing)
    s.settings = IngressSettings()
    req = EngineRequest(MultimodalPrompt((1, 2, 3), ()), (), SamplingParams(n=2))

    async def go():
        stream = LLMStream(Client(), "r", req, None)
        return await s._gather(stream, await anext(stream), "r")

    merged = run(go())
    assert [merged[0].text, merged[1].text] == ["ab", "xy"]
    assert [merged[0].finish_reason, merged[1].finish_reason] == ["stop", "length"]


def test_a_replica_side_refusal_reaches_the_client_in_its_own_words(vlm, engine, images):
    """An error raised in another replica arrives wrapped (Ray's RayTaskError subclasses the
    original's class and its text is the remote traceback): the client gets the original message."""
    from vlm_core.errors import InputError

    original = InputError("this model's tokenizer cannot spell JSON")

    class RemoteError(InputError):                     # what a transport's wrapper looks like
        def __init__(self, cause):
            super().__init__("ray::ServeReplica:vlm:LLMServer (pid=123, ip=10.0.0.1, actor_id=ab12)\n"
                             "Traceback (most recent call last):\n  File \"/srv/llm.py\", line 60")
            self.cause = cause

    s = serving(vlm, engine, fail=RemoteError(original), die_after=0)
    for call in (lambda: s.chat(image_request(images[0])),
                 lambda: collect(s.chat_stream(image_request(images[0], stream=True)))):
        with pytest.raises(APIError) as e:
            run(call())
        assert e.value.status == 400 and e.value.message == str(original)
        assert not any(w in e.value.message for w in ("ray::", "pid=", "Traceback", "File \""))


@pytest.mark.parametrize("kw, param, words", [
    (dict(logit_bias={"²": 1}), "logit_bias", "logit_bias keys are token ids"),
    (dict(logit_bias={"--5": 1}), "logit_bias", "logit_bias keys are token ids"),
    (dict(logit_bias={"9" * 5000: 1}), "logit_bias", "logit_bias keys are token ids"),
    (dict(logit_bias={"999999": 1}), "logit_bias", "token id 999999 is outside the vocabulary"),
    (dict(stop_token_ids=[-3]), "stop_token_ids", "token id -3 is outside the vocabulary"),
    (dict(stop=["x" * 10] * 33), "stop", "33 stop strings; at most 32"),
    (dict(stop=["y" * 3000, "z" * 3000]), "stop", "the stop strings hold 6000 characters; at most 4096"),
    (dict(seed=2 ** 63), "seed", "seed"),
])
def test_hostile_fields_are_refused_before_any_work(vlm, engine, images, kw, param, words):
    s = serving(vlm, engine)
    with pytest.raises((APIError, ValueError)) as e:
        run(s.chat(image_request(images[0], **kw)))
    err = e.value
    if isinstance(err, APIError):
        assert err.status == 400 and err.param == param and words in err.message
    else:                                    # pydantic's own bound (the HTTP layer answers it as a 400 naming it)
        assert param in str(err)
    assert s.llm.sent == [] and s.vision.calls == 0


def test_a_huge_top_k_is_clamped_to_the_vocabulary(vlm, engine, images):
    s = serving(vlm, engine)
    for top_k in (2 ** 63, 10 ** 30):
        got = run(s.chat(image_request(images[0], temperature=1.0, top_k=top_k, seed=3)))
        assert got.choices[0].finish_reason in ("stop", "length")


VLLM_FIELDS = [("use_beam_search", True), ("length_penalty", 0.5), ("bad_words", ["red"]),
               ("include_stop_str_in_output", True), ("skip_special_tokens", False),
               ("spaces_between_special_tokens", False), ("truncate_prompt_tokens", 10),
               ("continue_final_message", True), ("add_generation_prompt", False), ("chat_template", "{{ x }}"),
               ("chat_template_kwargs", {"a": 1}), ("mm_processor_kwargs", {"max_tiles": 1}),
               ("documents", [{"text": "d"}]), ("guided_whitespace_pattern", " "),
               ("return_token_ids", True), ("return_tokens_as_token_ids", True), ("logits_processors", ["x"]),
               ("kv_transfer_params", {}), ("vllm_xargs", {"a": 1})]


@pytest.mark.parametrize("field, value", VLLM_FIELDS, ids=[f for f, _ in VLLM_FIELDS])
def test_vllm_extension_fields_not_served_are_refused_by_name(vlm, engine, images, field, value):
    s = serving(vlm, engine)
    with pytest.raises(APIError) as e:
        run(s.chat(image_request(images[0], **{field: value})))
    assert e.value.status == 400 and e.value.param == field and field.split("_")[0] in e.value.message
    assert s.llm.sent == []


def test_neutral_vllm_values_and_image_detail(vlm, engine, images):
    s = serving(vlm, engine)
    neutral = dict(use_beam_search=False, length_penalty=1.0, skip_special_tokens=True,
                   include_stop_str_in_output=False, add_generation_prompt=True, chat_template_kwargs={})
    want = run(s.chat(image_request(images[0]))).choices[0].message.content
    assert run(s.chat(image_request(images[0], **neutral))).choices[0].message.content == want
    body = image_request(images[0])
    body.messages[0].content[0].image_url.detail = "low"
    with pytest.raises(APIError, match="image_url.detail 'low' is not supported"):
        run(s.chat(body))
    body.messages[0].content[0].image_url.detail = "auto"
    assert run(s.chat(body)).choices[0].message.content == want


def test_continuous_usage_is_on_every_chunk_from_the_first(vlm, engine, images):
    s = serving(vlm, engine)
    body = image_request(images[0], stream=True, stream_options={"include_usage": True,
                                                                 "continuous_usage_stats": True})
    chunks = run(collect(s.chat_stream(body, include_usage=True)))
    assert all(c.usage is not None for c in chunks)
    assert chunks[0].usage.completion_tokens == 0 and chunks[0].usage.prompt_tokens == chunks[-1].usage.prompt_tokens
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == chunks[-1].usage.completion_tokens > 0


def test_list_prompts_each_get_their_choices_numbered_prompt_by_prompt(vlm, engine):
    s = serving(vlm, engine)
    texts = ["The circle is", "The square is", "There are"]
    ids = vlm.tokenizer("The triangle is")["input_ids"]
    alone = [run(s.complete(CompletionRequest(prompt=p, max_tokens=4, temperature=0))) for p in texts + [ids]]
    both = run(s.complete(CompletionRequest(prompt=texts, max_tokens=4, temperature=0, n=2)))
    assert [c.index for c in both.choices] == list(range(6))
    assert [c.text for c in both.choices] == [a.choices[0].text for a in alone[:3] for _ in range(2)]
    assert both.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone[:3])
    assert both.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone[:3])
    as_ids = run(s.complete(CompletionRequest(prompt=[ids, ids], max_tokens=4, temperature=0, echo=True)))
    assert [c.text for c in as_ids.choices] == [vlm.tokenizer.decode(ids) + alone[3].choices[0].text] * 2
    chunks = run(collect(s.complete_stream(CompletionRequest(prompt=texts, max_tokens=4, temperature=0, stream=True,
                                                             stream_options={"include_usage": True}))))
    streamed = {}
    for c in chunks:
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert streamed == {k: a.choices[0].text for k, a in enumerate(alone[:3])}
    assert chunks[-1].usage.completion_tokens == sum(a.usage.completion_tokens for a in alone[:3])
    with pytest.raises(APIError, match="the prompt is empty"):
        run(s.complete(CompletionRequest(prompt=["a", ""], max_tokens=2)))
    many = OpenAIServing(vlm.processor, IngressSettings(max_prompts=2), LocalVision(vlm.model), LocalLLM(engine))
    with pytest.raises(APIError, match="3 prompts in the request; at most 2"):
        run(many.complete(CompletionRequest(prompt=texts, max_tokens=2)))


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
    "additionalProperties": False}}}


def test_the_tool_round_trip(vlm, engine, images):
    """A forced call, its result sent back in a `tool` message after the assistant's `tool_calls`,
    and the next answer; the history renders as documented (calls as their JSON, the result as a
    user turn naming the call)."""
    s = serving(vlm, engine)
    ask = {"role": "user", "content": "What is the weather?"}
    first = run(s.chat(ChatCompletionRequest(messages=[ask], tools=[WEATHER], tool_choice="required",
                                             max_tokens=200, temperature=0)))
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    history = [ask, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = run(s.chat(ChatCompletionRequest(messages=history, max_tokens=6, temperature=0)))
    assert second.choices[0].message.content is not None and second.choices[0].finish_reason in ("stop", "length")
    text = s.tokenize(TokenizeRequest(messages=history))
    rendered = vlm.tokenizer.decode(text.tokens)
    args = json.loads(call.function.arguments)
    assert json.dumps({"name": "get_weather", "arguments": args}) in rendered
    assert f"Result of tool call {call.id}: sunny, 21 C" in rendered
    # an assistant turn whose content is a list of parts, and a message without content
    parts = [ask, {"role": "assistant", "content": [{"type": "text", "text": "Paris."}]}, ask]
    assert run(s.chat(ChatCompletionRequest(messages=parts, max_tokens=3))).choices
    with pytest.raises(ValueError, match="a user message needs content"):
        ChatCompletionRequest(messages=[{"role": "user"}])
    with pytest.raises(ValueError, match="only an assistant message carries tool_calls"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x", "tool_calls": [call.model_dump()]}])


def test_cache_salt_keeps_tenants_prefix_caches_apart(vlm, engine, images):
    from vlm_core.engine.blocks import prompt_block_keys

    s = serving(vlm, engine)

    def cached(salt):
        return run(s.chat(image_request(images[1], question="How many shapes are there in this picture?",
                                        cache_salt=salt))).usage.prompt_tokens_details["cached_tokens"]

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0                     # the same prompt, another tenant: nothing shared
    assert cached("tenant-a") > 0                      # the same tenant again: its blocks
    prompt = vlm.request(Q, {"image": [images[1]]}).prompt
    plain, a, b = (prompt_block_keys(prompt, ("h",), 16, salt) for salt in (None, "tenant-a", "tenant-b"))
    assert len(plain) == len(a) == len(b) > 0 and not set(plain) & set(a) and not set(a) & set(b)
    assert prompt_block_keys(prompt, ("h",), 16, "tenant-a") == a
    # the pictures' keys are per tenant too (the encoder cache and the media router see them)
    s.llm.sent.clear()
    cached("tenant-c")
    cached("tenant-d")
    assert s.llm.sent[0].media_hashes != s.llm.sent[1].media_hashes


def test_tool_choice_auto_with_the_hermes_parser(vlm, engine):
    """The model decides: here its output is forced (a regex) to write a hermes-style call, which
    comes back as tool_calls with the text around it; without a parser tool_choice auto is a 400."""
    ask = [{"role": "user", "content": "What is the weather?"}]
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    regex = re.sub(r"([.^$*+?{}\[\]\\|()])", r"\\\1", "Let me check. " + call)     # the text, literally
    body = dict(messages=ask, tools=[WEATHER], tool_choice="auto", max_tokens=200, temperature=0,
                structured_outputs={"regex": regex})
    plain = serving(vlm, engine)
    with pytest.raises(APIError, match="ingress.tool_parser is none") as e:
        run(plain.chat(ChatCompletionRequest(**body)))
    assert e.value.param == "tool_choice"
    s = serving(vlm, engine, IngressSettings(tool_parser="hermes"))
    got = run(s.chat(ChatCompletionRequest(**body)))
    c = got.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Let me check."
    assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == [
        ("get_weather", {"city": "Oslo"})]
    chunks = run(collect(s.chat_stream(ChatCompletionRequest(**body, stream=True))))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, tc.function.arguments) for tc in calls] == [
        (t.function.name, t.function.arguments) for t in c.message.tool_calls]
    # an answer without a call is plain text
    text = run(s.chat(ChatCompletionRequest(**{**body, "structured_outputs": {"regex": "It is sunny\\."}})))
    assert text.choices[0].message.content == "It is sunny." and text.choices[0].message.tool_calls is None


def test_responses_api_equals_the_chat_completion_of_the_same_input(vlm, engine, images):
    from deployments.protocol import ResponsesRequest

    s = serving(vlm, engine)
    url = data_url(Image.open(images[0]))
    body = dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": url},
                                                     {"type": "input_text", "text": Q}]}],
                instructions="Answer briefly.", max_output_tokens=8, temperature=0)
    chat = run(s.chat(ChatCompletionRequest(messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": Q}]}],
        max_tokens=8, temperature=0)))
    got = run(s.responses(ResponsesRequest(**body)))
    assert got.output[0].content[0].text == chat.choices[0].message.content
    assert got.usage.output_tokens == chat.usage.completion_tokens and got.usage.input_tokens == chat.usage.prompt_tokens
    assert got.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    events = run(collect(s.responses_stream(ResponsesRequest(**body, stream=True))))
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == got.output[0].content[0].text
    assert events[-1]["response"]["usage"]["output_tokens"] == got.usage.output_tokens
    for field, value in (("previous_response_id", "resp_1"), ("store", True), ("tools", [{"type": "web_search"}]),
                         ("reasoning", {"effort": "low"})):
        with pytest.raises(APIError) as e:
            run(s.responses(ResponsesRequest(**body, **{field: value})))
        assert e.value.status == 400 and e.value.param == field


def test_a_client_request_id_names_the_answer(vlm, engine, images):
    s = serving(vlm, engine)
    got = run(s.chat(image_request(images[0], request_id="tenant-7.req:42")))
    assert got.id == "tenant-7.req:42" and s.llm.sent
    chunks = run(collect(s.chat_stream(image_request(images[0], stream=True, request_id="req-s1"))))
    assert {c.id for c in chunks} == {"req-s1"}
    text = run(s.complete(CompletionRequest(prompt="The circle is", max_tokens=2, request_id="c-1")))
    assert text.id == "c-1"
    with pytest.raises(ValueError, match="request_id"):
        image_request(images[0], request_id="has space")
    again = run(s.chat(image_request(images[0], request_id="tenant-7.req:42")))    # reusable once finished
    assert again.id == "tenant-7.req:42"


def test_min_p_and_allowed_token_ids_over_the_api(vlm, engine, images):
    s = serving(vlm, engine)
    allowed = vlm.tokenizer("red blue", add_special_tokens=False)["input_ids"]
    got = run(s.chat(image_request(images[0], allowed_token_ids=allowed, max_tokens=4)))
    assert set(vlm.tokenizer(got.choices[0].message.content, add_special_tokens=False)["input_ids"]) <= set(allowed)
    assert run(s.chat(image_request(images[0], temperature=1.0, min_p=0.5, seed=2))).choices
    with pytest.raises(APIError, match="token id 999999 is outside the vocabulary") as e:
        run(s.chat(image_request(images[0], allowed_token_ids=[999999])))
    assert e.value.param == "allowed_token_ids"
