"""VILA-1.5 and NVILA: chessboard split/merge, downsample projectors, tiling, dynamic S2 against a
reference assembled here, folder loading / saving, video, and generation through the engine."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlm_core.engine.engine import EngineConfig
from vlm_core.engine.sampling import SamplingParams
from vlm_core.inputs.tiling import closest_grid, candidate_grids, dynamic_s2_tiles, dynamic_tiles
from vlm_core.models.projector import SquareDownsample
from vlm_core.inputs.tiling import split_chessboard
from vlm_core.models.s2 import merge_chessboard
from vlm_core.tiny_vila import build_tiny_vila
from vlm_core.vlm import VLM
from helpers import generate_on
from vlm_core.scoring import prompt_logits

pytestmark = pytest.mark.timeout(300)


# ---- pure functions -----------------------------------------------------------------------------

def split_loops(x, rows, cols):
    h, w = x.shape[2] // rows, x.shape[3] // cols
    return torch.cat([x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(rows) for j in range(cols)])


def merge_loops(x, rows, cols):
    n, c, h, w = x.shape
    b = n // (rows * cols)
    out = torch.zeros(b, c, h * rows, w * cols)
    for i, j, k in itertools.product(range(rows), range(cols), range(b)):
        out[k, :, i * h:(i + 1) * h, j * w:(j + 1) * w] = x[(i * cols + j) * b + k]
    return out


@pytest.mark.parametrize("b,c,h,w,rows,cols", [(1, 3, 6, 6, 2, 3), (2, 4, 12, 8, 3, 2), (3, 1, 5, 7, 1, 1),
                                               (1, 2, 9, 12, 3, 4), (2, 5, 4, 4, 4, 4)])
def test_split_and_merge_chessboard_are_inverse_and_equal_loops(b, c, h, w, rows, cols):
    x = torch.randn(b, c, h * (rows if h % rows else 1), w * (cols if w % cols else 1))
    s = split_chessboard(x, rows, cols)
    assert torch.equal(s, split_loops(x, rows, cols))
    assert torch.equal(merge_chessboard(s, rows, cols), x)
    assert torch.equal(merge_chessboard(s, rows, cols), merge_loops(s, rows, cols))
    tokens = s.flatten(2).transpose(1, 2) if s.shape[2] == s.shape[3] else None   # the [n, h*w, C] form
    if tokens is not None:
        assert torch.equal(merge_chessboard(tokens, rows, cols), x)


@pytest.mark.parametrize("g,k", [(4, 2), (5, 2), (6, 3), (4, 3), (7, 3)])
def test_square_downsample_equals_loops(g, k):
    x = torch.randn(2, g * g, 3)
    y = SquareDownsample(k)(x)
    n = -(-g // k)
    assert y.shape == (2, n * n, k * k * 3)
    for b, i, j, p, q in itertools.product(range(2), range(n), range(n), range(k), range(k)):
        r, c = i * k + p, j * k + q
        want = x[b, r * g + c] if r < g and c < g else torch.zeros(3)
        assert torch.equal(y[b, i * n + j, (p * k + q) * 3:(p * k + q + 1) * 3], want)


def test_tile_grids_follow_the_aspect_ratio():
    # 2:1 picture, scales 1x/2x/3x: the last scale needs 9..12 tiles; 5x2 (2.5) is closest to 2
    assert closest_grid(200, 100, candidate_grids(9, 12), 56) == (5, 2)
    tiles, block = dynamic_s2_tiles(Image.new("RGB", (200, 100)), (56, 112, 168), 56, 12)
    assert block == (2, 5) and len(tiles) == 1 + 4 + 10 and all(t.size == (56, 56) for t in tiles)
    tiles = dynamic_tiles(Image.new("RGB", (300, 100)), 56, max_tiles=6)
    assert len(tiles) == 3 + 1          # a 3x1 grid and the thumbnail
    assert len(dynamic_tiles(Image.new("RGB", (60, 60)), 56, max_tiles=6)) == 1


# ---- tiny folders ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vila")
    return {f: build_tiny_vila(root / f, f, seed=1) for f in ("vila15", "nvila")}


@pytest.fixture(scope="module")
def models(folders):
    return {f: VLM.from_pretrained(d) for f, d in folders.items()}


def picture(w=150, h=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def test_folder_llm_and_tower_equal_transformers(folders, models):
    from transformers import AutoModelForCausalLM, SiglipVisionModel

    for fam, d in folders.items():
        vlm = models[fam]
        hf = AutoModelForCausalLM.from_pretrained(str(d / "llm")).eval()
        ids = torch.randint(5, 300, (40,), generator=torch.Generator().manual_seed(0))
        from vlm_core.engine.request import EngineRequest

        req = EngineRequest(vlm.processor.prepare_media(vlm.tokenizer.decode(ids), {}, apply_template=False)[0],
                                [], SamplingParams())
        ref_ids = torch.tensor(req.prompt.token_ids)
        with torch.no_grad():
            ref = hf(ref_ids[None]).logits[0]
        assert (prompt_logits(vlm.model, [req])[0] - ref).abs().max() <= 1e-4
        tower = SiglipVisionModel.from_pretrained(str(d / "vision_tower")).eval()
        px = torch.randn(2, 3, vlm.model.config.vision.image_size, vlm.model.config.vision.image_size)
        with torch.no_grad():
            want = tower(px, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(vlm.model.vision(px), want, rtol=1e-5, atol=1e-5)


def test_dynamic_s2_embedding_equals_a_reference_built_from_the_modules(models):
    vlm = models["nvila"]
    model, cfg = vlm.model, vlm.model.config
    img = picture(150, 90)
    _, items = vlm.processor.prepare_media("Describe.", {"image": [img]})
    (item,) = items
    got = model.embed_media(items)[0]

    # reference: tiles cut here, one tower call per tile, feature maps placed by loops
    size, scales = cfg.vision.image_size, cfg.s2_scales
    rows_last, cols_last = item.block_size
    grids = [(s // scales[0], s // scales[0]) for s in scales[:-1]] + [(rows_last, cols_last)]
    g = cfg.grid
    maps = []
    for rows, cols in grids:
        big = img.resize((cols * size, rows * size), resample=Image.Resampling.BICUBIC)
        fmap = torch.zeros(1, cfg.vision.hidden_size, rows * g, cols * g)
        for r, c in itertools.product(range(rows), range(cols)):
            tile = big.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
            px = vlm.image_processor.one(tile)[None]
            with torch.no_grad():
                f = model.vision(px)[0]                                   # [g*g, C]
            fmap[0, :, r * g:(r + 1) * g, c * g:(c + 1) * g] = f.T.reshape(-1, g, g)
        maps.append(fmap)
    out_size = maps[-1].shape[-2:]                                        # resize to the last scale
    merged = torch.cat([F.interpolate(m, size=out_size, mode="area") for m in maps], dim=1)
    n = cfg.projector.tokens_out(g)
    side = int(n ** 0.5)
    out = torch.zeros(rows_last * side, cols_last * side, cfg.text.hidden_size)
    for r, c in itertools.product(range(rows_last), range(cols_last)):
        block = merged[0, :, r * g:(r + 1) * g, c * g:(c + 1) * g].reshape(merged.shape[1], -1).T[None]
        with torch.no_grad():
            proj = model.projector(block)[0]                              # [side*side, H]
        out[r * side:(r + 1) * side, c * side:(c + 1) * side] = proj.reshape(side, side, -1)
    ref = out.reshape(-1, cfg.text.hidden_size)
    assert got.shape == ref.shape == (rows_last * cols_last * n, cfg.text.hidden_size)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_media_tokens_match_embeddings_and_generation_runs(models):
    for vlm in models.values():
        mm, items = vlm.processor.prepare_media([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}], {"image": [picture()]})
        embeds = vlm.model.embed_media(items)
        assert [s.length for s in mm.spans] == [e.shape[0] for e in embeds]
        nl = vlm.tokenizer("\n", add_special_tokens=False)["input_ids"]
        for s in mm.spans:   # each image run is followed by its end token ("\n")
            assert list(mm.token_ids[s.end:s.end + len(nl)]) == nl
        out = vlm.generate("What colour is the circle?", {"image": [picture()]},
                                   SamplingParams(max_new_tokens=8, ignore_eos=True))
        assert len(out.token_ids) == 8
        streamed = "".join(vlm.stream("What colour is the circle?", {"image": [picture()]},
                                              SamplingParams(max_new_tokens=8, ignore_eos=True)))
        assert streamed == out.text


def test_save_and_load_round_trip_keeps_logits(models, tmp_path):
    for fam, vlm in models.items():
        vlm.save_pretrained(tmp_path / fam)
        again = VLM.from_pretrained(tmp_path / fam)
        media = {"image": [picture(120, 100, seed=3)]}
        a = prompt_logits(vlm.model, [vlm.request("Describe the image.", media=media)])[0]
        b = prompt_logits(again.model, [again.request("Describe the image.", media=media)])[0]
        assert torch.equal(a, b)


def test_video_of_8_frames_and_frame_limit(models):
    vlm = models["nvila"]
    frames = [picture(80, 60, seed=i) for i in range(8)]
    mm, items = vlm.processor.prepare_media("What happens?", {"video": [frames]})
    tpt = vlm.model.config.tokens_per_tile
    nl = vlm.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(items) == 8 and all(it.kind == "video" for it in items)
    assert [s.length for s in mm.spans] == [tpt] * 8
    assert all(mm.spans[i + 1].offset == mm.spans[i].end + len(nl) for i in range(7))
    text_only, _ = vlm.processor.prepare_media("What happens?", {})
    assert len(mm) == len(text_only) + 1 * 0 + 8 * (tpt + len(nl))   # the video token becomes 8 frames
    out = vlm.generate("What happens?", {"video": [frames]}, SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4
    _, items = vlm.processor.prepare_media("What happens?", {"video": [frames + frames[:4]]})
    assert len(items) == 8                                                # 12 frames sampled to the limit


def test_vila_requests_batch_in_the_engine_like_alone(models):
    for vlm in models.values():
        reqs = [vlm.request(q, sampling=SamplingParams(max_new_tokens=6, ignore_eos=True), media=m)
                for q, m in [("Describe.", {"image": [picture(seed=1)]}), ("Hello there", {}),
                             ("Count the shapes.", {"image": [picture(64, 200, seed=2)]})]]
        alone = [generate_on(vlm.engine(EngineConfig(max_num_batched_tokens=32)), [r])[0].token_ids
                 for r in reqs]
        together = generate_on(vlm.engine(EngineConfig(max_num_batched_tokens=32)), reqs)
        assert [o.token_ids for o in together] == alone


def test_dynamic_tiling_mode(tmp_path):
    d = build_tiny_vila(tmp_path / "dyn", "vila15", image_mode="dynamic")
    vlm = VLM.from_pretrained(d)
    mm, items = vlm.processor.prepare_media("Describe.", {"image": [picture(210, 70)]})
    assert len(items) == 3 + 1 and len(mm.spans) == 4                   # 3x1 tiles and a thumbnail
    nl = vlm.tokenizer("\n", add_special_tokens=False)["input_ids"]
    for s in mm.spans[:-1]:   # "<image>\n" per tile: the end token, then the separator line
        assert list(mm.token_ids[s.end:s.end + 2 * len(nl)]) == nl + nl
    out = vlm.generate("Describe.", {"image": [picture(210, 70)]}, SamplingParams(max_new_tokens=3))
    assert 1 <= len(out.token_ids) <= 3


@pytest.fixture(scope="module")
def nvila_awq(folders, tmp_path_factory):
    """The tiny NVILA with its LLM quantized (AutoAWQ tensors in llm/), and the packed tensors."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from vlm_core.quant.awq import QuantizeOptions, quantize_linears

    src = folders["nvila"]
    dst = tmp_path_factory.mktemp("awq") / "nvila-awq"
    shutil.copytree(src, dst)
    dense = VLM.from_pretrained(src)
    packed = quantize_linears(dense.model.decoder, QuantizeOptions(group_size=32))
    for tensors in packed.values():          # fp16 scales, as AutoAWQ and llm-awq store them
        tensors["scales"] = tensors["scales"].half()
    state = load_file(str(src / "llm" / "model.safetensors"))
    for name, tensors in packed.items():
        del state[f"model.{name}.weight"]
        state.update({f"model.{name}.{k}": v for k, v in tensors.items()})
    save_file(state, str(dst / "llm" / "model.safetensors"))
    cfg = json.loads((dst / "llm" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                  "version": "gemm"}
    (dst / "llm" / "config.json").write_text(json.dumps(cfg))
    return dst, packed


def test_awq_llm_in_the_folder_loads_and_matches_its_dequantized_twin(folders, nvila_awq):
    from vlm_core.quant.awq_linear import AWQLinear
    from vlm_core.quant.pack import dequantize_awq

    dst, packed = nvila_awq
    dense = VLM.from_pretrained(folders["nvila"])
    q = VLM.from_pretrained(dst)
    assert isinstance(q.model.decoder.layers[0].self_attn.q_proj, AWQLinear)
    with torch.no_grad():   # the twin: the dense model with the dequantized weights
        for name, t in packed.items():
            fc = dense.model.decoder.get_submodule(name)
            fc.weight.copy_(dequantize_awq(t["qweight"], t["qzeros"], t["scales"].float(), 32).t())
    media = {"image": [picture(100, 140, seed=5)]}
    a = prompt_logits(q.model, [q.request("Describe the image.", media=media)])[0]
    b = prompt_logits(dense.model, [dense.request("Describe the image.", media=media)])[0]
    assert (a - b).abs().max() <= 1e-4


def test_tinychat_v2_export_in_llm_folder_loads_like_autoawq(nvila_awq, tmp_path):
    """TinyChat's VILA AWQ layout: llm/ holds `<name>-w4-g32-awq-v2.pt` (llm-awq v2 tensors) and a
    config.json without `quantization_config`; bits and group size come from the file name."""
    import json
    import shutil

    from safetensors.torch import load_file

    from helpers import to_v2_state
    from vlm_core.errors import CheckpointError
    from vlm_core.quant.awq_linear import AWQLinear

    src, _ = nvila_awq
    dst = tmp_path / "nvila-tinychat"
    shutil.copytree(src, dst)
    state = to_v2_state(load_file(str(dst / "llm" / "model.safetensors")), 32)
    assert state["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int16 and not any(
        k.endswith(".qzeros") for k in state)
    (dst / "llm" / "model.safetensors").unlink()
    torch.save(state, dst / "llm" / "nvila-tiny-w4-g32-awq-v2.pt")
    cfg = json.loads((dst / "llm" / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "llm" / "config.json").write_text(json.dumps(cfg))

    a, b = VLM.from_pretrained(src), VLM.from_pretrained(dst)
    assert isinstance(b.model.decoder.layers[1].mlp.down_proj, AWQLinear)
    media = {"image": [picture(100, 140, seed=6)]}
    la = prompt_logits(a.model, [a.request("Describe the image.", media=media)])[0]
    lb = prompt_logits(b.model, [b.request("Describe the image.", media=media)])[0]
    assert (la - lb).abs().max() <= 1e-5
    (dst / "llm" / "nvila-tiny-w4-g32-awq-v2.pt").rename(dst / "llm" / "NVILA-tiny-w4-g32-v2.pt")   # TinyChat's README form
    lc = VLM.from_pretrained(dst)
    assert torch.equal(prompt_logits(lc.model, [lc.request("Describe the image.", media=media)])[0], lb)
    (dst / "llm" / "NVILA-tiny-w4-g32-v2.pt").rename(dst / "llm" / "nvila-tiny.pt")   # the name says nothing
    with pytest.raises(CheckpointError, match=r"quantized weights .*<model>-w<bits>-g<group size>\[-awq\]-v2\.pt"):
        VLM.from_pretrained(dst)
    (dst / "llm" / "nvila-tiny.pt").rename(dst / "llm" / "nvila-tiny-w4-g32-awq.pt")
    with pytest.raises(CheckpointError, match="not a v2 one"):
        VLM.from_pretrained(dst)


def test_tsp_video_pooling_averages_frame_embeddings(folders, models, tmp_path):
    import json
    import shutil

    dst = tmp_path / "nvila-tsp"
    shutil.copytree(folders["nvila"], dst)
    top = json.loads((dst / "config.json").read_text())
    top["video_encoder"] = json.dumps({"_target_": "llava.model.encoders.TSPVideoEncoder",
                                       "pool_sizes": [[4, 1, 1], [8, 2, 2]], "sep_tokens": "\n"})
    (dst / "config.json").write_text(json.dumps(top))
    tsp, basic = VLM.from_pretrained(dst), models["nvila"]
    frames = [picture(80, 60, seed=i) for i in range(8)]
    mm, items = tsp.processor.prepare_media("What happens?", {"video": [frames]})
    tpt = tsp.model.config.tokens_per_tile                        # 2x2 tokens per frame here
    assert [s.length for s in mm.spans] == [tpt, tpt, 1]          # 8 frames / 4, then 8 frames / 8 at 2x2
    got = tsp.model.embed_media(items)
    _, frame_items = basic.processor.prepare_media("What happens?", {"video": [frames]})
    per_frame = torch.stack(basic.model.embed_media(frame_items))   # [8, tpt, H]
    torch.testing.assert_close(got[0], per_frame[:4].mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], per_frame[4:].mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], per_frame.mean(dim=(0, 1))[None], rtol=1e-5, atol=1e-5)
    nl = tsp.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert list(mm.token_ids[mm.spans[1].end:mm.spans[2].offset]) == nl + nl   # end token, then the separator
    _, six = tsp.processor.prepare_media("What happens?", {"video": [frames[:6]]})   # sampled up to 8 frames
    assert [it.pixels.shape[0] for it in six] == [4, 4, 8]
    top["num_video_frames"] = 6
    (dst / "config.json").write_text(json.dumps(top))
    with pytest.raises(Exception, match="groups of 4"):
        VLM.from_pretrained(dst)
    assert len(tsp.generate("What happens?", {"video": [frames]},
                                    SamplingParams(max_new_tokens=3, ignore_eos=True)).token_ids) == 3


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu", "mlp_downsample_2x2_fix"])
def test_other_projectors_load_run_and_round_trip(tmp_path, projector):
    from safetensors import safe_open

    d = build_tiny_vila(tmp_path / projector, "vila15", projector=projector)
    vlm = VLM.from_pretrained(d)
    with safe_open(str(d / "mm_projector" / "model.safetensors"), "pt") as st:
        keys = set(st.keys())
    assert ("layers.weight" in keys) == (projector == "linear")
    media = {"image": [picture(90, 70, seed=4)]}
    mm, items = vlm.processor.prepare_media("Describe.", media)
    assert mm.spans[0].length == vlm.model.embed_media(items)[0].shape[0]
    vlm.save_pretrained(tmp_path / "copy")
    again = VLM.from_pretrained(tmp_path / "copy")
    with safe_open(str(tmp_path / "copy" / "mm_projector" / "model.safetensors"), "pt") as st:
        assert set(st.keys()) == keys
    a = prompt_logits(vlm.model, [vlm.request("Describe.", media=media)])[0]
    assert torch.equal(a, prompt_logits(again.model, [again.request("Describe.", media=media)])[0])


# ---- VILA-1.5-S2 (static S2) and CLIP towers ----------------------------------------------------

@pytest.mark.parametrize("output_idx", [0, -1])
def test_static_s2_embedding_equals_a_reference_from_transformers_modules(tmp_path, output_idx):
    """VILA-1.5-S2: transformers' processor at the largest scale, torch bicubic to each scale,
    tiles cut by loops, transformers' tower per tile, maps placed by loops, area-resized to the
    output scale, concatenated, then the projector over the whole map."""
    import json

    from transformers import SiglipImageProcessor, SiglipVisionModel

    d = build_tiny_vila(tmp_path / "s2", "vila15", s2=True, seed=3)
    top = json.loads((d / "config.json").read_text())
    top["s2_resize_output_to_scale_idx"] = output_idx
    (d / "config.json").write_text(json.dumps(top))
    vlm = VLM.from_pretrained(d)
    cfg = vlm.model.config
    assert cfg.s2_scales == (70, 140, 210) and not cfg.s2_dynamic
    img = picture(150, 90, seed=7)
    mm, items = vlm.processor.prepare_media("Describe.", {"image": [img]})
    (item,) = items
    assert item.pixels.shape == (1 + 4 + 9, 3, 70, 70)
    got = vlm.model.embed_media(items)[0]

    proc = SiglipImageProcessor.from_pretrained(str(d / "vision_tower"))
    x = proc(images=img, size={"height": 210, "width": 210}, return_tensors="pt").pixel_values   # [1, 3, 210, 210]
    tower = SiglipVisionModel.from_pretrained(str(d / "vision_tower")).eval()
    g, tile = cfg.grid, 70
    maps = []
    for s in cfg.s2_scales:
        xs = F.interpolate(x, size=(s, s), mode="bicubic")
        n = s // tile
        fmap = torch.zeros(1, cfg.vision.hidden_size, n * g, n * g)
        for r, c in itertools.product(range(n), range(n)):
            with torch.no_grad():
                f = tower(xs[:, :, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile],
                          output_hidden_states=True).hidden_states[-2][0]                # [g*g, C]
            fmap[0, :, r * g:(r + 1) * g, c * g:(c + 1) * g] = f.T.reshape(-1, g, g)
        maps.append(fmap)
    out_size = maps[output_idx].shape[-2:]
    merged = torch.cat([F.interpolate(m, size=out_size, mode="area") for m in maps], dim=1)
    with torch.no_grad():
        ref = vlm.model.projector(merged.flatten(2).transpose(1, 2))[0]
    side = -(-out_size[0] // 2)                                    # mlp_downsample: 2x2, zero-padded
    assert got.shape == ref.shape == (side * side, cfg.text.hidden_size)
    assert mm.spans[0].length == side * side
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_static_s2_folder_generates_round_trips_and_encodes_video_frames(tmp_path):
    d = build_tiny_vila(tmp_path / "s2", "vila15", s2=True, seed=4)
    vlm = VLM.from_pretrained(d)
    media = {"image": [picture(120, 200, seed=1), picture(64, 64, seed=2)]}
    mm, items = vlm.processor.prepare_media("Compare the pictures.", media)
    assert [it.pixels.shape[0] for it in items] == [14, 14] and [s.length for s in mm.spans] == [9, 9]
    out = vlm.generate("Compare the pictures.", media, SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4
    vlm.save_pretrained(tmp_path / "copy")
    again = VLM.from_pretrained(tmp_path / "copy")
    assert again.model.config.s2_scales == (70, 140, 210) and not again.model.config.s2_dynamic
    a = prompt_logits(vlm.model, [vlm.request("Compare the pictures.", media=media)])[0]
    assert torch.equal(a, prompt_logits(again.model, [again.request("Compare the pictures.", media=media)])[0])
    frames = [picture(80, 60, seed=10 + i) for i in range(8)]
    mm, items = vlm.processor.prepare_media("What happens?", {"video": [frames]})
    assert len(items) == 8 and all(it.kind == "video" and it.pixels.shape[0] == 14 for it in items)
    assert [s.length for s in mm.spans] == [9] * 8
    assert [e.shape[0] for e in vlm.model.embed_media(items)] == [9] * 8
    assert len(vlm.generate("What happens?", {"video": [frames]},
                                    SamplingParams(max_new_tokens=3, ignore_eos=True)).token_ids) == 3


def test_static_s2_config_errors(tmp_path):
    import json

    from vlm_core.errors import ConfigError

    d = build_tiny_vila(tmp_path / "s2", "vila15", s2=True)
    top = json.loads((d / "config.json").read_text())
    for change, msg in [({"s2_max_split_size": 140}, "s2_max_split_size 140"),
                        ({"s2_scales": "70,100"}, "multiples of the first"),
                        ({"image_aspect_ratio": "dynamic"}, "static S2 does not combine"),
                        ({"s2_resize_output_to_scale_idx": 3}, "out of range")]:
        (d / "config.json").write_text(json.dumps({**top, **change}))
        with pytest.raises(ConfigError, match=msg):
            VLM.from_pretrained(d)


def test_clip_tower_folder_equals_transformers_and_round_trips(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionModel

    d = build_tiny_vila(tmp_path / "clip", "vila15", tower="clip", seed=5)
    vlm = VLM.from_pretrained(d)
    img = picture(150, 90, seed=3)
    _, items = vlm.processor.prepare_media("Describe.", {"image": [img]})
    # "resize" mode squashes the picture to the tile first; CLIP's processor then has nothing to crop
    proc = CLIPImageProcessor.from_pretrained(str(d / "vision_tower"))
    ref_px = proc(images=img.resize((70, 70), resample=Image.Resampling.BICUBIC), return_tensors="pt").pixel_values
    torch.testing.assert_close(items[0].pixels, ref_px, rtol=0, atol=1e-5)
    tower = CLIPVisionModel.from_pretrained(str(d / "vision_tower")).eval()
    with torch.no_grad():
        want = tower(ref_px, output_hidden_states=True).hidden_states[-2][:, 1:]   # "patch": CLS dropped
    torch.testing.assert_close(vlm.model.vision(ref_px), want, rtol=1e-5, atol=1e-5)
    vlm.save_pretrained(tmp_path / "copy")
    again = VLM.from_pretrained(tmp_path / "copy")
    a = prompt_logits(vlm.model, [vlm.request("Describe.", media={"image": [img]})])[0]
    assert torch.equal(a, prompt_logits(again.model, [again.request("Describe.", media={"image": [img]})])[0])


# ---- as VILA's authors run it: edge cases --------------------------------------------------------

def edited(src, dst, **top_changes):
    """A copy of the VILA folder `src` at `dst` with its top-level config.json changed."""
    import shutil

    shutil.copytree(src, dst)
    top = json.loads((dst / "config.json").read_text())
    top.update(top_changes)
    (dst / "config.json").write_text(json.dumps(top))
    return dst


def test_max_tiles_below_the_last_scales_square_falls_back_to_one_tile(folders, tmp_path):
    import dataclasses

    from vlm_core.families.vila import max_item_tiles, media_tokens
    from vlm_core.inputs.media import MediaItem

    # NVILA's geometry with max_tiles 4 < 9: no grid qualifies, so the last scale is one tile
    tiles, block = dynamic_s2_tiles(Image.new("RGB", (1000, 700)), (448, 896, 1344), 448, 4)
    assert block == (1, 1) and len(tiles) == 1 + 4 + 1 and all(t.size == (448, 448) for t in tiles)
    assert closest_grid(1000, 700, candidate_grids(9, 4), 448) == (1, 1)
    vlm = VLM.from_pretrained(edited(folders["nvila"], tmp_path / "nvila-4", max_tiles=4))
    cfg = vlm.model.config
    mm, items = vlm.processor.prepare_media("Describe.", {"image": [picture(150, 90)]})
    assert items[0].pixels.shape[0] == 6 and items[0].block_size == (1, 1)
    assert [s.length for s in mm.spans] == [cfg.tokens_per_tile] == [vlm.model.embed_media(items)[0].shape[0]]
    assert max_item_tiles(cfg) == 6
    full = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=448, patch_size=14),
                               s2_scales=(448, 896, 1344))
    assert media_tokens(full, MediaItem(torch.zeros(6, 3, 1, 1), (1, 1))) == 121      # one 11 x 11 block
    assert max_item_tiles(dataclasses.replace(full, max_tiles=12)) == 1 + 4 + 12


def test_equally_close_grids_keep_the_authors_candidate_order(folders, tmp_path):
    # 9 tiles exactly: (9, 1) and (3, 3) are equally far from 5:1; the authors' set yields (9, 1)
    # before (3, 3), and a later tie wins for a picture of more than half the grid's pixels
    assert candidate_grids(9, 9) == [(9, 1), (3, 3), (1, 9)]
    assert candidate_grids(4, 4) == [(4, 1), (1, 4), (2, 2)]
    assert closest_grid(500, 100, candidate_grids(9, 9), 56) == (3, 3)
    img = picture(500, 100, seed=4)
    tiles = dynamic_tiles(img, 56, max_tiles=9, min_tiles=9)
    square = img.resize((168, 168), Image.Resampling.BICUBIC)
    assert len(tiles) == 9 + 1 and tiles[4].tobytes() == square.crop((56, 56, 112, 112)).tobytes()
    # min_tiles comes from the config in "dynamic" mode
    d = build_tiny_vila(tmp_path / "dyn", "vila15", image_mode="dynamic")
    vlm = VLM.from_pretrained(edited(d, tmp_path / "dyn9", min_tiles=9, max_tiles=9))
    _, items = vlm.processor.prepare_media("Describe.", {"image": [img]})
    assert len(items) == 10


@pytest.mark.parametrize("mode", ["dynamic", "dynamic_s2"])
def test_clip_pictures_that_are_not_tiled_are_only_preprocessed(tmp_path, mode):
    """Several images, or video frames, in a dynamic mode: CLIP's processor alone (shortest edge,
    centre crop), no squashing to a square first."""
    from transformers import CLIPImageProcessor

    d = build_tiny_vila(tmp_path / "clip", "vila15", tower="clip", image_mode=mode)
    vlm = VLM.from_pretrained(d)
    proc = CLIPImageProcessor.from_pretrained(str(d / "vision_tower"))
    pics = [picture(150, 90, seed=1), picture(60, 130, seed=2)]
    _, items = vlm.processor.prepare_media("Compare.", {"image": pics})
    for it, p in zip(items, pics):
        torch.testing.assert_close(it.pixels, proc(images=p, return_tensors="pt").pixel_values, rtol=0, atol=1e-5)
    _, items = vlm.processor.prepare_media("What happens?", {"video": [pics]})
    frames = [pics[i] for i in (0, 0, 0, 0, 1, 1, 1, 1)]       # 2 frames sampled to 8
    for it, p in zip(items, frames):
        torch.testing.assert_close(it.pixels[0], proc(images=p, return_tensors="pt").pixel_values[0],
                                   rtol=0, atol=1e-5)
    assert len(items) == 8


def test_media_end_tokens_carry_no_bos_with_a_bos_adding_tokenizer(models):
    vlm = models["vila15"]
    tok = vlm.tokenizer
    assert tok("\n")["input_ids"][0] == tok.bos_token_id          # this tokenizer adds BOS by default
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    mm, _ = vlm.processor.prepare_media("Compare.", {"image": [picture(seed=1), picture(seed=2)]})
    for s in mm.spans:
        assert list(mm.token_ids[s.end:s.end + len(nl)]) == nl
    assert list(mm.token_ids).count(tok.bos_token_id) == 1 and mm.token_ids[0] == tok.bos_token_id


def test_frames_are_sampled_as_numpy_linspace_rounds_them(folders, models, tmp_path):
    from vlm_core.families.vila import sample_frames

    assert sample_frames(list(range(5)), 8) == [0, 1, 1, 2, 2, 3, 3, 4]      # short videos repeat frames
    got = sample_frames(list(range(30)), 15)
    assert got[7] == 15 and got == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]
    assert sample_frames(list(range(12)), 8) == [0, 2, 3, 5, 6, 8, 9, 11]
    assert sample_frames(list(range(3)), 1) == [0]
    vlm = models["nvila"]
    frames = [picture(80, 60, seed=i) for i in range(5)]
    _, items = vlm.processor.prepare_media("What happens?", {"video": [frames]})
    alone = [vlm.processor.prepare_media("What happens?", {"video": [[f] * 8]})[1][0].pixels for f in frames]
    assert len(items) == 8
    for it, i in zip(items, [0, 1, 1, 2, 2, 3, 3, 4]):
        assert torch.equal(it.pixels, alone[i])
    # a pooling (TSP) encoder of 8 frames pools a 5-frame video instead of refusing it
    tsp = VLM.from_pretrained(edited(folders["nvila"], tmp_path / "tsp", video_encoder=json.dumps(
        {"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]})))
    mm, items = tsp.processor.prepare_media("What happens?", {"video": [frames]})
    assert len(items) == 1 and items[0].pixels.shape[0] == 8 and [s.length for s in mm.spans] == \
        [tsp.model.config.tokens_per_tile]


def test_llama3_fallback_template_opens_with_vilas_system_prompt(models):
    from vlm_core.inputs.template import LLAMA3_TEMPLATE, VILA_LLAMA3_SYSTEM

    tok = models["vila15"].tokenizer
    head = "<|start_header_id|>{}<|end_header_id|>\n\n"
    render = lambda messages: tok.apply_chat_template(messages, chat_template=LLAMA3_TEMPLATE, tokenize=False,
                                                      add_generation_prompt=True)
    assert VILA_LLAMA3_SYSTEM == ("You are a helpful language and vision assistant. You are able to understand the "
                                  "visual content that the user provides, and assist the user with a variety of "
                                  "tasks using natural language.")
    assert render([{"role": "user", "content": "<image>What is it?"}]) == (
        tok.bos_token + head.format("system") + VILA_LLAMA3_SYSTEM + "<|eot_id|>" + head.format("user")
        + "<image>What is it?<|eot_id|>" + head.format("assistant"))
    assert render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]) == (
        tok.bos_token + head.format("system") + "Be brief.<|eot_id|>" + head.format("user") + "Hi<|eot_id|>"
        + head.format("assistant") + "Hello<|eot_id|>" + head.format("user") + "Bye<|eot_id|>"
        + head.format("assistant"))


def test_video_config_keys_not_applied_are_logged(folders, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="vlm_core.families.vila"):
        VLM.from_pretrained(edited(folders["nvila"], tmp_path / "fps", fps=2.0, video_max_tiles=4))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "fps=2.0 is not applied" in said and "video_max_tiles=4 is not applied" in said
