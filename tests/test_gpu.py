"""On a CUDA device (`pytest -m gpu`; skipped elsewhere, reason "no CUDA device"): logits equal Hugging Face's in
fp32, bf16 and fp16; LoRA trains to a finite loss in each training dtype; greedy decoding on the GPU equals the
CPU's; two NCCL ranks equal one process when there are two GPUs."""
import math

import pytest
import torch

from conftest import assert_same_run, run_once_and_on_two_ranks, tiny_lora_classifier
from decoding.packed_weights import prepare_for_generation
from decoding.sampling import Sampler
from model import GPT, cast_frozen_linears
from textdata.batches import load_splits
from textdata.readers import DataSpec
from train_utils import TrainConfig, cross_entropy, fit

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
# max |ours - HF| over the logits, relative to max |HF logit|: fp32 to rounding, fp16 with its 10-bit mantissa,
# bf16 with its 7-bit one (the two implementations round at different places)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_logits_equal_hugging_face_on_the_gpu(tiny_gpt_dir, dtype):
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt_dir).to(CUDA, dtype).eval()
    ours = GPT.from_pretrained(tiny_gpt_dir).to(CUDA, dtype).eval()
    idx = torch.randint(0, 50257, (4, 64), generator=torch.Generator().manual_seed(0)).to(CUDA)
    with torch.no_grad():
        theirs, mine = hf(idx).logits.float(), ours(idx).float()
    assert (mine - theirs).abs().max() <= TOLERANCE[dtype] * theirs.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lora_steps_have_a_finite_loss_in_each_training_dtype(tiny_gpt_dir, cola_dir, tokenizer, dtype):
    model = tiny_lora_classifier(tiny_gpt_dir)
    cast_frozen_linears(model, dtype).to(CUDA)
    splits = load_splits(DataSpec(data_dir=cola_dir), tokenizer, max_examples=256, seed=0)
    config = TrainConfig(epochs=1, batch_size=32, lr=1e-3, device=CUDA, dtype=dtype)
    history = fit(model, cross_entropy, splits, config)["history"]
    assert math.isfinite(history[0]["train_loss"]) and history[0]["skipped_steps"] <= 2
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


def test_greedy_decoding_on_the_gpu_equals_the_cpu(tiny_gpt_dir):
    prompt = [464, 3290, 318, 257]
    runs = {}
    for device in (torch.device("cpu"), CUDA):
        model = prepare_for_generation(GPT.from_pretrained(tiny_gpt_dir), device, torch.float32)
        runs[device.type] = list(model.generate(prompt, 40, Sampler(0.0)))
    assert runs["cuda"] == runs["cpu"]


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_nccl_ranks_equal_one_process(tiny_gpt_dir, tmp_path):
    args = ["LoRA", "--gpt_variant", tiny_gpt_dir, "--max_examples", 256, "--batch_size", 64, "--epochs", 2,
            "--dtype", "float32", "--model_path", "adapter"]
    run_once_and_on_two_ranks(args, tmp_path)
    assert_same_run(tmp_path / "one", tmp_path / "two", "LoRA", "adapter/adapter_model.safetensors")
