"""One timed decode in a process of its own: ours (a GPT-2 folder in transformers' format, as `run.py gen` loads
it) or CTranslate2's Generator on the same weights converted. bench.py starts one such process per timing, since
two engines' thread pools in one process spin against each other.

    python -m decoding.engine_timing ours MODEL_DIR --new_tokens 384 [--dtype float32] [--quantize int8]
    python -m decoding.engine_timing ctranslate2 CT2_DIR --new_tokens 384 --samples 8

It decodes once untimed (the warm-up), then once timed from the same prompt, sampling with top-k 50 and never
stopping early, and prints {"seconds": ...} as JSON.
"""
import argparse
import json
from pathlib import Path
import time

import torch


def prompt_ids(length):
    """The benchmark's prompt: `length` random token ids, the same in every process."""
    return torch.randint(0, 50257, (length,), generator=torch.Generator().manual_seed(0)).tolist()


def ours(folder, dtype, quantize, samples):
    """A decode of ours: GPT.from_pretrained and prepare_for_generation, as `run.py gen` runs them."""
    from decoding.packed_weights import prepare_for_generation
    from decoding.sampling import Sampler
    from model import GPT
    from runtime.devices import compute_dtype
    cpu = torch.device("cpu")
    model = prepare_for_generation(GPT.from_pretrained(folder), cpu, compute_dtype(dtype, cpu), samples, quantize)
    return lambda prompt, n: list(model.generate_batch(prompt, n, [Sampler(1.0, top_k=50, seed=i)
                                                                   for i in range(samples)]))


def ctranslate2_generator(folder, compute_type, samples):
    """A decode of CTranslate2's Generator: `samples` hypotheses drawn from one prompt, top-k 50."""
    import ctranslate2
    generator = ctranslate2.Generator(folder, device="cpu", compute_type=compute_type,
                                      intra_threads=torch.get_num_threads())
    vocabulary = json.loads((Path(folder) / "vocabulary.json").read_text())
    return lambda prompt, n: generator.generate_batch(
        [[vocabulary[i] for i in prompt]], max_length=n, min_length=n, sampling_topk=50, num_hypotheses=samples,
        include_prompt_in_result=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", choices=["ours", "ctranslate2"])
    parser.add_argument("folder")
    parser.add_argument("--new_tokens", type=int, default=384)
    parser.add_argument("--prompt_tokens", type=int, default=128)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--dtype", default="auto", help="ours: --dtype; CTranslate2: its compute_type")
    parser.add_argument("--quantize", choices=["int8"], help="ours: --quantize")
    args = parser.parse_args()
    decode = (ours(args.folder, args.dtype, args.quantize, args.samples) if args.engine == "ours"
              else ctranslate2_generator(args.folder, args.dtype, args.samples))
    prompt = prompt_ids(args.prompt_tokens)
    decode(prompt, args.new_tokens)
    start = time.perf_counter()
    decode(prompt, args.new_tokens)
    print(json.dumps({"seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
