"""Preparing a GPT for decoding, in one call: device, dtype and eval mode, int8 weights (--quantize int8),
products through packed weights on a CPU. (--compile decodes through static_decoding.py.)"""
import os

import torch
import torch.nn as nn

from decoding.int8_linears import quantize_int8
from runtime.devices import has_fast_bf16


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


class OneDNNPackedLinear(nn.Module):
    """A frozen linear layer on CPU whose weight is also stored in oneDNN's packed layout (the one torch.compile's
    CPU freezing gives linears), for bf16 weights and rows in any number, or fp32 weights and one row.

    In bf16 the products are the plain ones bit for bit, and one-row products read the weight markedly faster
    than from its plain layout. In fp32, one row (a matrix-vector product) is where oneDNN's kernels read the
    weight faster than torch's plain product (MKL's GEMM; figures in docs/performance.md), with the same products
    up to rounding. The packed copy takes as much memory as the weight."""

    def __init__(self, linear, rows):
        super().__init__()
        self.linear = linear
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)  # rows: a hint

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.linear.bias, "none", [], "")


def packed_class(model, rows):
    """The packed linear layer for decoding `rows` samples together with `model`, None for plain products: on a
    CPU where torch has oneDNN, oneDNN's for bf16 weights where bf16 is native (any rows) and for fp32 weights and
    one row; MKL's for fp32 weights and several rows; each when the packed copies fit in half the memory now
    available."""
    w = model.transformer.wte.weight
    if w.device.type != "cpu" or "SC_AVPHYS_PAGES" not in getattr(os, "sysconf_names", {}):  # a POSIX host tells
        return None
    onednn = torch.backends.mkldnn.is_available()
    if onednn and (w.dtype == torch.bfloat16 and has_fast_bf16(w.device) or w.dtype == torch.float32 and rows == 1):
        cls, copies = OneDNNPackedLinear, 1
    elif w.dtype == torch.float32 and rows >= 2 and torch.backends.mkl.is_available():
        cls, copies = PackedLinear, 2
    else:
        return None
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return cls if copies * weights < available / 2 else None


def pack_for_rows(model, rows):
    """Make the block linears and the head of `model` packed linear layers for `rows` rows, where packable."""
    cls = packed_class(model, rows)
    if cls is not None:
        for parent in [model] + [m for block in model.transformer.h for m in (block.attn, block.mlp)]:
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, cls(child, rows))
    return model


def prepare_for_generation(model, device, dtype, rows=1, quantize=None, compile=False):
    """`model` (a GPT) moved to `device` and `dtype` in eval mode, to decode `rows` samples together: `quantize`
    "int8" makes its linear layers int8 (see quantize.Int8Linear), else products on a CPU go through packed weights
    where packed_class says so, unless the model is for a compiled step (`compile`: inductor lowers packed products
    only for weights frozen into the graph)."""
    model.to(device=device, dtype=dtype).eval()
    if quantize == "int8":
        quantize_int8(model)
    elif not compile:
        pack_for_rows(model, rows)
    return model
