"""Preparing a GPT for decoding, in one call: device, dtype and eval mode, int8 weights (--quantize int8),
MKL-packed products when several samples decode together on a CPU. (--compile decodes through
static_decoding.py.)"""
import os

import torch
import torch.nn as nn

from quantize import quantize_int8


class PackedLinear(nn.Module):
    """A frozen fp32 linear layer on CPU whose weight is also stored in MKL's packed GEMM format for products with
    exactly `rows` rows (other row counts take the ordinary product).

    A few rows at a time (samples decoding together) is where the ordinary product is at its worst, several times
    the cost of one row; the packed form, the one torch.compile's CPU freezing uses, brings them close to one row's
    cost. The packed copy takes about twice the fp32 weight's memory.
    """

    def __init__(self, linear, rows):
        super().__init__()
        self.linear, self.rows = linear, rows
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach(), rows)

    def forward(self, x):
        flat = x.reshape(-1, x.size(-1))  # (B*T, in)
        y = torch.ops.mkl._mkl_linear(flat, self.packed, self.linear.weight, self.linear.bias, self.rows)
        return y.view(*x.shape[:-1], -1)


def packable(model, rows):
    """Whether products with `rows` rows go through PackedLinear: several rows, fp32 weights on a CPU whose torch
    has MKL, and room for the packed copies (about twice the weights) in half the memory now available."""
    w = model.transformer.wte.weight
    if rows < 2 or w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkl.is_available():
        return False
    if "SC_AVPHYS_PAGES" not in getattr(os, "sysconf_names", {}):  # not a POSIX system that can tell
        return False
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 2 * sum(p.numel() * 4 for p in model.parameters()) < available / 2


def pack_for_rows(model, rows):
    """Make the block linears and the head of `model` PackedLinear for `rows` rows, if packable."""
    if packable(model, rows):
        for parent in [model] + [m for block in model.transformer.h for m in (block.attn, block.mlp)]:
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, PackedLinear(child, rows))
    return model


def prepare_for_generation(model, device, dtype, rows=1, quantize=None, compile=False):
    """`model` (a GPT) moved to `device` and `dtype` in eval mode, to decode `rows` samples together: `quantize`
    "int8" makes its linear layers int8 (see quantize.Int8Linear), else several fp32 rows on a CPU go through packed
    weights, unless the model is for a compiled step (`compile`: inductor lowers MKL's packed product only for
    weights frozen into the graph)."""
    model.to(device=device, dtype=dtype).eval()
    if quantize == "int8":
        quantize_int8(model)
    elif not compile:
        pack_for_rows(model, rows)
    return model
