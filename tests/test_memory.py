"""Memory the loader gives back: pages of a file mapping already copied, and anonymous memory left alone."""

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlm_core.memory import _file_mapping_holds, drop_file_pages


def test_dropped_file_pages_read_back_from_the_file(tmp_path):
    want = torch.randn(1024, 1024)                   # 4 MiB
    save_file({"w": want}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as st:
        t = st.get_tensor("w")
        assert _file_mapping_holds(t.data_ptr(), t.data_ptr() + t.numel() * 4)
        copy = t.clone()
        drop_file_pages(t)
        assert torch.equal(copy, want) and torch.equal(t, want)     # the pages come back from the file


def test_anonymous_memory_is_never_dropped():
    t = torch.randn(1024, 1024)
    before = t.clone()
    assert not _file_mapping_holds(t.data_ptr(), t.data_ptr() + t.numel() * 4)
    drop_file_pages(t)
    assert torch.equal(t, before)
