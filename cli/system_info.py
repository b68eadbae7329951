"""`run.py info`: what a bug report needs (versions, hardware, what --dtype auto picks, where the data is)."""
import contextlib
import os
from pathlib import Path
import sys

import torch

from runtime.devices import compute_dtype, default_micro_batch_tokens, has_fast_bf16
from textdata.readers import COLA_SPLITS, default_cola_dir


def package_versions():
    import importlib.metadata
    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "peft", "tiktoken"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_name():
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    import platform
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cuda_devices():
    """One line per CUDA device: name, compute capability, memory, and whether it runs bf16 natively."""
    lines = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        lines.append(f"cuda:{i} {p.name}, capability {p.major}.{p.minor}, {total / 2 ** 30:.1f} GiB "
                     f"({free / 2 ** 30:.1f} free), bf16 {'native' if p.major >= 8 else 'emulated only'}")
    return lines or [f"none ({'no device' if torch.backends.cuda.is_built() else 'torch built without CUDA'})"]


def where(path, present):
    return f"{path} ({'present' if present else 'missing: fetched on first use'})"


def data_locations():
    """Where the tokenizer, CoLA and the Hugging Face hub cache are, and whether they are there."""
    import tempfile as tmp
    tiktoken_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tmp.gettempdir(), "data-gym-cache")  # tiktoken's default
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    cola = Path(default_cola_dir())
    return {"tokenizer": where(tiktoken_dir, Path(tiktoken_dir).is_dir() and any(Path(tiktoken_dir).iterdir())),
            "CoLA (--data_dir default)": where(cola, all((cola / n).exists() for n in COLA_SPLITS.values())),
            "Hugging Face hub cache": where(hub, Path(hub).is_dir())}


def system_report(device, bytes_per_token, checkpointed_bytes_per_token):
    """`run.py info`: versions, hardware, what each subcommand would choose on `device`, where the data is."""
    dtype = lambda training: str(compute_dtype("auto", device, training)).removeprefix("torch.")
    cpu_bf16 = has_fast_bf16(torch.device("cpu"))
    lines = [", ".join(f"{k} {v}" for k, v in package_versions().items()),
             f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
             f"bf16 matmuls {'fast (AMX/AVX512-BF16)' if cpu_bf16 else 'slow (no AMX/AVX512-BF16)'}, "
             f"fp32 matmul precision {torch.get_float32_matmul_precision()}",
             *[f"CUDA: {line}" for line in cuda_devices()],
             f"MPS: {'available' if torch.backends.mps.is_available() else 'not available'}",
             f"chosen here with --dtype auto: device {device}",
             f"  gen: {dtype(False)}",
             f"  predict: {dtype(False)}",
             f"  LoRA, rnn, distil: {dtype(True)}{' with loss scaling' if dtype(True) == 'float16' else ''}, "
             f"micro-batch {default_micro_batch_tokens(device, bytes_per_token)} tokens (LoRA on gpt2), "
             f"{default_micro_batch_tokens(device, checkpointed_bytes_per_token)} with --grad_checkpoint"]
    lines += [f"{name}: {place}" for name, place in data_locations().items()]
    return "\n".join(lines)
