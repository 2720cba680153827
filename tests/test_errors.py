"""Every bad input raises its typed error with a message that names the problem."""

import json
import shutil
import subprocess
import sys

import pytest

from vlm_core.families.llava import load as load_llava_hf
from vlm_core.errors import CheckpointError, ConfigError, ImageError, PlaceholderMismatchError, UnknownProjectorError
from vlm_core.vlm import VLM


@pytest.fixture
def ckpt(tiny_dir, tmp_path):
    """A private copy of the tiny checkpoint to break."""
    return shutil.copytree(tiny_dir, tmp_path / "ckpt")


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="model directory .*nowhere does not exist"):
        load_llava_hf(tmp_path / "nowhere")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found in"):
        load_llava_hf(ckpt)


def test_malformed_config_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_llava_hf(ckpt)


def test_config_missing_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["text_config"]["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="text config is missing required field 'hidden_size'"):
        load_llava_hf(ckpt)


def test_missing_weights_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors, pytorch_model.bin"):
        load_llava_hf(ckpt)


def test_truncated_weights_file(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read weights file .*model.safetensors"):
        load_llava_hf(ckpt)


def test_missing_shard(tmp_path):
    from vlm_core.tiny import build_tiny_llava

    folder = build_tiny_llava(tmp_path / "sh", layout="old", shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors listed in "
                                              "model.safetensors.index.json is missing"):
        load_llava_hf(folder)


def test_missing_tensor(ckpt):
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / "model.safetensors"))
    victim = next(k for k in state if k.endswith("layers.1.mlp.up_proj.weight") and "language_model" in k)
    del state[victim]
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"checkpoint is missing 1 weights, e.g. \['decoder.layers.1.mlp.up_proj.weight'\]"):
        load_llava_hf(ckpt)


def test_wrong_shape_tensor(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape .* the model expects"):
        load_llava_hf(ckpt)


def test_unknown_projector_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mm_projector_type"] = "qformer"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownProjectorError, match="unknown projector type 'qformer'; supported: 'linear', 'mlp2x_gelu'"):
        load_llava_hf(ckpt)


def test_missing_tokenizer(ckpt):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / f).unlink()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        VLM.from_pretrained(ckpt)


def test_more_images_than_placeholders(vlm, images):
    with pytest.raises(PlaceholderMismatchError, match="prompt has 1 image placeholder but 2 images were given"):
        vlm.generate("USER: <image>\nCompare. ASSISTANT:", {"image": images[:2]}, apply_template=False)


def test_fewer_images_than_placeholders(vlm, images):
    with pytest.raises(PlaceholderMismatchError, match="prompt has 2 image placeholders but 1 image was given"):
        vlm.generate("<image> and <image>: compare.", {"image": images[:1]})


def test_unreadable_image_file(vlm, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ImageError, match="cannot read image file .*bad.png"):
        vlm.generate("What is it?", {"image": [bad]})


def test_missing_image_file(vlm, tmp_path):
    with pytest.raises(ImageError, match="cannot read image file .*nope.png.*: no such file"):
        vlm.generate("What is it?", {"image": [tmp_path / "nope.png"]})


def test_undecodable_image_bytes(vlm):
    with pytest.raises(ImageError, match="cannot read image bytes"):
        vlm.generate("What is it?", {"image": [b"\x89PNG\r\n\x1a\n garbage"]})


def test_cli_answers_and_reports_errors_cleanly(tiny_dir, images, vlm):
    from vlm_core.engine.sampling import SamplingParams

    ok = subprocess.run([sys.executable, "-m", "vlm_core.generate", "--model", str(tiny_dir), "--image",
                         str(images[0]), "--prompt", "What colour is the circle?", "--max-new-tokens", "8"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    expected = vlm.generate("What colour is the circle?", {"image": [images[0]]}, SamplingParams(max_new_tokens=8)).text
    assert ok.stdout == expected + "\n"
    bad = subprocess.run([sys.executable, "-m", "vlm_core.generate", "--model", str(tiny_dir), "--image",
                          str(tiny_dir / "config.json"), "--prompt", "What?"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: cannot read image file") and "Traceback" not in bad.stderr
