"""Request preparation: an OpenAI request -> the engine's prompt, media items and sampling (no Ray).

    RequestPreparer(processor, settings)
      .check_fields(body)              fields not served (400), unknown fields (warning), the model (404)
      .check_limits(body)              limits that need no fetching, decoding or tokenizing
      await .chat(body)                -> (prompt, media items, sampling): image URLs read, pictures
                                          decoded and checked, the prompt rendered and tokenized
      await .text(body)                -> [(given, prompt, sampling)] of a text completion, one per prompt
      .fit_max_tokens(body, prompt, sampling, field)   the prompt within the context, max_tokens cut to fit

Reading URLs waits on the event loop; decoding and tokenizing run in a worker thread. A part that
names a media `uuid` this replica has seen is not fetched or decoded again (`MediaCache`, safe to
use from both).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections import OrderedDict

from vlm_core.errors import VLMError
from vlm_core.inputs.image import decode_image, open_image
from vlm_core.inputs.placeholders import MultimodalPrompt

from .errors import APIError, api_error_of
from .url_policy import new_http_client, read_image_url
from .protocol import ChatCompletionRequest, CompletionRequest
from .settings import IngressSettings

log = logging.getLogger("ray.serve")


def text_chars(body: ChatCompletionRequest) -> int:
    """Characters of text in the request's messages."""
    n = 0
    for m in body.messages:
        content = m.history_text()
        parts = [content] if isinstance(content, str) else [p.text for p in content if p.type == "text"]
        n += sum(len(t) for t in parts)
    return n


class MediaCache:
    """Decoded pictures by media uuid, least recently used evicted; one lock around every access."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str):
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, image) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._items[key] = image
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class RequestPreparer:
    def __init__(self, processor, settings: IngressSettings):
        self.processor = processor
        self.settings = settings
        self.model_name = settings.model_name
        self.max_model_len = processor.config.text.max_position_embeddings
        self.max_prompt_chars = settings.max_prompt_chars or self.max_model_len * max(
            16, max(len(t) for t in processor.tokenizer.get_vocab()))
        self.policy = settings.image_policy()
        self.media_cache = MediaCache(settings.media_uuid_cache)
        self._http = None

    # ---- checks -----------------------------------------------------------------------------

    def check_fields(self, body) -> None:
        """Fields not served (400 naming them), unknown fields (a warning), the model name (404)."""
        refused = body.refusal()
        if refused is not None:
            raise APIError(400, refused[1], param=refused[0])
        if getattr(body, "may_call_tool", lambda: False)() and self.settings.tool_parser == "none":
            raise APIError(400, "this server reads no tool-calling format (ingress.tool_parser is none), so the model "
                                "cannot decide by itself whether to call a tool: give tool_choice 'required', a "
                                "named function, or 'none'", param="tools" if body.tool_choice is None else "tool_choice")
        unknown = body.unknown_fields()
        if unknown:
            log.warning("ignoring fields that are neither OpenAI's nor documented extensions: %s", ", ".join(unknown))
        self.check_model(body.model)

    def check_model(self, model: str | None) -> None:
        if model not in (None, self.model_name):
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model")

    def check_prompt_chars(self, n: int, param: str) -> None:
        """At most `max_prompt_chars` characters of prompt text (`param`: "messages" or "prompt")."""
        if n <= self.max_prompt_chars:
            return
        if param == "messages":
            raise APIError(400, f"the messages hold {n} characters of text; at most {self.max_prompt_chars} are "
                                f"accepted (this model's context is {self.max_model_len} tokens)", param=param)
        raise APIError(400, f"the prompt holds {n} characters; at most {self.max_prompt_chars} are accepted",
                       param=param)

    def check_limits(self, body: ChatCompletionRequest) -> None:
        """Limits that need no fetching, decoding or tokenizing."""
        o = self.settings
        self.check_fields(body)
        self.check_prompt_chars(text_chars(body), "messages")
        parts = [p for m in body.messages if isinstance(m.content, list) for p in m.content]
        detail = next((p.image_url.detail for p in parts if p.type == "image_url" and p.image_url is not None
                       and p.image_url.detail not in (None, "auto")), None)
        if detail is not None:
            raise APIError(400, f"image_url.detail {detail!r} is not supported: every picture is encoded as this "
                                f"model's processor cuts it (give 'auto' or leave it out)", param="messages")
        videos = [p for p in parts if p.type == "video"]
        if videos and "video" not in self.processor.media_kinds:
            raise APIError(400, "this model takes images only: video parts are not supported", param="messages")
        for what, n in (("images", sum(p.type == "image_url" for p in parts)), ("videos", len(videos))):
            if n > o.max_images:
                raise APIError(400, f"{n} {what} in the request; at most {o.max_images} are allowed", param="messages")
        for v in videos:
            if len(v.video.frames) > o.max_video_frames:
                raise APIError(400, f"a video of {len(v.video.frames)} frames; at most {o.max_video_frames} "
                                    f"are allowed", param="messages")

    def check_sampling(self, sampling) -> None:
        """What the engine can represent: stop strings bounded in number and length, token ids of
        logit_bias and stop_token_ids inside the vocabulary."""
        o = self.settings
        if len(sampling.stop) > o.max_stop_strings:
            raise APIError(400, f"{len(sampling.stop)} stop strings; at most {o.max_stop_strings} are accepted",
                           param="stop")
        chars = sum(len(s) for s in sampling.stop)
        if chars > o.max_stop_chars:
            raise APIError(400, f"the stop strings hold {chars} characters; at most {o.max_stop_chars} are accepted",
                           param="stop")
        self.check_token_ids([t for t, _ in sampling.logit_bias], "logit_bias")
        self.check_token_ids(sampling.stop_token_ids, "stop_token_ids")
        self.check_token_ids(sampling.allowed_token_ids or (), "allowed_token_ids")

    def check_token_ids(self, ids, param: str) -> None:
        vocab = len(self.processor.tokenizer)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param=param)

    # ---- chat ---------------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest):
        """(prompt, media items, sampling) of a chat request."""
        o = self.settings
        self.check_limits(body)
        sampling = body.sampling(o.default_max_tokens)
        self.check_sampling(sampling)
        messages, urls, videos = [], [], []
        for m in body.messages:
            content, role = m.history_text(), "user" if m.role == "tool" else m.role
            if isinstance(content, str):
                messages.append({"role": role, "content": content})
                continue
            parts = []
            for p in content:
                if p.type == "text":
                    parts.append({"type": "text", "text": p.text})
                elif p.type == "video":
                    videos.append(self.processor.select_frames(p.video.frames))   # only the frames the model sees
                    parts.append({"type": "video"})
                else:
                    urls.append(p)
                    parts.append({"type": "image"})
            messages.append({"role": role, "content": parts})
        if self.policy.allow_http and self._http is None:
            self._http = new_http_client()
        # a part naming a uuid this replica remembers is not fetched or decoded again
        known = {p.uuid: im for p in urls if p.image_url is None and (im := self.media_cache.get(p.uuid)) is not None}
        missing = [p.uuid for p in urls if p.image_url is None and p.uuid not in known]
        if missing:
            raise APIError(400, f"media uuid {missing[0]!r} is not known to this server; send the picture with its "
                                f"image_url (and uuid) first", param="messages")
        fetch = [p.image_url.url for p in urls if p.image_url is not None] + [u for frames in videos for u in frames]
        unique = list(dict.fromkeys(fetch))     # a short video's sampled frames repeat: each is read once
        datas = dict(zip(unique, await asyncio.gather(*(read_image_url(u, self.policy, self._http) for u in unique))))

        def work():   # image decoding and tokenization, off the event loop
            try:
                headers = {u: open_image(b, o.max_image_pixels, o.max_aspect_ratio) for u, b in datas.items()}
                opened = iter([headers[u] for u in fetch])
                sized = [known[p.uuid] if p.image_url is None else next(opened) for p in urls]
                frames = [[next(opened) for _ in v] for v in videos]
                pixels = sum(im.width * im.height for im in sized + [f for v in frames for f in v])
                if pixels > o.max_request_pixels:
                    raise APIError(413, f"the request's pictures hold {pixels} pixels; at most {o.max_request_pixels}"
                                        f" per request are accepted", param="messages")
                images = [im if p.image_url is None else decode_image(im) for p, im in zip(urls, sized)]
                for p, im in zip(urls, images):
                    if p.uuid is not None and p.image_url is not None:
                        self.media_cache.put(p.uuid, im)
                media = {"image": images, "video": [[decode_image(f) for f in v] for v in frames]}
                return self.processor.prepare_media(messages, {k: v for k, v in media.items() if v})
            except VLMError as e:
                raise api_error_of(e) from None

        prompt, items = await asyncio.to_thread(work)
        return prompt, items, self.fit_max_tokens(body, prompt, sampling, "messages")

    # ---- text completions -------------------------------------------------------------------

    async def text(self, body: CompletionRequest) -> list[tuple]:
        """A text completion's prompts, each (as given, prompt, sampling): the request checked once,
        then each prompt's text tokenized as it is (no chat template), or its ids taken."""
        self.check_fields(body)
        prompts = body.prompts()
        if len(prompts) > self.settings.max_prompts:
            raise APIError(400, f"{len(prompts)} prompts in the request; at most {self.settings.max_prompts} are "
                                f"accepted", param="prompt")
        sampling = body.sampling(self.settings.default_max_tokens)
        self.check_sampling(sampling)
        out = []
        for given in prompts:
            prompt = await self._text_prompt(given)
            out.append((given, prompt, self.fit_max_tokens(body, prompt, sampling, "prompt")))
        return out

    async def _text_prompt(self, given: str | list[int]) -> MultimodalPrompt:
        if isinstance(given, str):
            self.check_prompt_chars(len(given), "prompt")
            try:
                prompt, _ = await asyncio.to_thread(self.processor.prepare_media, given, {}, False)
            except VLMError as e:
                raise api_error_of(e) from None
        else:
            self.check_token_ids(given, "prompt")
            prompt = MultimodalPrompt(tuple(given), ())
            if any(t in self.processor.media_token_ids for t in given):
                raise APIError(400, "the prompt's token ids hold a media placeholder; text completions take no "
                                    "media", param="prompt")
        return prompt

    def fit_max_tokens(self, body, prompt, sampling, prompt_field: str):
        """The prompt within the context, and max_tokens within what is left (400 naming the field
        when asked beyond it; the server default is cut to fit)."""
        if len(prompt) >= self.max_model_len:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context is "
                                f"{self.max_model_len} tokens", param=prompt_field)
        room = self.max_model_len - len(prompt)
        asked = body.requested_max_tokens()
        if asked is not None and asked > room:
            field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise APIError(400, f"this model's context is {self.max_model_len} tokens; the prompt takes "
                                f"{len(prompt)}, so at most {room} can be generated, but {field} is {asked}",
                           param=field)
        if asked is None and sampling.max_new_tokens > room:     # the default never exceeds the context
            sampling = dataclasses.replace(sampling, max_new_tokens=room, min_tokens=min(sampling.min_tokens, room))
        return sampling
