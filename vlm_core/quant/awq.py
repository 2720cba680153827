"""AWQ quantizer (activation-aware weight quantization) for the LLaVA decoder, and RTN.

Per decoder block, on cached block inputs from calibration samples:
  1. scale search: for each scaling group
         input_layernorm          -> q_proj, k_proj, v_proj
         v_proj                   -> o_proj          (only when their shapes match, i.e. no GQA)
         post_attention_layernorm -> gate_proj, up_proj
         up_proj                  -> down_proj
     try s = mean|x|^a (normalised by sqrt(max * min)) for a in {0, 0.05, ..., 0.95}: fold s into
     the group's linears (w * s, quantized, then / s) and keep the a whose block output has the
     lowest MSE against the unquantized block. The chosen s is folded for real: the producer
     (norm weight or v_proj rows) is divided by s, the consumers' input columns multiplied by s.
  2. clipping search: for every linear but q/k, per output row and group, shrink the weight's
     max |w| by 0..45% in 5% steps (20-point grid, up to half) and keep the clip whose
     quantized output on the calibration inputs is closest to the unquantized output.
  3. the block input of the next block is computed by the scaled and clipped (unquantized) block.
Finally every decoder linear is quantized to asymmetric uint4 with a zero point per group.
RTN skips steps 1-2.

The vision tower and projector stay 16-bit. The result is written as an AutoAWQ gemm
checkpoint in the source checkpoint's own key layout (see `checkpoint.save_awq_copy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from ..config import AWQConfig
from ..models.attention import UncachedKV
from ..models.llama import LlamaDecoder, LlamaDecoderLayer
from .pack import pack_awq

N_GRID = 20
MAX_SHRINK = 0.5
CLIP_SAMPLE_TOKENS = 512
CLIP_ROW_BATCH = 256
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class QuantizeOptions:
    method: str = "awq"          # "awq" | "rtn"
    group_size: int = 128
    w_bit: int = 4
    zero_point: bool = True

    def __post_init__(self):
        if self.method not in ("awq", "rtn"):
            raise ValueError(f"method must be 'awq' or 'rtn', got {self.method!r}")
        AWQConfig(group_size=self.group_size, bits=self.w_bit, zero_point=self.zero_point)


# ---- uint4 with zero point ---------------------------------------------------------------------

def quantize_groups(w: torch.Tensor, group_size: int, w_bit: int = 4
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int32 [N, K], scales fp32 [N, K/g], zeros int32 [N, K/g]), w ~ (q - z) * s."""
    n, k = w.shape
    qmax = 2 ** w_bit - 1
    g = w.float().reshape(n, k // group_size, group_size)
    wmax = g.amax(-1)
    wmin = g.amin(-1)
    scales = ((wmax - wmin).clamp(min=1e-5) / qmax)
    zeros = (-torch.round(wmin / scales)).clamp(0, qmax)
    q = (torch.round(g / scales[..., None]) + zeros[..., None]).clamp(0, qmax)
    return q.reshape(n, k).to(torch.int32), scales, zeros.to(torch.int32)


def fake_quantize(w: torch.Tensor, group_size: int, w_bit: int = 4) -> torch.Tensor:
    """Quantize-dequantize w [N, K] (same dtype out)."""
    q, s, z = quantize_groups(w, group_size, w_bit)
    n, k = w.shape
    deq = (q.float().view(n, -1, group_size) - z[..., None].float()) * s[..., None]
    return deq.reshape(n, k).to(w.dtype)


# ---- calibration forward -------------------------------------------------------------------------

class _BlockRunner:
    """Runs one decoder block on the flattened calibration batch."""

    def __init__(self, decoder: LlamaDecoder, lengths: Sequence[int], device):
        self.kv = UncachedKV(lengths)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
        self.cos, self.sin = decoder.rotary.cos_sin(positions, decoder.embed_tokens.weight.dtype)

    @torch.no_grad()
    def __call__(self, layer: LlamaDecoderLayer, x: torch.Tensor) -> torch.Tensor:
        out, residual = layer(x, self.cos, self.sin, self.kv)
        return out + residual

    @torch.no_grad()
    def inputs_of(self, layer: LlamaDecoderLayer, x: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Inputs seen by the named linears of `layer` when it runs on x."""
        seen: dict[str, torch.Tensor] = {}
        hooks = [layer.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0]))
                 for n in names]
        try:
            self(layer, x)
        finally:
            for h in hooks:
                h.remove()
        return seen


def _scaling_groups(layer: LlamaDecoderLayer):
    """(producer, consumer linears, name of the linear whose input is the group's input)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], "self_attn.q_proj")]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append((attn.v_proj, [attn.o_proj], "self_attn.o_proj"))
    groups.append((layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], "mlp.gate_proj"))
    groups.append((mlp.up_proj, [mlp.down_proj], "mlp.down_proj"))
    return groups


@torch.no_grad()
def _search_scale(run: _BlockRunner, layer, x, org_out, linears: list[nn.Linear], inp: torch.Tensor,
                  opts: QuantizeOptions) -> torch.Tensor:
    x_mean = inp.abs().float().reshape(-1, inp.shape[-1]).mean(0)
    originals = [fc.weight.data.clone() for fc in linears]
    best_err, best_s = float("inf"), None
    try:
        for i in range(N_GRID):
            s = x_mean.pow(i / N_GRID).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for fc, w in zip(linears, originals):
                fc.weight.data = fake_quantize(w * s.to(w.dtype), opts.group_size, opts.w_bit) / s.to(w.dtype)
            err = (run(layer, x) - org_out).float().pow(2).mean().item()
            if err < best_err:
                best_err, best_s = err, s
    finally:
        for fc, w in zip(linears, originals):
            fc.weight.data = w
    return best_s


@torch.no_grad()
def _apply_scale(producer: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    s = s.to(producer.weight.dtype)
    if isinstance(producer, nn.Linear):      # v_proj -> o_proj: scale v's output rows
        producer.weight.data = producer.weight.data / s[:, None]
        if producer.bias is not None:
            producer.bias.data = producer.bias.data / s
    else:                                    # RMSNorm weight
        producer.weight.data = producer.weight.data / s
    for fc in linears:
        fc.weight.data = fc.weight.data * s[None, :]


@torch.no_grad()
def _search_clip(fc: nn.Linear, inp: torch.Tensor, opts: QuantizeOptions) -> torch.Tensor:
    """Best max |w| per (row, group): [N, K/g, 1]."""
    g = opts.group_size
    w = fc.weight.data.float()
    n, k = w.shape
    x = inp.float().reshape(-1, k)
    if x.shape[0] > CLIP_SAMPLE_TOKENS:
        x = x[torch.linspace(0, x.shape[0] - 1, CLIP_SAMPLE_TOKENS).long()]
    x = x.view(1, x.shape[0], k // g, g)                                  # [1, T, G, g]
    best = []
    for r0 in range(0, n, CLIP_ROW_BATCH):
        wb = w[r0:r0 + CLIP_ROW_BATCH].view(-1, 1, k // g, g)             # [n, 1, G, g]
        org_out = (x * wb).sum(-1)                                        # [n, T, G]
        org_max = wb.abs().amax(-1, keepdim=True)                         # [n, 1, G, 1]
        best_max = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        for i in range(int(MAX_SHRINK * N_GRID)):
            max_val = org_max * (1 - i / N_GRID)
            cur = torch.clamp(wb, -max_val, max_val)
            q = fake_quantize(cur.reshape(-1, k), g, opts.w_bit).view_as(wb)
            err = ((x * q).sum(-1) - org_out).pow(2).mean(1).view_as(min_err)
            better = err < min_err
            min_err[better] = err[better]
            best_max[better] = max_val[better]
        best.append(best_max.view(-1, k // g, 1))
    return torch.cat(best)


@torch.no_grad()
def _apply_clip(fc: nn.Linear, max_val: torch.Tensor, group_size: int) -> None:
    w = fc.weight.data
    n, k = w.shape
    g = w.view(n, k // group_size, group_size)
    fc.weight.data = torch.clamp(g, -max_val.to(w.dtype), max_val.to(w.dtype)).reshape(n, k)


def calibrate_decoder(decoder: LlamaDecoder, samples: Sequence[torch.Tensor], opts: QuantizeOptions,
                      progress: bool = True) -> None:
    """Apply AWQ scales and clips to `decoder` in place (no-op for RTN).

    samples: input embeddings of the calibration sequences, each [L_i, H].
    """
    if opts.method == "rtn":
        return
    from tqdm import tqdm

    device = decoder.embed_tokens.weight.device
    run = _BlockRunner(decoder, [s.shape[0] for s in samples], device)
    x = torch.cat(list(samples)).to(device, decoder.embed_tokens.weight.dtype)
    for layer in tqdm(decoder.layers, desc="AWQ", unit="block", disable=not progress):
        org_out = run(layer, x)
        groups = _scaling_groups(layer)
        feats = run.inputs_of(layer, x, [name for _, _, name in groups])
        scales = [_search_scale(run, layer, x, org_out, linears, feats[name], opts)
                  for _, linears, name in groups]
        for (producer, linears, _), s in zip(groups, scales):
            _apply_scale(producer, linears, s)
        clip_names = [n for n in LINEAR_NAMES if n not in ("self_attn.q_proj", "self_attn.k_proj")]
        feats = run.inputs_of(layer, x, clip_names)
        for name in clip_names:
            fc = layer.get_submodule(name)
            _apply_clip(fc, _search_clip(fc, feats[name], opts), opts.group_size)
        x = run(layer, x)


def quantize_linears(decoder: LlamaDecoder, opts: QuantizeOptions) -> dict[str, dict[str, torch.Tensor]]:
    """AutoAWQ gemm tensors for every decoder linear, keyed by decoder-relative module name."""
    out = {}
    for i, layer in enumerate(decoder.layers):
        for name in LINEAR_NAMES:
            fc = layer.get_submodule(name)
            q, s, z = quantize_groups(fc.weight.data, opts.group_size, opts.w_bit)
            out[f"layers.{i}.{name}"] = {
                "qweight": pack_awq(q.t().contiguous()),   # [K, N/8]
                "qzeros": pack_awq(z.t().contiguous()),    # [K/g, N/8]
                "scales": s.t().contiguous(),              # [K/g, N]
            }
    return out


def block_output_error(decoder_fp: LlamaDecoder, decoder_q: LlamaDecoder, samples: Sequence[torch.Tensor]) -> float:
    """Mean over blocks of the MSE between quantized and fp block outputs, each fed the fp block input."""
    run = _BlockRunner(decoder_fp, [s.shape[0] for s in samples], decoder_fp.embed_tokens.weight.device)
    x = torch.cat(list(samples)).to(decoder_fp.embed_tokens.weight.dtype)
    errs = []
    for lf, lq in zip(decoder_fp.layers, decoder_q.layers):
        ref = run(lf, x)
        errs.append((run(lq, x) - ref).float().pow(2).mean().item())
        x = ref
    return sum(errs) / len(errs)
