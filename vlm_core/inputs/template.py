"""Chat templates: the tokenizer's own (jinja, via transformers), or LLaVA-1.5's as a fallback.

Messages use the OpenAI/transformers shape: {"role": "user" | "assistant" | "system",
"content": str | [{"type": "text", "text": ...}, {"type": "image"}, ...]}. Each image part
renders as the image placeholder token (`<image>`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..errors import CheckpointError, InputError

IMAGE_PLACEHOLDER = "<image>"

# LLaVA-1.5 (vicuna-style): "USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ..."
LLAVA_15_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set parts = message['content'] if message['content'] is not string "
    "else [{'type': 'text', 'text': message['content']}] -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] }} {% endfor -%}"
    "{%- elif message['role'] == 'user' -%}"
    "USER: {% for p in parts if p['type'] == 'image' %}<image>\n{% endfor -%}"
    "{%- for p in parts if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}{{ ' ' }}"
    "{%- else -%}"
    "ASSISTANT: {% for p in parts if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

# Templates over string contents (media tokens already inline), for VILA-family tokenizers that
# carry no template of their own.
# ChatML (Qwen2 / NVILA): "<|im_start|>system\n...<|im_end|>\n<|im_start|>user\n...<|im_end|>\n..."
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# LLaMA-3 (VILA-1.5 8B): VILA's llama_3 conversation, which opens with its own system prompt (a
# system message given replaces it)
VILA_LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                      "content that the user provides, and assist the user with a variety of tasks using natural "
                      "language.")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% else %}{% set system = '" + VILA_LLAMA3_SYSTEM + "' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Vicuna v1 (VILA-1.5 3B/7B/13B)
VICUNA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% else %}{{ 'A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' }}"
    "{% endif %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}{{ ' USER: ' + message['content'] }}"
    "{% else %}{{ ' ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)

Message = dict[str, Any]


def normalize_messages(messages: Sequence[Message], allow_video: bool = False) -> list[Message]:
    """Validate roles and turn every content into a list of typed parts (text, image, and video
    where the model takes videos)."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise InputError(f"message {i} has unknown role {m['role']!r}")
        content = m["content"]
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for p in content:
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text" and isinstance(p.get("text"), str):
                    parts.append({"type": "text", "text": p["text"]})
                elif kind in ("image", "image_url"):
                    parts.append({"type": "image"})
                elif allow_video and kind == "video":
                    parts.append({"type": "video"})
                else:
                    raise InputError(f"message {i} has a content part that is neither text nor {'image nor video' if allow_video else 'image'}: {p!r}")
        else:
            raise InputError(f"message {i} content must be a string or a list of parts")
        out.append({"role": m["role"], "content": parts})
    if not out:
        raise InputError("no messages given")
    return out


def count_images(messages: Sequence[Message]) -> int:
    return sum(1 for m in messages for p in m["content"] if p["type"] == "image")


def render_chat(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """Prompt text for `messages`, with one `<image>` per image part."""
    msgs = normalize_messages(messages)
    template = getattr(tokenizer, "chat_template", None) or LLAVA_15_TEMPLATE
    return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def user_turn(text: str, num_images: int) -> list[Message]:
    """A single user message; images go first unless the text places `<image>` itself."""
    if IMAGE_PLACEHOLDER in text:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}]


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise CheckpointError(f"no tokenizer (tokenizer.json / tokenizer_config.json) in {model_dir}")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {model_dir}: {e}") from None
