"""Load options a checkpoint folder cannot say for itself (the original LLaVA layout's):

    vision_tower_dir   where the vision tower that `mm_vision_tower` names lies: the tower's own
                       folder, or a folder holding it under the id's last path component
                       (`.../clip-vit-large-patch14-336`)
    conv_mode          which of LLaVA's conversation templates renders chat prompts
                       (`vlm_core.families.conversations.CONVERSATIONS`); default: the
                       tokenizer's chat template, else `llava_v1`

Folders of the other layouts carry all of this themselves; giving an option for them is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ConfigError


@dataclass(frozen=True)
class LoadOptions:
    vision_tower_dir: str | None = None
    conv_mode: str | None = None

    def given(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def refuse_for(self, layout: str) -> None:
        """Raise when any option is set for a layout that takes none."""
        if self.given():
            raise ConfigError(f"{' and '.join(self.given())} apply to checkpoints in the original LLaVA layout "
                              f"(mm_vision_tower in config.json); this folder is in the {layout} layout")


NO_OPTIONS = LoadOptions()
