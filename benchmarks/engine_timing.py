"""Ours against CTranslate2, the C++ engine a user would convert GPT-2 to for a CPU (bench.py's ct2 rows): the same
random weights, saved in transformers' format and converted by CTranslate2's TransformersConverter, each decode
timed in a process of its own, since two engines' thread pools in one process spin against each other.

    python -m benchmarks.engine_timing ours MODEL_DIR --new_tokens 384 [--dtype float32] [--quantize int8]
    python -m benchmarks.engine_timing ctranslate2 CT2_DIR --new_tokens 384 --samples 8 --dtype int8

A process decodes once untimed (the warm-up), then once timed from the same 128-token prompt, sampling with top-k
50 and never stopping early, and prints {"seconds": ..., "step_bytes": ...} as JSON: step_bytes are the bytes of
weights a step reads (CTranslate2's: its converted model, whose head is its embedding).
"""
import argparse
import json
from pathlib import Path
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm


def step_bytes(model):
    """Bytes of weights a decoding step of ours reads: the parameters, or with int8 weights the int8 blocks and
    head (the embedding then gives one row a step)."""
    int8 = sum(b.numel() * b.element_size() for b in model.buffers())
    return int8 or sum(p.numel() * p.element_size() for p in model.parameters())


def prompt_ids(length):
    """The benchmark's prompt: `length` random token ids, the same in every process."""
    return torch.randint(0, 50257, (length,), generator=torch.Generator().manual_seed(0)).tolist()


def ours(folder, dtype, quantize, samples):
    """A decode of ours (GPT.from_pretrained and prepare_for_generation, as `run.py gen` runs them), its step bytes."""
    from decoding.packed_weights import prepare_for_generation
    from decoding.sampling import Sampler
    from model import GPT
    from runtime.devices import compute_dtype
    cpu = torch.device("cpu")
    model = prepare_for_generation(GPT.from_pretrained(folder), cpu, compute_dtype(dtype, cpu), samples, quantize)
    return lambda prompt, n: list(model.generate_batch(prompt, n, [Sampler(1.0, top_k=50, seed=i)
                                                                   for i in range(samples)])), step_bytes(model)


def ctranslate2_generator(folder, compute_type, samples):
    """A decode of CTranslate2's Generator, `samples` hypotheses drawn from one prompt, and its step bytes."""
    import ctranslate2
    generator = ctranslate2.Generator(folder, device="cpu", compute_type=compute_type,
                                      intra_threads=torch.get_num_threads())
    vocabulary = json.loads((Path(folder) / "vocabulary.json").read_text())
    return lambda prompt, n: generator.generate_batch(
        [[vocabulary[i] for i in prompt]], max_length=n, min_length=n, sampling_topk=50, num_hypotheses=samples,
        include_prompt_in_result=False), (Path(folder) / "model.bin").stat().st_size


def converted(config):
    """A folder holding a random GPT-2 of `config` (transformers' GPT2Config) in transformers' format ("hf", with
    GPT-2's tokenizer files, which the converter reads) and converted to CTranslate2 in float32 and int8."""
    import ctranslate2
    from transformers import GPT2LMHeadModel
    from textdata.tokenizer_files import write_gpt2_tokenizer
    folder = Path(tempfile.mkdtemp(prefix="bench-ct2-"))
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder / "hf")
    write_gpt2_tokenizer(folder / "hf")
    for quantization in ("float32", "int8"):
        ctranslate2.converters.TransformersConverter(str(folder / "hf")).convert(str(folder / quantization),
                                                                                  quantization=quantization)
    return folder


def timed_in_own_process(engine, folder, *flags):
    """What one process of this module prints: {"seconds": ..., "step_bytes": ...}."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.engine_timing", engine, str(folder), *flags], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    return json.loads(out.stdout.splitlines()[-1])


def comparisons(reps, n_layer, new_tokens, samples_tokens, n=8):
    """Yield (what, ours as `run.py gen` runs it, CTranslate2's side, new tokens, target, seconds as {"ours": [...],
    "peer": [...]}, step bytes as {"ours": ..., "peer": ...}) for each row, on a random gpt2 of `n_layer` layers:
    one sample in float32, int8 against ours `--quantize int8`, int8 against ours' default dtype, `n` samples
    against `--num_samples n`; ours and CTranslate2 alternating, `reps` processes each. Nothing, with a note,
    where CTranslate2 is not installed."""
    from transformers import GPT2Config
    try:
        import ctranslate2
    except ImportError:
        print("skipped: the ct2 rows (CTranslate2 is not installed: pip install ctranslate2)", flush=True)
        return
    folder = converted(GPT2Config(n_layer=n_layer))
    rows = [("one sample, float32", ["--dtype", "float32"], "float32", 1, new_tokens, 1.0),
            ("one sample, int8", ["--quantize", "int8"], "int8", 1, new_tokens, 1.25),
            ("one sample, ours default dtype against int8", [], "int8", 1, new_tokens, 1.25),
            (f"{n} samples, ours default dtype against int8", [], "int8", n, samples_tokens, 1.0)]
    runs = {row[0]: {"ours": [], "peer": []} for row in rows}
    progress = tqdm(total=2 * reps * len(rows), desc="ct2 rows, a process each")
    for _ in range(reps):
        for what, flags, compute_type, samples, tokens, _ in rows:
            common = ["--new_tokens", str(tokens), "--samples", str(samples)]
            for side, engine, model, own in (("ours", "ours", "hf", flags),
                                             ("peer", "ctranslate2", compute_type, ["--dtype", compute_type])):
                runs[what][side].append(timed_in_own_process(engine, folder / model, *common, *own))
                progress.set_postfix_str(f"{what}, {side} {runs[what][side][-1]['seconds']:.2f}s", refresh=False)
                progress.update()
    progress.close()
    for what, flags, compute_type, samples, tokens, target in rows:
        ours_as = " ".join(["ours", *flags] + ([f"--num_samples {samples}"] if samples > 1 else []))
        yield (f"against CTranslate2 {ctranslate2.__version__}, {n_layer}-layer gpt2, 128-token prompt, {tokens} new "
               f"tokens, {what}", ours_as, f"CTranslate2 {compute_type}", tokens, target,
               {side: [r["seconds"] for r in runs[what][side]] for side in runs[what]},
               {side: runs[what][side][0]["step_bytes"] for side in runs[what]})

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", choices=["ours", "ctranslate2"])
    parser.add_argument("folder")
    parser.add_argument("--new_tokens", type=int, default=384)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--dtype", default="auto", help="ours: --dtype; CTranslate2: its compute_type")
    parser.add_argument("--quantize", choices=["int8"], help="ours: --quantize")
    args = parser.parse_args()
    decode, read = (ours(args.folder, args.dtype, args.quantize, args.samples) if args.engine == "ours"
                    else ctranslate2_generator(args.folder, args.dtype, args.samples))
    prompt = prompt_ids(128)
    decode(prompt, args.new_tokens)
    start = time.perf_counter()
    decode(prompt, args.new_tokens)
    print(json.dumps({"seconds": time.perf_counter() - start, "step_bytes": read}))


if __name__ == "__main__":
    main()
