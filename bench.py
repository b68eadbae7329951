"""The project's benchmark: ours against the Hugging Face peer a user would otherwise pick, in the same process.

Random-weight models of the real architectures (nothing downloaded), real CoLA sentences. Each case runs ours
and the peer alternately (A B A B ...) after a warm-up and reports medians and their ratio.

    python bench.py              # the full table (about half an hour on 2 cores where bf16 is native, over
                                 # an hour where it is emulated)
    python bench.py --cases gen samples predict --reps 3   # only these rows, 3 repetitions each
    python bench.py --quick      # a reduced run that only checks the benchmark still works
    python bench.py --json out.json
    python bench.py --device cuda  # a GPU: LoRA training's MFU against this GPU's measured matmul peak, and
                                   # decoding tokens/s, eager and compiled, ours and HF's
"""
import argparse
import json
import os
from pathlib import Path
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.engine_timing import comparisons, step_bytes
from benchmarks.method_epochs import grad_checkpoint_case, method_cases, tiny_variant
from benchmarks.training_peers import cola_sample, hf_peft_classifier, peer_epoch, shuffled_batches, synchronize
from decoding.packed_weights import prepare_for_generation
from decoding.sampling import Sampler
from decoding.static_step import StaticDecoder
from model import (EOT, GPT, DistilRNN, GPTClassifier, RNNConfig, cast_frozen_linears, inject_lora, load_config,
                   mark_only_lora_as_trainable)
from runtime.devices import compute_dtype, default_micro_batch_tokens, has_fast_bf16, loss_scaler
from textdata.augmentation import augment
from textdata.batches import Split, bucketed_batches, collate, sorted_batches
from textdata.lm_examples import lm_split, text_blocks
from textdata.readers import default_cola_dir, encode, get_tokenizer
from train_utils import activation_bytes_per_token, cross_entropy, predict_logits, train_epoch
from training.kd_loss import UNLABELLED, KDLoss
from training.lm_objective import NextToken
from utils import write_text

CPU = torch.device("cpu")
CASES = ("lora", "lora_bf16", "lm", "gen", "samples", "compile", "ct2", "predict", "distil", "transfer", "rss",
         "methods", "checkpoint")


def alternate(runs, reps, warmup=1):
    """Run each callable of `runs` in turn, `warmup` untimed rounds then `reps` timed ones; seconds per name."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def skip_emulated(quick, row):
    """True, with a note, in --quick where bf16 is emulated: bf16 and int8 rows take tens of minutes there."""
    if quick and not has_fast_bf16(CPU):
        print(f"skipped in --quick: {row} (bf16 is emulated on this CPU)", flush=True)
        return True
    return False


def matmul_gflops(dtype, n=2048, reps=10, device=CPU):
    """This machine's measured matmul throughput for `dtype` (the training roofline)."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


def memory_gbps(mbytes=512, reps=5, device=CPU):
    """Measured memory bandwidth: bytes read + written by a large copy (the decoding roofline)."""
    src = torch.empty(mbytes * 2 ** 20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    synchronize(device)
    return 2 * src.numel() * 4 * reps / (time.perf_counter() - start) / 1e9


# ----------------------------------------------------------------------------- LoRA training

def our_lora(variant, dtype):
    """The model and optimizer `run.py LoRA` builds (r=4 on all four targets), frozen weights stored in `dtype`."""
    model = cast_frozen_linears(mark_only_lora_as_trainable(inject_lora(GPTClassifier.from_random(variant), 4, 4)),
                                dtype)
    return model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def ours_fixed_batches_epoch(model, optimizer, split, batches, dtype):
    """Our model and loss on the peer's exact batches (to compare implementations, not batching)."""
    model.train()
    for index in batches:
        ids, lengths, labels, _ = collate(split, index, CPU)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(ids, lengths)
        loss = cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def lora_cases(split, reps, variant="gpt2", batch_size=128):
    auto = compute_dtype("auto", CPU)
    ours, ours_opt = our_lora(variant, auto)
    fp32, fp32_opt = our_lora(variant, torch.float32)
    peer = hf_peft_classifier(ours.config)
    peer_opt = torch.optim.Adam([p for p in peer.parameters() if p.requires_grad], lr=1e-3)
    batches = shuffled_batches(len(split), batch_size, seed=0)
    generator = torch.Generator().manual_seed(0)
    tokens = sum(len(t) for t in split.tokens)
    frozen = sum(p.numel() for p in fp32.parameters())
    flops = 4 * frozen * tokens  # forward 2N + backward to activations 2N per token; the base gets no weight grads

    times = alternate({
        "ours": lambda: train_epoch(ours, split, cross_entropy, ours_opt, batch_size=batch_size,
                                    generator=generator, device=CPU, dtype=auto,
                                    micro_batch_tokens=default_micro_batch_tokens(CPU)),
        "peer": lambda: peer_epoch(peer, peer_opt, split, batches),
        "ours_fp32": lambda: ours_fixed_batches_epoch(fp32, fp32_opt, split, batches, torch.float32)}, reps)
    yield case(f"LoRA train epoch, {len(split)} CoLA sentences, {variant} r=4, batch {batch_size}",
               f"run.py LoRA defaults ({dtype_name(auto)}, bucketing)", "HF + PEFT fp32, shuffled, padded", times,
               target=4.0, limit=("matmul", flops, matmul_gflops(auto)))
    yield case("same, both fp32 and the same batches", "ours fp32", "HF + PEFT fp32",
               times | {"ours": times["ours_fp32"]}, target=1.0, limit=("matmul", flops, matmul_gflops(torch.float32)))


def lora_bf16_case(split, reps, variant="gpt2", batch_size=128):
    """The strongest peer (the Trainer's bf16=True, group_by_length=True): both sides bf16 autocast on the same
    length-bucketed batches."""
    ours, ours_opt = our_lora(variant, torch.bfloat16)
    peer = hf_peft_classifier(ours.config)
    peer_opt = torch.optim.Adam([p for p in peer.parameters() if p.requires_grad], lr=1e-3)
    batches = bucketed_batches([len(t) for t in split.tokens], batch_size, torch.Generator().manual_seed(0))
    tokens = sum(len(t) for t in split.tokens)
    flops = 4 * sum(p.numel() for p in ours.parameters()) * tokens
    times = alternate({"ours": lambda: ours_fixed_batches_epoch(ours, ours_opt, split, batches, torch.bfloat16),
                       "peer": lambda: peer_epoch(peer, peer_opt, split, batches, torch.bfloat16)}, reps)
    return case(f"LoRA train epoch, {len(split)} sentences, same bucketed batches", "ours bf16 autocast",
                "HF + PEFT bf16 autocast", times, target=2.5,
                limit=("matmul", flops, matmul_gflops(torch.bfloat16)))


def lm_lora_case(sentences, reps, blocks, variant="gpt2", block_size=256, batch_size=8):
    """An epoch of `run.py LoRA --task lm` on text blocks against transformers + PEFT's GPT2LMHeadModel on the same
    blocks (its labels the inputs, shifted inside), both in bf16 autocast where bf16 is native, else fp32."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    dtype = compute_dtype("auto", CPU)
    split = lm_split(text_blocks(get_tokenizer(), sentences, block_size)[:blocks])
    ours = cast_frozen_linears(mark_only_lora_as_trainable(inject_lora(GPT.from_random(variant), 4, 4)), dtype)
    c = ours.config
    peer = get_peft_model(GPT2LMHeadModel(GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd)),
                          LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                     task_type="CAUSAL_LM", fan_in_fan_out=True,
                                     modules_to_save=["ln_1", "ln_2", "ln_f"]))
    opts = {name: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=2e-4)
            for name, m in (("ours", ours), ("peer", peer))}
    batches = shuffled_batches(len(split), batch_size, seed=0)

    def peer_epoch():
        peer.train()
        for index in batches:
            ids = torch.tensor([split.tokens[i] for i in index])
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = peer(input_ids=ids, labels=ids).loss
            opts["peer"].zero_grad(set_to_none=True)
            loss.backward()
            opts["peer"].step()

    times = alternate({"ours": lambda: train_epoch(ours, split, NextToken(), opts["ours"], batch_size=batch_size,
                                                   generator=torch.Generator().manual_seed(0), device=CPU,
                                                   dtype=dtype, micro_batch_tokens=default_micro_batch_tokens(CPU)),
                       "peer": peer_epoch}, reps)
    flops = 4 * sum(p.numel() for p in ours.parameters()) * split.units(range(len(split)))  # the head is wte
    return case(f"LoRA --task lm epoch, {len(split)} blocks of {block_size} tokens, {variant} r=4, batch "
                f"{batch_size}", f"ours {dtype_name(dtype)} autocast", f"HF + PEFT {dtype_name(dtype)} autocast",
                times, target=1.5, limit=("matmul", flops, matmul_gflops(dtype)))


def predict_case(split, reps, variant="gpt2", batch_size=128):
    """`run.py predict` (its default dtype) against HF's classifier in bf16 autocast on length-sorted batches."""
    from transformers import GPT2Config, GPT2ForSequenceClassification
    auto = compute_dtype("auto", CPU)
    ours = cast_frozen_linears(GPTClassifier.from_random(variant).eval().requires_grad_(False), auto)
    c = ours.config
    peer = GPT2ForSequenceClassification(GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                                                    pad_token_id=EOT, num_labels=2)).eval()
    batches = sorted_batches([len(t) for t in split.tokens], batch_size)

    def run_peer():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for index in batches:
                ids, lengths, _, _ = collate(split, index, CPU)
                peer(input_ids=ids, attention_mask=(torch.arange(ids.size(1)) < lengths[:, None]).long())

    times = alternate({"ours": lambda: predict_logits(ours, split.tokens, batch_size=batch_size, device=CPU,
                                                      dtype=auto),
                       "peer": run_peer}, reps)
    flops = 2 * sum(p.numel() for p in ours.transformer.h.parameters()) * sum(len(t) for t in split.tokens)
    return case(f"predict, {len(split)} sentences, batch {batch_size}", f"run.py predict ({dtype_name(auto)})",
                "HF classifier bf16 autocast, length-sorted", times, target=2.0,
                limit=("matmul", flops, matmul_gflops(auto)))


# ----------------------------------------------------------------------------- generation

def hf_generator(config):
    """GPT2LMHeadModel of the same shape, never stopping at <|endoftext|> (so both sides make every token)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    peer = GPT2LMHeadModel(GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd)).eval()
    peer.generation_config.eos_token_id = None
    return peer


def generation_cases(reps, new_tokens, quick=False, variant="gpt2"):
    torch.manual_seed(0)
    prompt = torch.randint(0, 50257, (128,)).tolist()
    ours = GPT.from_random(variant).eval()
    peer = hf_generator(ours.config)

    def run_peer():
        with torch.no_grad():
            peer.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=True, top_k=50, pad_token_id=EOT)

    def run_ours(model):
        return lambda: list(model.generate(prompt, new_tokens, Sampler(1.0, top_k=50, seed=0)))

    auto = compute_dtype("auto", CPU)
    ours_auto = prepare_for_generation(GPT.from_random(variant), CPU, auto)
    prepare_for_generation(ours, CPU, torch.float32)
    times = alternate({"ours": run_ours(ours_auto), "peer": run_peer, "ours_fp32": run_ours(ours)}, reps)
    bandwidth = memory_gbps()

    yield case(f"generation, {variant}, 128-token prompt, {new_tokens} new tokens, top-k 50",
               f"run.py gen defaults ({dtype_name(auto)})", "GPT2LMHeadModel.generate fp32", times, target=1.5,
               limit=("bandwidth", step_bytes(ours_auto) * new_tokens, bandwidth))
    yield case("same, both fp32", "ours fp32", "GPT2LMHeadModel.generate fp32", times | {"ours": times["ours_fp32"]},
               target=1.0, limit=("bandwidth", step_bytes(ours) * new_tokens, bandwidth))

    if skip_emulated(quick, "generation, ours int8 weights"):
        return
    int8 = prepare_for_generation(GPT.from_random(variant), CPU, auto, quantize="int8")  # as run.py builds it
    times = alternate({"ours": run_ours(int8), "peer": run_peer}, reps)
    yield case("same, ours int8 weights", "run.py gen --quantize int8", "GPT2LMHeadModel.generate fp32", times,
               target=2.5, limit=("bandwidth", step_bytes(int8) * new_tokens, bandwidth))


def batched_generation_case(reps, new_tokens, n=8, variant="gpt2"):
    """`--num_samples 8` against generate(num_return_sequences=8), from run.py's default 8-token prompt."""
    prompt = encode(get_tokenizer(), ["Hello, I'm a language model,"])[0]
    auto = compute_dtype("auto", CPU)
    ours = prepare_for_generation(GPT.from_random(variant), CPU, auto, rows=n)
    peer = hf_generator(ours.config)

    def run_peer():
        with torch.no_grad():
            peer.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=True, top_k=50, num_return_sequences=n, pad_token_id=EOT)

    def run_ours():
        list(ours.generate_batch(prompt, new_tokens, [Sampler(1.0, top_k=50, seed=i) for i in range(n)]))

    times = alternate({"ours": run_ours, "peer": run_peer}, reps)
    return case(f"generation, {variant}, {n} samples in one batch, {new_tokens} new tokens, top-k 50",
                f"run.py gen --num_samples {n} ({dtype_name(auto)})", f"generate(num_return_sequences={n}) fp32",
                times, target=2.0, limit=("bandwidth", step_bytes(ours) * new_tokens, memory_gbps()))


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compiled_generation_cases(reps, new_tokens, samples_tokens, quick=False, n=8, variant="gpt2"):
    """The `gen` and `samples` rows with --compile (the static step through inductor), each with what compiling
    costs: a first run in an empty inductor cache, and a second after dynamo forgets the graph (inductor's cache
    on disk serves it), beyond the median run. `quick`: the one-sample row alone (each row compiles for minutes on
    2 cores)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")  # the first compile is cold
    torch.manual_seed(0)
    prompt = torch.randint(0, 50257, (128,)).tolist()
    short = encode(get_tokenizer(), ["Hello, I'm a language model,"])[0]
    auto, bandwidth = compute_dtype("auto", CPU), memory_gbps()
    peer = hf_generator(load_config(variant))
    setups = [(f"{len(prompt)}-token prompt, {new_tokens} new tokens", prompt, new_tokens, 1, None, "", 2.5),
              (f"{n} samples in one batch, {samples_tokens} new tokens", short, samples_tokens, n, None,
               f" --num_samples {n}", 3.0),
              (f"{len(prompt)}-token prompt, {new_tokens} new tokens, int8", prompt, new_tokens, 1, "int8",
               " --quantize int8", 3.5)]
    for title, ids, tokens, rows, quantize, flags, target in setups[:1] if quick else setups:
        model = prepare_for_generation(GPT.from_random(variant), CPU, auto, rows, quantize, compile=True)
        decoder = StaticDecoder(model)

        def ours():
            list(decoder.generate_batch(ids, tokens, [Sampler(1.0, top_k=50, seed=i) for i in range(rows)]))

        def theirs():
            with torch.no_grad():
                peer.generate(torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True,
                              top_k=50, num_return_sequences=rows, pad_token_id=EOT)

        first = seconds(ours)
        torch._dynamo.reset()
        second = seconds(ours)
        theirs()
        times = alternate({"ours": ours, "peer": theirs}, reps, warmup=0)
        row = case(f"generation, {variant}, {title}, top-k 50, --compile", f"run.py gen --compile{flags} "
                   f"({dtype_name(auto)})", f"generate(num_return_sequences={rows}) fp32", times, target=target,
                   limit=("bandwidth", step_bytes(model) * tokens, bandwidth))
        steady = row["ours_s"]
        row["compile"] = (f"compile{flags}: first run +{first - steady:.1f}s (empty inductor cache), second run "
                          f"+{second - steady:.1f}s (inductor's cache)")
        yield row


def ctranslate2_cases(reps, new_tokens, samples_tokens, quick):
    """Ours against CTranslate2 on the same weights (benchmarks/engine_timing.py), each engine's rate against the copy
    bandwidth by the bytes its step reads. `quick`: a 2-layer model, only to check that the rows run."""
    bandwidth = memory_gbps()
    for what, ours, theirs, tokens, target, times, read in comparisons(reps, 2 if quick else 12, new_tokens,
                                                                       samples_tokens):
        row = case(what, ours, theirs, times, target=target, limit=("bandwidth", read["ours"] * tokens, bandwidth))
        rate = read["peer"] * tokens / row["peer_s"] / 1e9
        row["peer"] += f" ({rate:.0f} GB/s, {rate / bandwidth:.0%})"
        yield row


# ----------------------------------------------------------------------------- distillation

def distil_case(split, reps):
    """A distil epoch after the first (teacher logits cached) against an rnn epoch: ours against ours."""
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(len(split), 2)
    kd_split = Split(split.tokens, split.labels, teacher)
    auto = compute_dtype("auto", CPU)
    tokens = default_micro_batch_tokens(CPU)
    models = {name: DistilRNN(RNNConfig()) for name in ("distil", "rnn")}
    opts = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    times = alternate({
        "ours": lambda: train_epoch(models["distil"], kd_split, KDLoss(2.0, 0.5), opts["distil"], batch_size=128,
                                    generator=generator, device=CPU, dtype=auto, clip=1.0, micro_batch_tokens=tokens),
        "peer": lambda: train_epoch(models["rnn"], split, cross_entropy, opts["rnn"], batch_size=128,
                                    generator=generator, device=CPU, dtype=auto, clip=1.0, micro_batch_tokens=tokens)},
        reps)
    return case(f"distil epoch (after the first) vs rnn epoch, {len(split)} sentences", "distil epoch",
                "rnn epoch", times, target=1.2, speedup=False)


def transfer_case(split, reps, times_larger=10):
    """A distil epoch over the training set plus a transfer set `times_larger` times its size (Tang et al.'s rules,
    label UNLABELLED) against a distil epoch over the training set alone: the cost should grow with the sentences
    and no faster (at most 10.5x for 10x)."""
    tokenizer = get_tokenizer()
    texts = [tokenizer.decode(t) for t in split.tokens]
    made = augment(texts, times_larger + 4, p_mask=0.1, p_replace=0.1, p_ngram=0.25, seed=0)[0]
    extra = encode(tokenizer, made[:times_larger * len(split)])
    g = torch.Generator().manual_seed(0)
    plain = Split(split.tokens, split.labels, torch.randn(len(split), 2, generator=g))
    larger = Split(split.tokens + extra, torch.cat([split.labels, torch.full((len(extra),), UNLABELLED)]),
                   torch.randn(len(split) + len(extra), 2, generator=g))
    auto, tokens = compute_dtype("auto", CPU), default_micro_batch_tokens(CPU)
    models = {name: DistilRNN(RNNConfig()) for name in ("ours", "peer")}
    opts = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}

    def epoch(name, data):
        return lambda: train_epoch(models[name], data, KDLoss(2.0, 0.5), opts[name], batch_size=128, generator=g,
                                   device=CPU, dtype=auto, clip=1.0, micro_batch_tokens=tokens)

    times = alternate({"ours": epoch("ours", larger), "peer": epoch("peer", plain)}, reps)
    return case(f"distil epoch, {len(split)} sentences + a {len(extra)}-sentence transfer set vs without",
                "with the transfer set", "without", times, target=times_larger + 0.5, speedup=False)


def peak_rss_case(max_examples):
    """Peak resident memory of a whole gpt2-medium LoRA run, as a user would start it.

    A small wrapper process starts the run and reads its children's peak: a child forked straight from this
    process would count this process's own memory as well.
    """
    cmd = [sys.executable, "run.py", "LoRA", "--gpt_variant", "gpt2-medium", "--random_init", "--epochs", "1",
           "--max_examples", str(max_examples), "--model_path", "models/bench-rss"]
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).parent)
    peak_gb = int(out.stdout) / 2 ** 20  # ru_maxrss is in KiB on Linux
    return {"case": f"peak RSS, {' '.join(cmd[1:])}", "ours": f"{peak_gb:.2f} GB", "peer": "-", "ratio": "-",
            "target": "<= 3 GB", "met": peak_gb <= 3.0}


# ----------------------------------------------------------------------------- a GPU

def cuda_mfu(split, variant, reps, batch_size=128):
    """LoRA training epochs on the GPU as `run.py LoRA` runs them (dtype by capability, fp16 loss scaling, fused
    Adam, default micro-batch): FLOPs per second against this GPU's measured matmul peak in the same dtype."""
    device = torch.device("cuda")
    dtype = compute_dtype("auto", device, training=True)
    model, _ = our_lora(variant, dtype)
    model.to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    scaler, generator = loss_scaler(device, dtype), torch.Generator().manual_seed(0)
    tokens = default_micro_batch_tokens(device, activation_bytes_per_token(model))

    def epoch():
        train_epoch(model, split, cross_entropy, optimizer, batch_size=batch_size, generator=generator, device=device,
                    dtype=dtype, micro_batch_tokens=tokens, scaler=scaler)
        synchronize(device)

    seconds = statistics.median(alternate({"ours": epoch}, reps)["ours"])
    flops = 4 * sum(p.numel() for p in model.parameters()) * sum(len(t) for t in split.tokens)
    peak = matmul_gflops(dtype, n=8192, reps=20, device=device)
    achieved = flops / seconds / 1e9
    return {"case": f"LoRA train epoch on {torch.cuda.get_device_name(device)}, {len(split)} CoLA sentences, {variant} "
                    f"r=4, batch {batch_size}, {dtype_name(dtype)}, {tokens}-token pieces",
            "seconds": seconds, "achieved_gflops": achieved, "peak_gflops": peak, "mfu": achieved / peak}


def cuda_generation_cases(reps, new_tokens=384, variants=("gpt2", "gpt2-medium")):
    """Decoding on the GPU in its `--dtype auto`: ours eager and compiled (CUDA graphs) against HF's generate eager
    and with its static cache (which generate compiles on a GPU), in tokens/s and against the GPU's bandwidth."""
    device = torch.device("cuda")
    dtype = compute_dtype("auto", device)
    torch.manual_seed(0)
    prompt = torch.randint(0, 50257, (128,)).tolist()
    bandwidth = memory_gbps(2048, 20, device)
    for variant in variants:
        ours = prepare_for_generation(GPT.from_random(variant), device, dtype)
        peer = hf_generator(ours.config).to(device=device, dtype=dtype)
        compiled = StaticDecoder(ours)

        def timed(generate):
            return lambda: (list(generate(prompt, new_tokens, [Sampler(1.0, top_k=50, seed=0)])),
                            synchronize(device))

        def hf(**kwargs):
            with torch.no_grad():
                peer.generate(torch.tensor([prompt], device=device), max_new_tokens=new_tokens, do_sample=True,
                              min_new_tokens=new_tokens, top_k=50, pad_token_id=EOT, **kwargs)
            synchronize(device)

        times = alternate({"ours": timed(ours.generate_batch), "peer": hf, "compiled": timed(compiled.generate_batch),
                           "peer_static": lambda: hf(cache_implementation="static")}, reps, warmup=2)
        for label, a, b, peer_name in (("eager", "ours", "peer", "generate"),
                                       ("compiled", "compiled", "peer_static",
                                        'generate(cache_implementation="static"), compiled')):
            row = case(f"generation on {torch.cuda.get_device_name(device)}, {variant}, 128-token prompt, "
                       f"{new_tokens} new tokens, {dtype_name(dtype)}, {label}",
                       f"run.py gen{' --compile' if a == 'compiled' else ''}", f"HF {peer_name}",
                       {"ours": times[a], "peer": times[b]}, target=1.0,
                       limit=("bandwidth", step_bytes(ours) * new_tokens, bandwidth))
            row["tokens_per_s"] = f"{new_tokens / row['ours_s']:.0f} against {new_tokens / row['peer_s']:.0f}"
            yield row


# ----------------------------------------------------------------------------- table

def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def case(title, ours, peer, times, target, limit=None, speedup=True):
    """A table row from alternating timings. speedup: the target is peer/ours time (ours faster) at least
    `target`; otherwise it is ours/peer time (a cost) at most `target`."""
    ours_s, peer_s = statistics.median(times["ours"]), statistics.median(times["peer"])
    ratio = peer_s / ours_s if speedup else ours_s / peer_s
    row = {"case": title, "ours": f"{ours} {ours_s:.2f}s", "peer": f"{peer} {peer_s:.2f}s", "ours_s": ours_s,
           "peer_s": peer_s, "ratio": f"{ratio:.2f}x", "target": f">= {target}x" if speedup else f"<= {target}x time",
           "met": ratio >= target if speedup else ratio <= target, "reps": len(times["ours"])}
    if limit:
        kind, work, roof = limit
        achieved = work / ours_s / 1e9
        unit = "GFLOP/s" if kind == "matmul" else "GB/s"
        row["of_limit"] = f"{achieved:.0f}/{roof:.0f} {unit} ({achieved / roof:.0%})"
    return row


def print_table(rows):
    from training.tables import format_table
    headers = ["case", "ours (median)", "peer (median)", "ratio", "target", "met", "of machine limit"]
    print(format_table(headers, [[r["case"], r["ours"], r["peer"], r["ratio"], r["target"],
                                  "yes" if r["met"] else "NO", r.get("of_limit", "-")] for r in rows]))


def cuda_main(split, reps, variant, quick, json_path):
    row = cuda_mfu(split, variant, reps)
    print(f"{row['case']}: {row['seconds']:.2f}s, {row['achieved_gflops']:,.0f} of a measured "
          f"{row['peak_gflops']:,.0f} GFLOP/s matmul peak: MFU {row['mfu']:.1%}")
    rows = list(cuda_generation_cases(reps, 16 if quick else 384))
    print_table(rows)
    print("\n".join(f"{r['case']}: {r['tokens_per_s']} tokens/s" for r in rows))
    if json_path:
        write_text(json_path, json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": [row, *rows]}, indent=2))


def cpu_cases(split, sentences, reps, quick):
    """{case name: a callable giving its rows}, sized for --quick or the full table."""
    new_tokens = 16 if quick else 384
    return {"lora": lambda: lora_cases(split, reps),
            "lora_bf16": lambda: [] if skip_emulated(quick, "lora_bf16") else [lora_bf16_case(split, reps)],
            "gen": lambda: generation_cases(reps, new_tokens, quick),
            "samples": lambda: [batched_generation_case(reps, 16 if quick else 128)],
            "compile": lambda: compiled_generation_cases(reps, new_tokens, 16 if quick else 128, quick),
            "ct2": lambda: ctranslate2_cases(reps, new_tokens, 16 if quick else 128, quick),
            "predict": lambda: [predict_case(split, reps)], "distil": lambda: [distil_case(split, reps)],
            "lm": lambda: [lm_lora_case(sentences, reps, 4 if quick else 64)],
            "transfer": lambda: [transfer_case(split, reps)],
            "rss": lambda: [peak_rss_case(64 if quick else 512)],
            "methods": lambda: method_cases(1 if quick else min(reps, 3), 16 if quick else 512,
                                            variant=tiny_variant() if quick else "gpt2"),
            "checkpoint": lambda: [grad_checkpoint_case(1 if quick else min(reps, 3), 16 if quick else 256,
                                                        variant=tiny_variant() if quick else "gpt2-medium")]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repetitions: checks it runs, not speed")
    parser.add_argument("--reps", type=int, default=5, choices=range(1, 101), metavar="1..100",
                        help="timed repetitions of each side per case (their median is reported)")
    parser.add_argument("--cases", nargs="+", choices=CASES, help="only these cases (default: all, in this order)")
    parser.add_argument("--data_dir", default=default_cola_dir())
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the GPU's training MFU and decoding only")
    parser.add_argument("--variant", default="gpt2", help="the GPT-2 architecture of --device cuda (random weights)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    reps = 2 if args.quick else args.reps
    sentences, split = cola_sample(args.data_dir, 64 if args.quick else 2048)
    if args.device == "cuda":
        return cuda_main(split, reps, args.variant, args.quick, args.json)
    cases = cpu_cases(split, sentences, reps, args.quick)
    rows = []
    for name in args.cases or cases:
        for row in cases[name]():
            rows.append(row)
            print(f"{row['case']}: ours {row['ours']}, peer {row['peer']}, {row['ratio']}", flush=True)
            if "compile" in row:
                print(f"  {row['compile']}", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}{', QUICK (not a speed measurement)' if args.quick else ''}")
    print_table(rows)
    for row in rows:
        if "compile" in row:
            print(row["compile"])
    if args.json:
        write_text(args.json, json.dumps({"date": time.strftime("%Y-%m-%d"), "quick": args.quick, "rows": rows},
                                         indent=2))


if __name__ == "__main__":
    main()
