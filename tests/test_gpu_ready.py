"""Ready for the GPUs users have, checked on a CPU: the dtype chosen for a T4, an A100 and no GPU (CUDA faked);
fp16 loss scaling skips and counts an overflowing step; an out-of-memory piece is halved and the step retried;
the CUDA code path reads nothing back per micro-batch; `pytest -m gpu` skips the GPU tests here."""
import json
import math
import os
import re
import subprocess
import sys
import types

import pytest
import torch

from cli import commands
from conftest import ROOT, tiny_lora_classifier
from model import GPTClassifier
import run
from runtime import devices
from textdata import readers as data
from textdata.batches import Split, load_splits
import train_utils
from train_utils import cross_entropy, train_epoch
import utils

GPUS = {"t4": ("Tesla T4", 7, 5), "a100": ("NVIDIA A100-SXM4-40GB", 8, 0)}
CPU_CHOICE = torch.bfloat16 if devices.has_fast_bf16(torch.device("cpu")) else torch.float32

# Imported by the `run.py info` child (PYTHONPATH): makes torch.cuda answer as FAKE_GPU would. The attributes are
# patched on the module, so PyTorch's own is_bf16_supported and get_device_capability run on the fake answers.
SHIM = '''
import os, types, torch
name, major, minor = os.environ["FAKE_GPU"].split(",")
props = types.SimpleNamespace(name=name, major=int(major), minor=int(minor), total_memory=16 * 2 ** 30)
for attr, value in {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
                    "get_device_properties": lambda device=None: props,
                    "_check_bf16_tensor_supported": lambda device: True,  # a T4 or V100 emulates bf16
                    "mem_get_info": lambda device=None: (14 * 2 ** 30, 16 * 2 ** 30)}.items():
    setattr(torch.cuda, attr, value)
'''


def fake_gpu(monkeypatch, gpu):
    """torch.cuda made to look like `gpu` (a GPUS key), or like no GPU at all (None)."""
    if gpu is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        return
    name, major, minor = GPUS[gpu]
    props = types.SimpleNamespace(name=name, major=major, minor=minor, total_memory=16 * 2 ** 30)
    for attr, value in {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
                        "get_device_properties": lambda device=None: props,
                        "_check_bf16_tensor_supported": lambda device: True,
                        "mem_get_info": lambda device=None: (14 * 2 ** 30, 16 * 2 ** 30)}.items():
        monkeypatch.setattr(torch.cuda, attr, value)


@pytest.mark.parametrize("gpu, expected", [("t4", torch.float16), ("a100", torch.bfloat16), (None, CPU_CHOICE)])
def test_dtype_follows_the_capability(monkeypatch, gpu, expected):
    fake_gpu(monkeypatch, gpu)
    device = devices.resolve_device("auto")
    assert device.type == ("cpu" if gpu is None else "cuda")
    if gpu == "t4":
        assert torch.cuda.is_bf16_supported()  # what made the old choice emulated bf16
    assert devices.compute_dtype("auto", device, training=True) == expected
    assert devices.compute_dtype("auto", device, training=False) == expected


def test_each_gpu_of_a_mixed_machine_gets_its_own_dtype(monkeypatch):
    fake_gpu(monkeypatch, "a100")  # cuda:0, the current device

    def properties(device=None):
        name, major, minor = (GPUS["a100"], GPUS["t4"])[torch.device(device or "cuda:0").index or 0]
        return types.SimpleNamespace(name=name, major=major, minor=minor, total_memory=16 * 2 ** 30)

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    assert devices.compute_dtype("auto", torch.device("cuda:0")) == torch.bfloat16
    assert devices.compute_dtype("auto", torch.device("cuda:1")) == torch.float16


def test_a_gpu_index_past_the_machines_is_one_line(monkeypatch):
    fake_gpu(monkeypatch, "t4")
    assert devices.resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(utils.UserError, match=r"--device cuda:1: this machine has 1 CUDA device\(s\), cuda:0 to"):
        devices.resolve_device("cuda:1")


def test_side_by_side_slots_take_the_visible_gpus_in_turn(monkeypatch):
    from cli import grid_sweep as tune
    fake_gpu(monkeypatch, "a100")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [tune.slot_gpu(slot)["CUDA_VISIBLE_DEVICES"] for slot in range(3)] == ["0", "1", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # the user's own choice of GPUs
    assert [tune.slot_gpu(slot)["CUDA_VISIBLE_DEVICES"] for slot in range(3)] == ["4", "6", "4"]
    fake_gpu(monkeypatch, None)
    assert tune.slot_gpu(0) == {}


def test_mps_trains_in_fp32_and_decodes_in_fp16():
    mps = torch.device("mps")
    assert devices.compute_dtype("auto", mps, training=True) == torch.float32
    assert devices.compute_dtype("auto", mps) == torch.float16


@pytest.mark.parametrize("gpu, train, decode", [("t4", "float16 with loss scaling", "float16"),
                                                ("a100", "bfloat16", "bfloat16"), (None, None, None)])
def test_info_tells_what_would_be_chosen(tmp_path, gpu, train, decode):
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "sitecustomize.py").write_text(SHIM if gpu else "")
    env = os.environ | {"PYTHONPATH": f"{tmp_path / 'shim'}{os.pathsep}{ROOT}", "FAKE_GPU": ",".join(
        map(str, GPUS[gpu])) if gpu else ""}
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "info"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"torch {torch.__version__}" in text and "transformers" in text and "tiktoken" in text
    cpu = str(CPU_CHOICE).removeprefix("torch.")
    if gpu is None:
        assert "CUDA: none" in text and "device cpu" in text
        assert f"gen: {cpu}\n" in text  # the hardware's rule, as for predict: nothing is timed
        assert f"predict: {cpu}\n" in text and f"LoRA, rnn, distil: {cpu}, micro-batch 512 tokens" in text
    else:
        name, major, minor = GPUS[gpu]
        assert f"cuda:0 {name}, capability {major}.{minor}, 16.0 GiB (14.0 free)" in text and "device cuda:0" in text
        assert f"gen: {decode}\npredict: {decode}\n" in text.replace("  ", "")
        assert f"LoRA, rnn, distil: {train}, micro-batch " in text
        kept, recomputed = map(int, re.search(r"micro-batch (\d+) tokens \(LoRA on gpt2\), (\d+) with "
                                              r"--grad_checkpoint", text).groups())
        assert recomputed >= 4 * kept  # the blocks keep their inputs alone
    assert f"CoLA (--data_dir default): {os.environ['COLA_DATA_DIR']} (present)" in text


# ----------------------------------------------------------------------------- the training loop

@pytest.fixture(scope="module")
def splits(cola_dir, tokenizer):
    return load_splits(data.DataSpec(data_dir=cola_dir), tokenizer, max_examples=64, seed=0)


def one_epoch(model, split, dtype=torch.float32, loss_fn=cross_entropy, fused=False, **kwargs):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused)
    return train_epoch(model, split, loss_fn, optimizer, batch_size=16, generator=torch.Generator().manual_seed(0),
                       device=torch.device("cpu"), dtype=dtype, **kwargs)


class InfGradient(torch.autograd.Function):
    """The identity, whose gradient is infinite: what an fp16 overflow in backward gives."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


class ChangedAt(train_utils.Classification):
    """A classifier's objective whose loss goes through `change` at its `call`-th call."""

    def __init__(self, call, change):
        self.calls, self.call, self.change = 0, call, change

    def __call__(self, logits, labels, teacher=None):
        self.calls += 1
        loss = cross_entropy(logits, labels)
        return self.change(loss) if self.calls == self.call else loss


def overflow_at(call):
    """cross_entropy, whose gradient overflows at its `call`-th call."""
    return ChangedAt(call, InfGradient.apply)


def test_fp16_scaler_skips_an_overflowing_step_and_counts_it(tiny_gpt_dir, splits):
    model = tiny_lora_classifier(tiny_gpt_dir)
    scaler = devices.loss_scaler(torch.device("cpu"), torch.float16)
    assert scaler.is_enabled() and not devices.loss_scaler(torch.device("cpu"), torch.bfloat16).is_enabled()
    sums = one_epoch(model, splits["train"], torch.float16, overflow_at(2), scaler=scaler)
    assert sums["skipped"] == 1 and math.isfinite(sums["loss"])
    assert scaler.get_scale() == 2.0 ** 15  # halved once from 2**16
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_training_reports_skipped_steps(tiny_gpt_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(commands, "cross_entropy", overflow_at(2))
    args = ["LoRA", "--gpt_variant", tiny_gpt_dir, "--max_examples", "32", "--batch_size", "16", "--epochs", "1",
            "--dtype", "float16", "--model_path", "adapter"]
    assert run.main(args) == 0
    assert "[1 steps skipped: fp16 gradients overflowed]" in capsys.readouterr().out
    [record] = [json.loads(line) for line in (tmp_path / "tuning" / "LoRA.jsonl").read_text().splitlines()]
    assert record["dtype"] == "float16" and record["history"][0]["skipped_steps"] == 1
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "adapter" / "adapter_model.safetensors").values())


def out_of_memory_above(monkeypatch, max_tokens):
    """GPTClassifier.forward raising CUDA's out-of-memory error for a piece of more than `max_tokens` tokens."""
    forward = GPTClassifier.forward

    def limited(self, idx, lengths):
        if idx.numel() > max_tokens:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, idx, lengths)

    monkeypatch.setattr(GPTClassifier, "forward", limited)


def test_out_of_memory_halves_the_pieces_and_gives_the_same_weights(tiny_gpt_dir, splits, monkeypatch, capsys):
    split = Split(splits["train"].tokens, splits["train"].labels)
    small = tiny_lora_classifier(tiny_gpt_dir)
    one_epoch(small, split, micro_batch_tokens=128)
    out_of_memory_above(monkeypatch, 128)
    retried = tiny_lora_classifier(tiny_gpt_dir)
    budget = train_utils.PieceBudget(256)
    one_epoch(retried, split, micro_batch_tokens=budget)
    assert budget.tokens == 128
    assert capsys.readouterr().err.count("CUDA out of memory with pieces of 256 tokens") == 1
    a, b = small.state_dict(), retried.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_out_of_memory_with_one_sentence_gives_up_naming_the_flag(tiny_gpt_dir, splits, monkeypatch):
    out_of_memory_above(monkeypatch, 1)
    with pytest.raises(utils.UserError, match="one sentence .* per piece, the least --micro_batch_tokens can give"):
        one_epoch(tiny_lora_classifier(tiny_gpt_dir), splits["train"], micro_batch_tokens=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_cuda_path_reads_nothing_back_per_micro_batch(tiny_gpt_dir, splits, monkeypatch, dtype):
    """The CUDA branch forced on CPU tensors, with fused Adam as fit uses on CUDA: every read of a tensor's value
    (item, int, float, bool) is counted; only the end-of-epoch read may make any."""
    monkeypatch.setattr(train_utils, "defers_reads", lambda device: True)
    pieces = []
    forward = GPTClassifier.forward
    monkeypatch.setattr(GPTClassifier, "forward", lambda self, idx, lengths: pieces.append(1) or forward(
        self, idx, lengths))
    reads = []
    for name in ("item", "__int__", "__float__", "__bool__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name: reads.append(_name) or
                            _real(self, *a))
    scaler = devices.loss_scaler(torch.device("cpu"), dtype)
    sums = one_epoch(tiny_lora_classifier(tiny_gpt_dir), splits["train"], dtype, fused=True, micro_batch_tokens=32,
                     scaler=scaler)
    monkeypatch.undo()
    assert len(pieces) >= 20 and sums["tokens"] > 0
    # the reads at the epoch's end alone: the NaN flag, the step's loss, the sums (loss, correct, scored, skipped)
    assert len(reads) <= 6, reads


def test_the_cuda_path_names_the_interval_of_a_nan(tiny_gpt_dir, splits, monkeypatch):
    monkeypatch.setattr(train_utils, "defers_reads", lambda device: True)

    nan_at_step_2 = ChangedAt(2, lambda loss: loss * math.nan)
    with pytest.raises(train_utils.Diverged, match=r"train: loss became nan or inf in steps 1-4 \(on CUDA the loss "
                                                   r"is read every 50 steps\)"):
        one_epoch(tiny_lora_classifier(tiny_gpt_dir), splits["train"], loss_fn=nan_at_step_2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: `pytest -m gpu` runs the GPU tests here")
def test_pytest_m_gpu_skips_the_gpu_tests_here():
    out = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "test_gpu.py")], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout
    assert "no CUDA device" in out.stdout and " passed" not in out.stdout and "skipped" in out.stdout
