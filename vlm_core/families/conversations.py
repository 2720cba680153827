"""LLaVA's conversation templates (`conv_mode`), for checkpoints in the original LLaVA layout.

A template is a system prompt, two role names and separators, joined in one of LLaVA's five
styles (`llava/conversation.py`):

    two      system + sep, then "ROLE: text" + (sep after a user turn, sep2 after an answer);
             the generation prompt is "ROLE:"            (llava_v1, vicuna_v1)
    single   the same with sep after every turn          (llava_v0)
    mpt      system + sep, then role + text + sep; generation prompt: the role   (mpt, chatml_direct)
    llama_2  "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{text} [/INST]", each answer " {answer} </s>",
             later user turns "<s>[INST] {text} [/INST]"  (llava_llama_2, mistral_instruct)
    plain    system, then the texts with sep / sep2      (plain: pre-training, no roles)

`llava_v1` is what LLaVA-1.5's own tools (`run_llava`, the CLI, the model worker) and TinyChat's
`LlavaLlamaPrompter` use: "A chat between a curious human and an artificial intelligence
assistant. ..." with `USER:` / `ASSISTANT:` and `</s>` after each answer. A system message
replaces the template's system prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import ConfigError, InputError

STYLES = ("two", "single", "mpt", "llama_2", "plain")

_HUMAN_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_USER_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_VISION_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                  "that the user provides, and assist the user with a variety of tasks using natural language.")


@dataclass(frozen=True)
class Conversation:
    system: str
    roles: tuple[str, str]
    style: str
    sep: str
    sep2: str = ""
    system_format: str = "{}"        # how a system text is written (mpt wraps it in <|im_start|>system\n)

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"unknown conversation style {self.style!r}")

    def render(self, turns: Sequence[tuple[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt for (role, text) turns, role "system", "user" or "assistant"; with
        `add_generation_prompt` it ends where the assistant's answer begins."""
        system = self.system
        if turns and turns[0][0] == "system":
            system, turns = turns[0][1], turns[1:]
        for role, _ in turns:
            if role not in ("user", "assistant"):
                raise InputError(f"a {role!r} message can only come first in a LLaVA conversation")
        system = self.system_format.format(system) if system else ""
        msgs = [(self.roles[0] if r == "user" else self.roles[1], t, r) for r, t in turns]
        if add_generation_prompt:
            msgs.append((self.roles[1], None, "assistant"))
        after = {"user": self.sep, "assistant": self.sep2 if self.style in ("two", "plain") else self.sep}
        if self.style == "llama_2":
            return self._llama_2(system, msgs)
        out = system if self.style == "plain" else system + self.sep
        for name, text, role in msgs:
            if text is None:
                out += "" if self.style == "plain" else (name if self.style == "mpt" else name + ":")
            elif self.style == "plain":
                out += text + after[role]
            elif self.style == "mpt":
                out += name + text + after[role]
            else:
                out += name + ": " + text + after[role]
        return out

    def _llama_2(self, system: str, msgs) -> str:
        out = ""
        first = True
        for _, text, role in msgs:
            if text is None:
                continue
            if role == "user":
                if first and system:
                    text = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + text
                out += self.sep + f"[INST] {text} [/INST]"
            else:
                out += " " + text + " " + self.sep2
            first = False
        return out[len(self.sep):] if self.sep and out.startswith(self.sep) else out


CONVERSATIONS: dict[str, Conversation] = {
    "llava_v1": Conversation(_HUMAN_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>"),
    "vicuna_v1": Conversation(_USER_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>"),
    "llava_v0": Conversation(_HUMAN_SYSTEM, ("Human", "Assistant"), "single", "###"),
    "llava_llama_2": Conversation(_VISION_SYSTEM, ("USER", "ASSISTANT"), "llama_2", "<s>", "</s>"),
    "mistral_instruct": Conversation("", ("USER", "ASSISTANT"), "llama_2", "", "</s>"),
    "chatml_direct": Conversation("Answer the questions.", ("<|im_start|>user\n", "<|im_start|>assistant\n"), "mpt",
                                  "<|im_end|>", system_format="<|im_start|>system\n{}"),
    "mpt": Conversation("A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and "
                        "honest answers.", ("<|im_start|>user\n", "<|im_start|>assistant\n"), "mpt", "<|im_end|>",
                        system_format="<|im_start|>system\n{}"),
    "plain": Conversation("", ("", ""), "plain", "\n", "\n"),
}
CONVERSATIONS["v1"] = CONVERSATIONS["vicuna_v1"]
CONVERSATIONS["v0"] = CONVERSATIONS["llava_v0"]
DEFAULT_CONV_MODE = "llava_v1"


def conversation(conv_mode: str) -> Conversation:
    try:
        return CONVERSATIONS[conv_mode]
    except KeyError:
        raise ConfigError(f"conv_mode {conv_mode!r} is not one of LLaVA's templates here: "
                          f"{', '.join(sorted(CONVERSATIONS))}") from None


def stop_text(conv: Conversation) -> str:
    """What ends an answer: sep2 for the two-separator styles, else sep."""
    return conv.sep2 if conv.style in ("two", "llama_2") else conv.sep
