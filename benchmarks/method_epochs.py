"""bench.py's rows of `LoRA --method` and `--grad_checkpoint`: an epoch per side, each in a process of its own, timed
and with its peak memory (CUDA's max_memory_allocated on a GPU, the process's peak RSS on a CPU)."""
import json
from pathlib import Path
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.training_peers import cola_sample, hf_peft_classifier, peer_epoch, shuffled_batches, synchronize
from model import EOT, METHODS, GPTClassifier, cast_frozen_linears, inject_lora, load_config, variant_slug
from runtime.devices import compute_dtype, default_micro_batch_tokens, loss_scaler
from textdata.readers import default_cola_dir
from train_utils import activation_bytes_per_token, cross_entropy, train_epoch


def method_model(method, side, variant, dtype):
    """Ours (`run.py LoRA --method METHOD`'s model, frozen linears stored in `dtype`), or the Hugging Face peer
    training the same tensors: PEFT's LoRA, every weight, or GPT2ForSequenceClassification's score head and
    LayerNorms."""
    from transformers import GPT2Config, GPT2ForSequenceClassification
    if side == "ours":
        ours = GPTClassifier.from_random(variant)
        if method == "lora":
            inject_lora(ours, 4, 4)
        return cast_frozen_linears(METHODS[method](ours), dtype)
    c = load_config(variant)
    if method == "lora":
        return hf_peft_classifier(c)
    peer = GPT2ForSequenceClassification(GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                                                    pad_token_id=EOT, num_labels=2))
    return METHODS[method](peer)  # head: score and the LayerNorms, by the same rule as ours


def method_epoch(method, side, variant, n, device_name, grad_checkpoint=False):
    """One training epoch of `side` ("ours", "peer") for --method `method` on `n` CoLA sentences, in this process:
    (seconds, peak bytes during the epoch: CUDA's max_memory_allocated on a GPU, this process's peak RSS on a CPU,
    the weights included, their building not)."""
    device = torch.device(device_name)
    dtype = compute_dtype("auto", device, training=True)
    _, split = cola_sample(default_cola_dir(), n)
    model = method_model(method, side, variant, dtype).to(device)
    if grad_checkpoint:
        model.grad_checkpoint = True
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    reset_peak_memory(device)
    start = time.perf_counter()
    if side == "ours":
        train_epoch(model, split, cross_entropy, optimizer, batch_size=128, generator=torch.Generator().manual_seed(0),
                    device=device, dtype=dtype, scaler=loss_scaler(device, dtype),
                    micro_batch_tokens=default_micro_batch_tokens(device, activation_bytes_per_token(model)))
    else:
        peer_epoch(model, optimizer, split, shuffled_batches(len(split), 128, seed=0), dtype, device)
    synchronize(device)
    return time.perf_counter() - start, peak_memory(device)


def reset_peak_memory(device):
    """Start the peak over: CUDA's counter, or Linux's peak RSS of this process (VmHWM), which then is the RSS now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device):
    """Bytes at the peak since reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024  # kB


def measured_in_child(*args, **kwargs):
    """method_epoch(*args, **kwargs) in a fresh process, so that each peak is its own run's."""
    call = ("import json; from benchmarks.method_epochs import method_epoch; "
            f"print(json.dumps(method_epoch(*{args!r}, **{kwargs!r})))")
    out = subprocess.run([sys.executable, "-c", call], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).parents[1])
    return json.loads(out.stdout.splitlines()[-1])


def memory_row(title, ours, peer, runs, target):
    """A row of medians of (seconds, peak bytes) per side: the time ratio and both peaks (target: ours' peak at most
    `target` times the peer's)."""
    seconds = {side: statistics.median(r[0] for r in runs[side]) for side in runs}
    peak = {side: statistics.median(r[1] for r in runs[side]) / 2 ** 30 for side in runs}
    ratio = peak["ours"] / peak["peer"]
    return {"case": title, "ours": f"{ours} {seconds['ours']:.2f}s, {peak['ours']:.2f} GB",
            "peer": f"{peer} {seconds['peer']:.2f}s, {peak['peer']:.2f} GB", "ours_s": seconds["ours"],
            "peer_s": seconds["peer"], "ours_peak_gb": peak["ours"], "peer_peak_gb": peak["peer"],
            "ratio": f"time {seconds['peer'] / seconds['ours']:.2f}x, peak {ratio:.2f}x",
            "target": f"peak <= {target}x", "met": ratio <= target, "reps": len(runs["ours"])}


def alternate_children(calls, reps):
    """{side: [(seconds, peak)] * reps}, the sides' processes run in turn (A B A B ...)."""
    runs = {side: [] for side in calls}
    for _ in range(reps):
        for side, (args, kwargs) in calls.items():
            runs[side].append(measured_in_child(*args, **kwargs))
    return runs


def tiny_variant():
    """A folder holding a 2-layer GPT-2's config.json alone (random weights only): --quick's architecture."""
    folder = Path(tempfile.gettempdir()) / "bench-tiny-gpt2"
    folder.mkdir(exist_ok=True)
    config = {"n_positions": 1024, "vocab_size": 50257, "n_layer": 2, "n_head": 2, "n_embd": 64}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def method_cases(reps, n, device="cpu", variant="gpt2"):
    """One row per --method: an epoch of `n` CoLA sentences, ours against HF (+ PEFT for LoRA) training the same
    tensors in the same dtype, each epoch in a process of its own."""
    peers = {"lora": "HF + PEFT", "full": "HF, every weight", "head": "HF, score + LayerNorms"}
    for method, peer in peers.items():
        runs = alternate_children({side: ((method, side, variant, n, device), {}) for side in ("ours", "peer")}, reps)
        yield memory_row(f"LoRA --method {method} epoch, {n} CoLA sentences, {variant_slug(variant)}, batch 128 "
                         f"({device})",
                         f"run.py LoRA --method {method}", f"{peer}, shuffled, padded", runs, target=1.0)


def grad_checkpoint_case(reps, n, device="cpu", variant="gpt2-medium"):
    """--grad_checkpoint against without: an epoch of LoRA on `n` CoLA sentences, each in a process of its own."""
    runs = alternate_children({"ours": (("lora", "ours", variant, n, device), {"grad_checkpoint": True}),
                               "peer": (("lora", "ours", variant, n, device), {})}, reps)
    return memory_row(f"LoRA --grad_checkpoint epoch, {n} CoLA sentences, {variant_slug(variant)} ({device})",
                      "--grad_checkpoint", "without", runs, target=0.9)
