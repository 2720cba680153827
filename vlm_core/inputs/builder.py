"""The prompt builder a checkpoint folder needs: LLaVA (llava-hf) or VILA-family."""

from __future__ import annotations

from pathlib import Path

from ..config import is_vila_folder, read_vila_config
from .prompt import PromptBuilder
from .vila_prompt import VilaPromptBuilder


def prompt_builder(model_dir: str | Path):
    """The prompt builder for a llava-hf checkpoint or a VILA-family folder (no weights loaded)."""
    if is_vila_folder(model_dir):
        return VilaPromptBuilder.from_pretrained(model_dir, read_vila_config(Path(model_dir))[0])
    return PromptBuilder.from_pretrained(model_dir)
