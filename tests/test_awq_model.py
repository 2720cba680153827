"""Quantized checkpoints end to end: our quantizer, the loaders (AutoAWQ, quant_config.json, v2),
modules_to_not_convert, and AWQ beating RTN on a trained model with activation outliers."""

import json
import math
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from vlm_core.quant.awq import QuantizeOptions, block_output_error
from vlm_core.quant.awq_linear import AWQLinear
from vlm_core.quant.pack import dequantize_awq
from helpers import to_v2_state
from vlm_core.quantize import main as quantize_main
from vlm_core.quantize import quantize_checkpoint, text_samples
from vlm_core.tiny import COLOURS, SHAPES, build_tiny_llava
from vlm_core.vlm import VLM
from vlm_core.scoring import prompt_logits

GROUP = 32


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text("\n".join(f"USER: What colour is the {s}? ASSISTANT: The {s} is {c}." for s in SHAPES for c in COLOURS))
    return p


@pytest.fixture(scope="module")
def awq_dir(tiny_dir, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("awq") / "ckpt"
    assert quantize_main([str(tiny_dir), str(out), "--calib-text", str(calib_file), "--group-size", str(GROUP),
                          "--samples", "8", "--seq-len", "64"]) == 0
    return out


def dense_copy(vlm):
    """The same model with every AWQLinear replaced by an fp32 nn.Linear of its dequantized weight."""
    for layer in vlm.model.decoder.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, mod in list(parent.named_children()):
                if isinstance(mod, AWQLinear):
                    lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
                    lin.weight.data = dequantize_awq(mod.qweight, mod.qzeros, mod.scales.float(), mod.group_size).t()
                    if mod.bias is not None:
                        lin.bias.data = mod.bias.float()
                    setattr(parent, name, lin)
    return vlm


def test_quantized_checkpoint_format(awq_dir):
    cfg = json.loads((awq_dir / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q == {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
                 "modules_to_not_convert": ["vision_tower", "multi_modal_projector", "lm_head"]}
    from transformers import AwqConfig, LlavaConfig

    assert AwqConfig.from_dict(q).group_size == GROUP
    assert LlavaConfig.from_pretrained(str(awq_dir)).quantization_config["bits"] == 4
    state = load_file(str(awq_dir / "model.safetensors"))
    key = "language_model.model.layers.0.mlp.down_proj"
    assert state[key + ".qweight"].dtype == torch.int32 and state[key + ".qweight"].shape == (128, 64 // 8)
    assert state[key + ".qzeros"].shape == (128 // GROUP, 64 // 8) and state[key + ".scales"].shape == (4, 64)
    assert key + ".weight" not in state
    assert any(k.startswith("vision_tower.") for k in state) and "language_model.lm_head.weight" in state


def test_quantized_model_matches_fake_quantized_fp32(awq_dir, images):
    q = VLM.from_pretrained(awq_dir)
    assert isinstance(q.model.decoder.layers[0].self_attn.q_proj, AWQLinear)
    assert isinstance(q.model.projector[0], torch.nn.Linear)
    fake = dense_copy(VLM.from_pretrained(awq_dir))
    for text, ims in (("What colour is the circle?", images[:1]), ("Describe both.", images[:2])):
        a = prompt_logits(q.model, [q.request(text, {"image": ims})])[0]
        b = prompt_logits(fake.model, [fake.request(text, {"image": ims})])[0]
        assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.interpreter
def test_cpu_int4_path_matches_triton_kernel_path(awq_dir, images):
    """The CPU path (PyTorch's int4 layout, dequantize + GEMM in fp32) against the Triton kernel run on
    the AutoAWQ tensors (interpreter on CPU), on the whole model."""
    from vlm_core.quant.paths import PathTable, Rule

    q = VLM.from_pretrained(awq_dir)
    req = q.request("What colour is the circle?", {"image": images[:1]})
    linears = [m for m in q.model.modules() if isinstance(m, AWQLinear)]
    assert linears and all(m.path(1, torch.float32, torch.device("cpu")) == "cpu-dequant" for m in linears)
    cpu = prompt_logits(q.model, [req])[0]
    for m in linears:
        m.table = PathTable((Rule("cpu", "triton"),))
    kernel = prompt_logits(q.model, [req])[0]
    assert (kernel - cpu).abs().max().item() <= 1e-4


def test_autoawq_quant_config_json_is_read(awq_dir, tmp_path, images):
    other = shutil.copytree(awq_dir, tmp_path / "qc")
    cfg = json.loads((other / "config.json").read_text())
    del cfg["quantization_config"]
    (other / "config.json").write_text(json.dumps(cfg))
    (other / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": GROUP, "w_bit": 4,
                                                         "version": "GEMM"}))
    a, b = VLM.from_pretrained(awq_dir), VLM.from_pretrained(other)
    req = a.request("What colour is the circle?", {"image": images[:1]})
    assert torch.equal(prompt_logits(a.model, [req])[0], prompt_logits(b.model, [req])[0])


def test_llm_awq_v2_checkpoint_converts_at_load(awq_dir, tmp_path, images):
    """Re-encode our AutoAWQ tensors in the v2 layout (.pt, padded scales, scaled zeros) and load."""
    v2 = tmp_path / "v2"
    v2.mkdir()
    for f in awq_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, v2 / f.name)
    cfg = json.loads((v2 / "config.json").read_text())
    cfg["quantization_config"]["version"] = "v2"
    (v2 / "config.json").write_text(json.dumps(cfg))
    out = to_v2_state(load_file(str(awq_dir / "model.safetensors")), GROUP)
    torch.save(out, v2 / "llava-tiny-w4-g32-v2.pt")
    a, b = VLM.from_pretrained(awq_dir), VLM.from_pretrained(v2)
    req = a.request("What colour is the circle?", {"image": images[:1]})
    assert (prompt_logits(a.model, [req])[0] - prompt_logits(b.model, [req])[0]).abs().max().item() <= 1e-5


def test_modules_to_not_convert_stay_dense(tiny_dir, tmp_path, images):
    """A checkpoint whose MLPs were left 16-bit loads them as dense linears."""
    from vlm_core.families.llava import save_awq_checkpoint
    from vlm_core.quant.awq import quantize_linears

    fp = VLM.from_pretrained(tiny_dir)
    packed = {k: v for k, v in quantize_linears(fp.model.decoder, QuantizeOptions("rtn", GROUP)).items()
              if ".mlp." not in k}
    out = save_awq_checkpoint(tiny_dir, tmp_path / "partial", fp.model, packed, GROUP)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = ["language_model.model.layers.0.mlp", "layers.1.mlp"]
    (out / "config.json").write_text(json.dumps(cfg))
    q = VLM.from_pretrained(out)
    layer = q.model.decoder.layers[0]
    assert isinstance(layer.mlp.up_proj, torch.nn.Linear) and isinstance(layer.self_attn.q_proj, AWQLinear)
    assert torch.equal(layer.mlp.up_proj.weight, fp.model.decoder.layers[0].mlp.up_proj.weight)
    # without the exemption the dense MLP weights are not what an AWQ model expects
    cfg["quantization_config"]["modules_to_not_convert"] = []
    (out / "config.json").write_text(json.dumps(cfg))
    from vlm_core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="weights this model does not use"):
        VLM.from_pretrained(out)


# ---- AWQ vs RTN on a trained model with activation outliers ----------------------------------------------

def corpus():
    rng = random.Random(0)
    sizes = ["small", "large", "tiny", "huge"]
    places = ["left of", "right of", "above", "below"]
    sents = [f"The {z} {c} {s} is {p} the {c2} {s2}." for s in SHAPES for c in COLOURS for z in sizes
             for p in places for c2 in COLOURS[:2] for s2 in SHAPES[:1]]
    rng.shuffle(sents)
    return sents[:-40], sents[-40:]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """Tiny LLaVA whose decoder is trained on templated sentences, then given outlier channels
    (norm weights x25 on a few channels, matching input columns /25: the function is unchanged)."""
    from transformers import LlavaForConditionalGeneration

    base = build_tiny_llava(tmp_path_factory.mktemp("trained-base"), seed=5)
    model = LlavaForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32)
    tok = VLM.from_pretrained(base).tokenizer
    train, _ = corpus()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(150):
        batch = tok([train[(step * 16 + i) % len(train)] for i in range(16)], padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 1.5, f"training did not converge (loss {loss.item():.2f})"
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            ch = torch.tensor([3, 17, 40, 58])
            for norm, linears in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                           layer.self_attn.v_proj)),
                                  (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                norm.weight[ch] *= 25.0
                for lin in linears:
                    lin.weight[:, ch] /= 25.0
    out = tmp_path_factory.mktemp("trained") / "ckpt"
    model.save_pretrained(str(out))
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "preprocessor", "chat_template")):
            shutil.copy2(f, out / f.name)
    return out


def perplexity(vlm, sentences):
    nll, count = 0.0, 0
    for s in sentences:
        req = vlm.request(s, None, apply_template=False)
        logits = prompt_logits(vlm.model, [req])[0]
        ids = torch.tensor(req.prompt.token_ids)
        nll += torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


def test_awq_beats_rtn_on_block_error_and_heldout_perplexity(trained_dir, tmp_path):
    train, held_out = corpus()
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(train[:64]))
    samples_fn = lambda vlm: text_samples(vlm, calib, 16, 64)  # noqa: E731
    awq = quantize_checkpoint(trained_dir, tmp_path / "awq", samples_fn, QuantizeOptions("awq", GROUP), progress=False)
    rtn = quantize_checkpoint(trained_dir, tmp_path / "rtn", samples_fn, QuantizeOptions("rtn", GROUP), progress=False)
    fp = VLM.from_pretrained(trained_dir)
    m_awq, m_rtn = VLM.from_pretrained(awq), VLM.from_pretrained(rtn)
    eval_samples = text_samples(fp, calib, 8, 64)
    err_awq = block_output_error(fp.model.decoder, m_awq.model.decoder, eval_samples)
    err_rtn = block_output_error(fp.model.decoder, m_rtn.model.decoder, eval_samples)
    ppl_fp, ppl_awq, ppl_rtn = (perplexity(m, held_out) for m in (fp, m_awq, m_rtn))
    print(f"block MSE awq={err_awq:.3e} rtn={err_rtn:.3e}; held-out ppl fp={ppl_fp:.3f} awq={ppl_awq:.3f} "
          f"rtn={ppl_rtn:.3f}")
    assert err_awq < err_rtn
    assert ppl_awq < ppl_rtn


def test_multimodal_calibration_jsonl(tiny_dir, images, tmp_path):
    from vlm_core.quantize import multimodal_samples

    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p, "images": [str(images[i].resolve())]})
                               for i, p in enumerate(["What colour is the circle?", "How many shapes?"])))
    fp = VLM.from_pretrained(tiny_dir)
    samples = multimodal_samples(fp, jsonl, 8, 512)
    req = fp.request("What colour is the circle?", {"image": images[:1]})
    span = req.prompt.spans[0]
    assert len(samples) == 2 and samples[0].shape[0] == len(req.prompt)
    assert torch.equal(samples[0][span.offset:span.end], req.media_embeds[0])
    out = tmp_path / "mm-awq"
    assert quantize_main([str(tiny_dir), str(out), "--calib-jsonl", str(jsonl), "--group-size", "64"]) == 0
    q = VLM.from_pretrained(out)
    assert q.model.decoder.layers[1].mlp.down_proj.group_size == 64
    assert q.generate("What colour is the circle?", {"image": images[:1]}).finish_reason in ("stop", "length")


def test_quantize_cli_requires_calibration_for_awq(tiny_dir, tmp_path, capsys):
    assert quantize_main([str(tiny_dir), str(tmp_path / "x")]) == 2
    assert "AWQ needs calibration data" in capsys.readouterr().err
    assert quantize_main([str(tiny_dir), str(tmp_path / "y"), "--method", "rtn", "--group-size", "48"]) == 2
    assert "AWQ group size 48 is not one of" in capsys.readouterr().err
