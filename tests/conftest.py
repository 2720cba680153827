import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# Triton kernels run in the interpreter on CPU machines; this must be set before kernels import. On a CUDA
# host the same process compiles them for the GPU instead, so the tests marked `interpreter` (Triton launched
# on CPU tensors) are skipped there and the `gpu` tests run the kernels on the device.
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        skip = pytest.mark.skip(reason="launches Triton on CPU tensors, which needs TRITON_INTERPRET=1 (CPU hosts); "
                                       "the gpu-marked tests run these kernels here")
        for item in items:
            if "interpreter" in item.keywords:
                item.add_marker(skip)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Default tiny llava-hf checkpoint (as this transformers saves it)."""
    from vlm_core.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), seed=0)


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    from transformers import LlavaForConditionalGeneration

    m = LlavaForConditionalGeneration.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    return m


@pytest.fixture(scope="session")
def vlm(tiny_dir):
    from vlm_core.vlm import VLM

    return VLM.from_pretrained(tiny_dir, dtype="float32")


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Three generated images of different sizes and aspect ratios."""
    from vlm_core.tiny import draw_example_image

    d = tmp_path_factory.mktemp("images")
    return [draw_example_image(d / f"img{i}.png", seed=i, size=s)
            for i, s in enumerate([(96, 64), (40, 80), (50, 50)])]
