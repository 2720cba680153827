"""The original LLaVA layout (liuhaotian LLaVA-1.5, VILA-1.0) and its 4-bit forms, against references
written from the authors' code (`orig_layout.py`): transformers' LlamaForCausalLM and
CLIPVisionModel on the same weights, fed as LLaVA feeds them, LLaVA's `tokenizer_image_token`,
`expand2square` and `llava_v1` template."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from orig_layout import (LLAVA_V1_SYSTEM, TOWER_ID, Reference, llava_v1, sentencepiece_tokenizer, tokenizer_image_token,
                         write_checkpoint, write_tower)
from vlm_core.engine.sampling import SamplingParams
from vlm_core.errors import CheckpointError, ConfigError
from vlm_core.families import LLAVA_ORIG, family_of
from vlm_core.families import llava_orig
from vlm_core.quant.pack import dequantize_awq
from vlm_core.vlm import VLM

TOWER_NAME = TOWER_ID.split("/")[-1]
N_TOK = 16                     # (32 / 8)^2 patches, CLS dropped
GREEDY = SamplingParams(max_new_tokens=8)
Q = "What colour is the circle?"


def folder(root, name="llava-tiny", tower_form="vision", **kw):
    ck = write_checkpoint(root / name, **kw)
    write_tower(ck / TOWER_NAME, tower_form)
    return ck


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return folder(tmp_path_factory.mktemp("orig"))


@pytest.fixture(scope="module")
def base_vlm(base):
    return VLM.from_pretrained(base, dtype="float32")


def expanded(ids, placeholder, n=N_TOK):
    out = []
    for t in ids:
        out += [placeholder] * n if t == -200 else [t]
    return out


def check_generation(vlm, ref, prompt, images, text_prompt):
    """Our prompt ids equal tokenizer_image_token's expansion and greedy tokens equal the reference's."""
    ids = tokenizer_image_token(text_prompt, vlm.tokenizer)
    mm, _ = vlm.processor.prepare_media(prompt, {"image": images})
    assert list(mm.token_ids) == expanded(ids, vlm.processor.placeholder_id)
    assert [s.offset for s in mm.spans] == [i + k * (N_TOK - 1) for k, i in enumerate(j for j, t in enumerate(ids)
                                                                                      if t == -200)]
    got = vlm.generate(prompt, {"image": images}, GREEDY)
    want = ref.generate(ids, images, GREEDY.max_new_tokens)
    assert list(got.token_ids) == want
    return got


def test_detected_and_configured_as_llava_does(base, base_vlm):
    assert family_of(base) is LLAVA_ORIG
    cfg = base_vlm.model.config
    assert cfg.vision.feature_layers == (-2,) and cfg.vision.select_strategy == "default"
    assert cfg.pad_to_square and cfg.projector.type == "mlp2x_gelu" and cfg.tower.folder == base / TOWER_NAME
    assert cfg.text.num_kv_heads == 2 and cfg.text.num_heads == 4


def test_prompt_pieces_after_an_image_start_with_their_own_metaspace_piece(base_vlm, images):
    mm, _ = base_vlm.processor.prepare_media(Q, {"image": images[:1]})
    tok = base_vlm.tokenizer
    after = tok.convert_ids_to_tokens(mm.token_ids[mm.spans[0].end])
    assert after == "▁"                                     # "\nWhat..." tokenized alone: ▁ <newline> ...
    assert mm.token_ids[0] == tok.bos_token_id and mm.token_ids.count(tok.bos_token_id) == 1
    assert base_vlm.processor.prompt_text(Q, 1) == llava_v1([("user", "<image>\n" + Q)])


def test_fp16_pad_checkpoint_generates_as_the_reference(base, base_vlm, images):
    ref = Reference(base, base / TOWER_NAME)
    check_generation(base_vlm, ref, Q, images[:1], llava_v1([("user", "<image>\n" + Q)]))


def test_several_images_each_get_their_run(base, base_vlm, images):
    ref = Reference(base, base / TOWER_NAME)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare "},
                                         {"type": "image"}, {"type": "text", "text": "these."}]}]
    check_generation(base_vlm, ref, msgs, images[:2], llava_v1([("user", "<image>\nCompare <image>\nthese.")]))


def test_multi_turn_conversation_builds_llava_v1(base, base_vlm, images):
    ref = Reference(base, base / TOWER_NAME)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]},
            {"role": "assistant", "content": " The circle is red. "},
            {"role": "user", "content": "How many shapes are there?"}]
    text = llava_v1([("user", "<image>\n" + Q), ("assistant", "The circle is red."),
                     ("user", "How many shapes are there?")])
    check_generation(base_vlm, ref, msgs, images[:1], text)
    sys_msgs = [{"role": "system", "content": "Be brief."}] + msgs[:1]
    assert base_vlm.processor.prompt_text(sys_msgs, 1) == llava_v1([("user", "<image>\n" + Q)]).replace(
        LLAVA_V1_SYSTEM, "Be brief.")


@pytest.mark.parametrize("kw", [
    dict(model_type="llava", im_start_end=True, weights="bin"),            # October-2023 config, .bin shards
    dict(kv_heads=4, projector="linear", aspect="square", select_feature="cls_patch", select_layer=-1),
    dict(aspect=None, dtype=torch.float32, weights="bin"),
], ids=["im_start_end-bin", "mha-linear-square-cls", "no-aspect-fp32"])
def test_config_variants_generate_as_the_reference(tmp_path, images, kw):
    ck = folder(tmp_path, **kw)
    vlm = VLM.from_pretrained(ck, dtype="float32")
    ref = Reference(ck, ck / TOWER_NAME)
    image = "<im_start><image><im_end>" if kw.get("im_start_end") else "<image>"
    n = N_TOK + (1 if kw.get("select_feature") == "cls_patch" else 0)
    ids = tokenizer_image_token(llava_v1([("user", image + "\n" + Q)]), vlm.tokenizer)
    mm, _ = vlm.processor.prepare_media(Q, {"image": images[:1]})
    assert list(mm.token_ids) == expanded(ids, vlm.processor.placeholder_id, n)
    if kw.get("im_start_end"):
        tok = vlm.tokenizer
        assert tok.convert_ids_to_tokens(mm.token_ids[mm.spans[0].offset - 1]) == "<im_start>"
        assert tok.convert_ids_to_tokens(mm.token_ids[mm.spans[0].end]) == "<im_end>"
    assert list(vlm.generate(Q, {"image": images[:1]}, GREEDY).token_ids) == ref.generate(ids, images[:1], 8)


def test_patch_token_runs_of_vila_1_0(tmp_path, images):
    """mm_use_im_patch_token: the tokenizer gains <im_patch> as LLaVA's loader adds it, and a prompt
    may carry TinyChat's already-expanded runs, each replaced by an image's features."""
    ck = folder(tmp_path, patch_token=True)
    vlm = VLM.from_pretrained(ck, dtype="float32")
    tok = vlm.tokenizer
    patch = tok.convert_tokens_to_ids("<im_patch>")
    assert patch == len(sentencepiece_tokenizer())           # appended, as add_tokens does
    text = llava_v1([("user", "<im_patch>" * N_TOK + "\n" + Q)])
    mm, _ = vlm.processor.prepare_media(text, {"image": images[:1]}, apply_template=False)
    ids = tok(text).input_ids
    assert list(mm.token_ids) == ids and mm.spans[0].length == N_TOK
    start = ids.index(patch)
    ref_ids = ids[:start] + [-200] + ids[start + N_TOK:]
    req = vlm.request(text, {"image": images[:1]}, GREEDY, apply_template=False)
    got = vlm.generate(req)
    assert list(got.token_ids) == Reference(ck, ck / TOWER_NAME).generate(ref_ids, images[:1], 8)


# ---- the vision tower ------------------------------------------------------------------------

def test_tower_as_absolute_path_setting_and_openai_clip_model_form(tmp_path, images):
    towers = tmp_path / "towers"
    clip = write_tower(towers / TOWER_NAME, "clip")                  # openai's form: whole CLIPModel, .bin
    ck = write_checkpoint(tmp_path / "abs", tower=str(clip))
    vlm = VLM.from_pretrained(ck, dtype="float32")
    assert vlm.model.config.tower.folder == clip
    ref_dir = write_tower(tmp_path / "as-vision", "vision")          # the reference reads a CLIPVisionModel folder
    from orig_layout import tower_state
    from transformers import CLIPVisionModel

    m = CLIPVisionModel.from_pretrained(str(ref_dir))
    m.load_state_dict({k.removeprefix("vision_model."): v for k, v in tower_state(clip).items()}, strict=False)
    m.save_pretrained(str(ref_dir))
    want = Reference(ck, ref_dir).features(images[:1])[0]
    got = vlm.model.embed_media(vlm.processor.prepare_media(Q, {"image": images[:1]})[1])[0]
    assert torch.allclose(got, want, atol=1e-5)

    by_id = write_checkpoint(tmp_path / "by-id")                         # hub id, tower found by the setting
    with pytest.raises(CheckpointError) as e:
        VLM.from_pretrained(by_id)
    msg = str(e.value)
    assert TOWER_ID in msg and "never downloaded" in msg and "vision_tower_dir" in msg
    assert str(by_id / TOWER_NAME) in msg
    for setting in (towers, clip):                                       # a folder holding it, or the tower itself
        v = VLM.from_pretrained(by_id, dtype="float32", vision_tower_dir=setting)
        assert v.model.config.tower.folder == clip
    with pytest.raises(CheckpointError, match="vision_tower_dir .* holds no vision tower"):
        VLM.from_pretrained(by_id, vision_tower_dir=tmp_path / "nowhere")


def test_tower_weights_inside_the_checkpoint_win(tmp_path, images):
    trained = write_tower(tmp_path / "trained", seed=7)
    ck = write_checkpoint(tmp_path / "inside", tower_inside=trained)
    write_tower(ck / TOWER_NAME, seed=1)                               # the frozen original beside it
    vlm = VLM.from_pretrained(ck, dtype="float32")
    assert vlm.model.config.tower.inside
    ref = Reference(ck, ck / TOWER_NAME)                                # loads the inside weights over the folder's
    check_generation(vlm, ref, Q, images[:1], llava_v1([("user", "<image>\n" + Q)]))
    alone = write_checkpoint(tmp_path / "inside-only", tower_inside=trained)
    with pytest.raises(CheckpointError, match="its weights are inside the checkpoint, but not its config"):
        VLM.from_pretrained(alone)


def test_known_openai_tower_config_serves_inside_weights(tmp_path):
    cfg = llava_orig.KNOWN_TOWERS["clip-vit-large-patch14-336"]
    from transformers import CLIPVisionConfig

    hf = CLIPVisionConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    assert (hf.image_size // hf.patch_size) ** 2 == 576 and hf.hidden_size == 1024 and hf.num_hidden_layers == 24
    src = llava_orig.TowerSource("openai/clip-vit-large-patch14-336", None, True)
    assert llava_orig.tower_config(src)["image_size"] == 336


def test_vision_and_llm_parts_load_apart_and_compose(base, base_vlm, images):
    vision = LLAVA_ORIG.load_model(base, dtype="float32", parts=("vision",))
    llm = VLM.from_pretrained(base, dtype="float32", parts=("llm",))
    assert vision.decoder is None and llm.model.vision is None
    items = base_vlm.processor.prepare_media(Q, {"image": images[:1]})[1]
    emb = vision.embed_media(items)
    assert torch.equal(emb[0], base_vlm.model.embed_media(items)[0])
    mm, _ = llm.processor.prepare_media(Q, {"image": images[:1]})
    from vlm_core.engine.request import EngineRequest

    req = EngineRequest(mm, emb, GREEDY)
    assert list(llm.generate(req).token_ids) == list(base_vlm.generate(Q, {"image": images[:1]}, GREEDY).token_ids)


# ---- templates and refusals --------------------------------------------------------------------

def test_conv_mode_picks_another_llava_template(base):
    vlm = VLM.from_pretrained(base, dtype="float32", conv_mode="vicuna_v1", parts=("llm",))
    text = vlm.processor.prompt_text(Q, 1)
    assert text.startswith("A chat between a curious user") and text.endswith(" USER: <image>\n" + Q + " ASSISTANT:")
    v0 = VLM.from_pretrained(base, dtype="float32", conv_mode="llava_v0", parts=("llm",)).processor
    assert v0.prompt_text(Q, 1).endswith("###Human: <image>\n" + Q + "###Assistant:")
    with pytest.raises(ConfigError, match="conv_mode 'llava_v9' is not one of LLaVA's templates"):
        VLM.from_pretrained(base, conv_mode="llava_v9")


def test_conversation_styles_render_as_llava_get_prompt():
    from vlm_core.families.conversations import CONVERSATIONS

    turns = [("user", "Hi"), ("assistant", "Hello"), ("user", "Why?")]
    sys_ = "You are a helpful language and vision assistant. You are able to understand the visual content that " \
           "the user provides, and assist the user with a variety of tasks using natural language."
    assert CONVERSATIONS["llava_llama_2"].render(turns) == (
        f"[INST] <<SYS>>\n{sys_}\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Why? [/INST]")
    assert CONVERSATIONS["chatml_direct"].render(turns) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
        "Hello<|im_end|><|im_start|>user\nWhy?<|im_end|><|im_start|>assistant\n")
    assert CONVERSATIONS["plain"].render([("user", "<image>\n")]) == "<image>\n\n"     # message + sep
    assert CONVERSATIONS["mistral_instruct"].render(turns[:1]) == "[INST] Hi [/INST]"


def test_options_are_refused_for_other_layouts(tiny_dir):
    with pytest.raises(ConfigError, match="conv_mode apply to checkpoints in the original LLaVA layout"):
        VLM.from_pretrained(tiny_dir, conv_mode="llava_v1")


@pytest.mark.parametrize("change, words", [
    ({"mm_vision_select_layer": -212}, "TinyChat's two-layer form"),
    ({"image_aspect_ratio": "anyres"}, "'anyres'"),
    ({"mm_hidden_size": 48}, "mm_hidden_size 48 differs"),
    ({"mm_projector_type": "qformer"}, "unknown projector type 'qformer'"),
    ({"model_type": "llava_mistral", "architectures": ["LlavaMistralForCausalLM"]}, "LLaMA-based LLaVA"),
    ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature 'cls'"),
])
def test_unsupported_configs_are_refused_by_name(base, tmp_path, change, words):
    ck = shutil.copytree(base, tmp_path / "c")
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(change)
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=words):
        VLM.from_pretrained(ck)


# ---- 4-bit forms -------------------------------------------------------------------------------

GROUP = 32


@pytest.fixture(scope="module")
def awq_copy(base, tmp_path_factory):
    from vlm_core.quantize import main

    out = tmp_path_factory.mktemp("orig-awq") / "llava-tiny-awq"
    assert main([str(base), str(out), "--method", "rtn", "--group-size", str(GROUP)]) == 0
    return out


def dequantized(folder):
    state = load_file(str(folder / "model.safetensors"))
    out = {}
    for k, q in state.items():
        if k.endswith(".qweight"):
            p = k[:-len("qweight")]
            out[p + "weight"] = dequantize_awq(q, state[p + "qzeros"], state[p + "scales"].float(), GROUP).t()
    return out


def test_autoawq_copy_keeps_the_layout_and_generates_as_its_dequantized_reference(awq_copy, images):
    cfg = json.loads((awq_copy / "config.json").read_text())
    assert cfg["quantization_config"]["modules_to_not_convert"] == ["vision_tower", "mm_projector", "lm_head"]
    assert cfg["mm_vision_tower"] == TOWER_ID and (awq_copy / TOWER_NAME / "config.json").is_file()
    keys = set(load_file(str(awq_copy / "model.safetensors")))
    assert {"model.layers.0.self_attn.q_proj.qweight", "model.layers.1.mlp.down_proj.scales",
            "model.mm_projector.0.weight", "lm_head.weight"} <= keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    vlm = VLM.from_pretrained(awq_copy, dtype="float32")
    ref = Reference(awq_copy, awq_copy / TOWER_NAME, dequantized(awq_copy))
    check_generation(vlm, ref, Q, images[:1], llava_v1([("user", "<image>\n" + Q)]))


@pytest.mark.parametrize("where", ["beside", "inside"])
def test_tinychat_v2_export_loads_without_reading_the_fp16_linears(base, awq_copy, tmp_path, images, monkeypatch,
                                                                  where):
    from helpers import to_v2_state

    ck = shutil.copytree(base, tmp_path / "llava-v1.5-tiny")
    v2 = to_v2_state(load_file(str(awq_copy / "model.safetensors")), GROUP)
    name = f"{ck.name}-w4-g{GROUP}-awq-v2.pt" if where == "beside" else f"llava-v1.5-tiny-w4-g{GROUP}-v2.pt"
    torch.save(v2, (tmp_path if where == "beside" else ck) / name)
    read = []
    real = llava_orig.iter_weights

    def spy(files, wanted=lambda k: True):
        for k, t in real(files, wanted):
            read.append(k)
            yield k, t

    monkeypatch.setattr(llava_orig, "iter_weights", spy)
    vlm = VLM.from_pretrained(ck, dtype="float32")
    assert vlm.model.config.quant.version == "v2" and vlm.model.config.quant.group_size == GROUP
    assert any(k.startswith("embeddings.") for k in read)             # the tower folder, read through the spy
    assert not [k for k in read if re.match(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", k)]
    monkeypatch.undo()
    want = VLM.from_pretrained(awq_copy, dtype="float32")
    assert list(vlm.generate(Q, {"image": images[:1]}, GREEDY).token_ids) == \
        list(want.generate(Q, {"image": images[:1]}, GREEDY).token_ids)



def test_cli_answers_as_the_library_with_the_tower_setting(tmp_path, images, capsys):
    from vlm_core.generate import main

    towers = tmp_path / "towers"
    write_tower(towers / TOWER_NAME)
    ck = write_checkpoint(tmp_path / "cli")
    want = VLM.from_pretrained(ck, vision_tower_dir=towers).generate(Q, {"image": images[:1]}, GREEDY).text
    capsys.readouterr()
    assert main(["--model", str(ck), "--image", str(images[0]), "--prompt", Q, "--max-new-tokens", "8",
                 "--vision-tower-dir", str(towers)]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["--model", str(ck), "--image", str(images[0]), "--prompt", Q]) == 2
    assert TOWER_ID in capsys.readouterr().err


def test_save_pretrained_names_what_saves_other_layouts(base_vlm, tmp_path):
    with pytest.raises(CheckpointError, match="save_pretrained writes VILA-family folders; original LLaVA models are "
                                              "saved with transformers"):
        base_vlm.save_pretrained(tmp_path / "out")
