"""Answer shaping: engine outputs -> the OpenAI response fields (no Ray, no I/O).

    assistant_message(body, text, finish)       a finished choice's message (a forced tool call as the call)
    chat_logprobs(tokenizer, entries)            chat `logprobs` (tokens as text and bytes, top alternatives)
    completion_logprobs(tokenizer, entries, k)   the legacy completions shape (parallel lists, offsets)
    echo_logprobs(body, prompt, scored)          the prompt's tokens with their scores, for echo + logprobs
    prompt_logprobs(tokenizer, out)              vLLM's `prompt_logprobs`
    echo_text(tokenizer, body, prompt)           what echo puts before a completion
"""

from __future__ import annotations

import json
import re
import uuid

from vlm_core.engine.request import RequestOutput

from .protocol import (AssistantMessage, ChatCompletionRequest, ChoiceLogprobs, CompletionLogprobs, CompletionRequest,
                       FunctionCall, PromptLogprob, TokenLogprob, ToolCall, TopLogprob)


HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def hermes_calls(text: str, tools) -> tuple[str, list[tuple[str, str]]]:
    """(the text outside the calls, [(function name, arguments JSON)]) of an answer in the hermes
    format; a block that is not a call of one of `tools` stays text."""
    names = {t.function.name for t in tools or ()}
    calls, kept, last = [], [], 0
    for m in HERMES_CALL.finditer(text):
        try:
            call = json.loads(m.group(1))
            name, args = call["name"], call.get("arguments", {})
        except (ValueError, KeyError, TypeError):
            continue
        if name not in names:
            continue
        kept.append(text[last:m.start()])
        last = m.end()
        calls.append((name, args if isinstance(args, str) else json.dumps(args)))
    kept.append(text[last:])
    return "".join(kept).strip(), calls


def assistant_message(body: ChatCompletionRequest, text: str, finish: str | None, tool_parser: str = "none"
                      ) -> tuple[AssistantMessage, str | None]:
    """The assistant message of a finished choice: its text; for a forced tool call the call; with a
    tool parser and the model left to decide, the calls it wrote (and any text beside them)."""
    if body.calls_tool():
        call = body.tool_call_of(text)
        calls, content = ([call] if call is not None else []), None
    elif body.may_call_tool() and tool_parser == "hermes":
        content, calls = hermes_calls(text, body.tools)
        content = content or None
    else:
        calls = []
    if not calls:
        return AssistantMessage(content=text), finish
    return (AssistantMessage(content=content, tool_calls=[
        ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=n, arguments=a)) for n, a in calls]),
        "tool_calls" if finish == "stop" else finish)


def chat_logprobs(tokenizer, entries) -> ChoiceLogprobs:
    """OpenAI's logprobs shape for engine `TokenLogprobs` (each token as decoded text and its bytes)."""
    def tok(i: int) -> tuple[str, list[int]]:
        text = tokenizer.decode([i])
        return text, list(text.encode("utf-8"))

    content = []
    for e in entries:
        text, raw = tok(e.token_id)
        top = [TopLogprob(token=t, logprob=lp, bytes=b) for t, b, lp in ((*tok(i), lp) for i, lp in e.top)]
        content.append(TokenLogprob(token=text, logprob=e.logprob, bytes=raw, top_logprobs=top))
    return ChoiceLogprobs(content=content)


def completion_logprobs(tokenizer, entries, k: int, echoed: list | None = None) -> CompletionLogprobs:
    """The legacy completions shape: parallel lists of tokens, their logprobs, top dicts (k
    entries), offsets. `echoed`: the prompt's tokens first — (token id, `TokenLogprobs` or None
    for the first) — as echo with logprobs gives them."""
    tokens, offsets, pos, lps, tops = [], [], 0, [], []
    decode = tokenizer.decode
    for token, e in [*(echoed or []), *((e.token_id, e) for e in entries)]:
        text = decode([token])
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
        lps.append(e.logprob if e is not None else None)
        tops.append({decode([i]): lp for i, lp in e.top[:k]} if e is not None else None)
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)


def echo_logprobs(body: CompletionRequest, prompt, scored) -> list | None:
    """(token id, its `TokenLogprobs`) for each prompt token, when echo with logprobs asks for them."""
    if not (body.echo and body.logprobs is not None and scored is not None):
        return None
    return list(zip(prompt.token_ids, [None, *scored]))


def prompt_logprobs(tokenizer, out: RequestOutput) -> list | None:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then for each one a dict of its
    own entry and the k most likely tokens there (token id -> logprob, rank, decoded token)."""
    if out.prompt_logprobs is None:
        return None
    decode = tokenizer.decode
    result: list = [None]
    for e in out.prompt_logprobs:
        entry = {str(t): PromptLogprob(logprob=lp, rank=r, decoded_token=decode([t]))
                 for r, (t, lp) in enumerate(e.top, start=1)}
        entry.setdefault(str(e.token_id), PromptLogprob(logprob=e.logprob, rank=e.rank,
                                                        decoded_token=decode([e.token_id])))
        result.append(entry)
    return result


def echo_text(tokenizer, given: str | list[int], prompt) -> str:
    """What echo puts before a completion: the prompt's text as given, or its ids decoded."""
    return given if isinstance(given, str) else tokenizer.decode(list(prompt.token_ids))
