"""`bench/gpu_suite.py` on a bare GPU image: it runs exactly the test files that hold GPU tests, those files
import nothing such an image lacks, and the path table it writes is one `AWQLinear` reads."""

import ast
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_suite  # noqa: E402
from vlm_core.quant.paths import PathTable  # noqa: E402

# what the GPU image has (torch, triton, transformers, einops, msgpack, pillow), pytest carried, and ours
GPU_IMAGE = {"torch", "triton", "transformers", "einops", "msgpack", "PIL", "numpy", "pytest", "safetensors",
             "tokenizers", "kernels", "vlm_core", "helpers", "bench"}


def test_the_suite_runs_every_file_with_gpu_tests_and_no_other():
    with_gpu = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if "\n@pytest.mark.gpu\n" in p.read_text()}
    assert set(gpu_suite.GPU_TEST_FILES) == with_gpu


def test_gpu_test_files_import_only_what_a_gpu_image_has():
    stdlib = set(sys.stdlib_module_names)
    for f in gpu_suite.GPU_TEST_FILES:
        tree = ast.parse((ROOT / f).read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for n in names:
                top = n.split(".")[0]
                assert top in stdlib or top in GPU_IMAGE, f"{f} imports {n}"


def test_table_rules_follow_the_winners_and_load():
    rules = gpu_suite.table_rules([(1, "tinygemm"), (8, "tinygemm"), (16, "triton"), (64, "triton"),
                                   (256, "cuda-dequant"), (2048, "cuda-dequant")], "bfloat16", 4096, 11008)
    assert [(r["path"], r.get("max_m")) for r in rules] == [("tinygemm", 8), ("triton", 64), ("cuda-dequant", None)]
    t = PathTable.from_json(rules)
    assert [t.choose("cuda", torch.bfloat16, m, 4096, 11008) for m in (1, 8, 9, 64, 65, 10 ** 6)] == \
        ["tinygemm", "tinygemm", "triton", "triton", "cuda-dequant", "cuda-dequant"]
