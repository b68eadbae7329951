"""int8 linear layers (--quantize int8, for gen and predict)."""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPTClassifier


def dynamic_int8_pack(weight, scale, bias):
    """`weight` (out, in) int8 with per-row fp32 `scale`, and `bias`, packed for FBGEMM's dynamic int8 linear, or None
    where torch's quantized engine is not FBGEMM's (x86 builds have it). Packing needs a quantized tensor, whose
    creation torch marks deprecated (torch is pinned here): the warning is silenced for that one call."""
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        q = torch._make_per_channel_quantized_tensor(weight, scale.double(), torch.zeros_like(scale, dtype=torch.long),
                                                     0)
    return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.float())


# Without VNNI, FBGEMM multiplies uint8 by int8 in pairs summed in int16, which 8-bit activations can overflow:
# there the activations get 7 bits (reduce_range).
REDUCE_RANGE = not torch.cpu._is_vnni_supported()


class Int8Linear(nn.Module):
    """A frozen linear layer with int8 weights and one scale per output channel.

    One row (a decoding step of one sample) goes through FBGEMM's dynamic int8 linear, what CTranslate2 does on a
    CPU: the row is quantized to 8 bits with its own range, multiplied by the int8 weights in integers (VNNI where
    the CPU has it), and scaled back in fp32 with the bias added, one operation. Several rows (a prompt, samples
    decoding together) go through torch's weight-only _weight_int8pack_mm: one range for all the rows of a prompt
    would cost them precision; so do the rows of a compiled step (dynamo cannot trace FBGEMM's packed weights).
    _weight_int8pack_mm reads the int8 weights as they are, a quarter of fp32's bytes;
    it wants bf16 activations and scales (with fp32 ones it falls back to a path slower than fp32 itself), so
    activations are cast to bf16 for the product and back after it. FBGEMM's packed copy of the weights takes as
    much memory as the int8 weights.
    Elsewhere than on CPU there is no such kernel: the weights are dequantized for an ordinary product in the
    activations' dtype (fp16 on a T4, which has no bf16 arithmetic).

    `centered` (for the LM head) quantizes each row's difference from the mean row, and adds x . mean_row, the
    part every output shares, in fp32. The outputs' mean over the vocabulary is exactly that part, and logits can
    sit far from zero while they differ by a few units: a row's scale then covers what distinguishes it, and the
    kernel's bf16 output (8 significant bits) rounds numbers the size of those differences, not of the logits.
    """

    def __init__(self, linear, centered=False, one_row=True):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        mean_row = w.mean(dim=0) if centered else None  # (in,)
        if centered:
            w = w - mean_row
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # (out,): each row's largest weight maps to 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_buffer("mean_row", mean_row)
        on_cpu = one_row and w.device.type == "cpu"  # one_row False: never one row (a classifier's batches)
        self.packed = dynamic_int8_pack(self.weight, self.scale.float(), self.bias) if on_cpu else None

    def forward(self, x):
        if x.device.type != "cpu":
            return F.linear(x, self.dequantized(x.dtype), self.bias)
        if self.packed is not None and x.numel() == x.size(-1) and not torch.compiler.is_compiling():  # one row
            y = torch.ops.quantized.linear_dynamic(x.reshape(1, -1).float(), self.packed, REDUCE_RANGE)
            y = y.view(*x.shape[:-1], -1)  # the bias is added
        else:
            rows = x.reshape(-1, x.size(-1)).to(torch.bfloat16)  # (B*T, in)
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scale).view(*x.shape[:-1], -1)
            if self.bias is not None:
                y = y + self.bias  # a bf16 product plus an fp32 bias adds in fp32 (exactly as casting first)
        if self.mean_row is not None:
            y = y + (x.float() @ self.mean_row).unsqueeze(-1)  # the shared part of every output, in fp32
        return y.to(x.dtype)  # no copy when it already is

    def dequantized(self, dtype):
        """The (out, in) weight that the int8 values, their scales and the mean row stand for, in `dtype`."""
        w = self.weight.to(dtype) * self.scale.to(dtype)[:, None]
        return w if self.mean_row is None else w + self.mean_row.to(dtype)


def quantize_int8(model):
    """Replace the linear layers of every block, and the head, with Int8Linear, for inference.

    The LM head shares its weight with the token embedding: the head gets an int8 copy, centered (see
    Int8Linear), and the embedding stays as it is. A classifier's head is its `score` layer; a classifier reads
    batches of sentences, never one row, so its layers get no FBGEMM copy.
    """
    decoder = not isinstance(model, GPTClassifier)
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                setattr(parent, name, Int8Linear(child, one_row=decoder))
    if not decoder:
        model.score = Int8Linear(model.score, one_row=False)
    else:
        model.lm_head = Int8Linear(model.lm_head, centered=True)
    return model
