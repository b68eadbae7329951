"""Where and in which precision a model runs: --device, the --dtype auto rule, loss scaling, autocast, the
micro-batch size."""
import contextlib

import torch

from utils import UserError


def resolve_device(name):
    """`--device` as a torch.device: auto is CUDA if present, else an Apple GPU (MPS) if present, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{torch.cuda.current_device()}")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: no Apple GPU (MPS) is available here (use --device cpu)")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (try auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def has_fast_bf16(device):
    """True where bf16 matmuls beat fp32: a GPU that runs bf16 natively (compute capability 8.0 and up: A100, H100,
    RTX 30xx and later; every ROCm GPU), or a CPU with AMX / AVX512-BF16. A T4 or V100 only emulates bf16, slower
    than fp32. Not `torch.cuda.is_bf16_supported()`: it answers for the current GPU, not `device`, and True on a T4
    unless emulation is excluded."""
    if device.type == "cuda":
        return bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8
    # Not mkldnn's bf16 support: it is true on any AVX512 CPU, where oneDNN emulates bf16, slower than fp32.
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def auto_dtype(device, training):
    """What `--dtype auto` runs, the one place that decides it, by the hardware alone (nothing is timed, so the same
    command gives the same result on the same machine). CUDA: bf16 where it is native, else fp16 on tensor cores
    (capability 7.x: T4, V100; training then scales the loss), else fp32. Apple's MPS: fp16 to decode and classify,
    fp32 to train (no loss scaling there yet). CPU: bf16 where it is native (AVX512-BF16 or AMX), else fp32."""
    if device.type == "cuda":
        if has_fast_bf16(device):
            return torch.bfloat16
        return torch.float16 if torch.cuda.get_device_capability(device) >= (7, 0) else torch.float32
    if device.type == "mps":
        return torch.float32 if training else torch.float16
    return torch.bfloat16 if has_fast_bf16(device) else torch.float32


def compute_dtype(flag, device, training=False):
    """The dtype that `--dtype` asks for, to train or to run a trained model (decoding, prediction)."""
    if flag == "auto":
        return auto_dtype(device, training)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[flag]


def loss_scaler(device, dtype):
    """fp16 gradients underflow: scale the loss up before backward and the gradients down before the step, skipping
    a step whose gradients overflowed (PyTorch's GradScaler). bf16 and fp32 need none: a disabled scaler passes
    everything through."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def autocast(device, dtype):
    """Mixed precision for `dtype` lower than fp32, nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_device(t, device):
    """A host tensor on `device`; to a GPU from pinned memory, without waiting for the copy (pinning needs CUDA)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def default_micro_batch_tokens(device, bytes_per_token=None):
    """Padded tokens per piece of a batch. CPU: 512 (larger pieces are no faster there, and it keeps a gpt2-medium
    run under 3 GB). CUDA: what half the free memory holds at `bytes_per_token` of activations (an estimate; a piece
    that still runs out of memory is halved), a power of two from 256 to 65536."""
    if device.type != "cuda" or not bytes_per_token:
        return 512
    free, _ = torch.cuda.mem_get_info(device)
    tokens = max(256, min(65536, free // 2 // bytes_per_token))
    return 1 << (int(tokens).bit_length() - 1)


def compiled(model, on):
    """`torch.compile(model)` for --compile, else the model itself."""
    return torch.compile(model) if on else model
