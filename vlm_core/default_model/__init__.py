"""The embedded default model: a tiny LLaVA trained here on synthetic shape pictures.

`default_model_dir()` is the 4-bit AWQ checkpoint that serving uses when no model is named;
`default_model_dir("fp16")` the 16-bit one it was quantized from. See MODEL_CARD.md.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

WEIGHTS = Path(__file__).parent / "weights"


def default_model_dir(kind: str = "awq") -> Path:
    if kind not in ("awq", "fp16"):
        raise ValueError(f"kind must be 'awq' or 'fp16', got {kind!r}")
    path = WEIGHTS / kind
    if not (path / "config.json").is_file():
        raise CheckpointError(f"the default model's {kind} checkpoint is missing at {path}; "
                              f"retrain it with `python -m vlm_core.default_model.train`")
    return path
