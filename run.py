"""Command line: `python run.py {gen,LoRA,rnn,distil,predict,export,tune,info} ...`. Parse, validate, build, call,
report."""
import argparse
import hashlib
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

import torch

import tune
from model import (ADAPTER_CONFIG, GPT, LORA_TARGETS, STUDENT_CONFIG, DistilRNN, GPTClassifier, RNNConfig, Sampler,
                   adapter_base, cast_frozen_linears, inject_lora, load_config, load_lora_model, load_student,
                   looks_like_path, mark_only_lora_as_trainable, quantize_int8, save_adapter, save_student,
                   variant_slug)
from train_utils import (PLOTS_DIR, TUNING_DIR, KDLoss, activation_bytes_per_token, cached_teacher_logits,
                         check_teacher_data, cross_entropy, load_splits, predict_logits, print_distil_report,
                         print_parameter_table, print_predictions, resume_state_path, run_stem, train_and_report)
from utils import (EOT, LABELS, DataSpec, DecodingWork, OneLineParser, Terminated, UserError, compiled, compute_dtype,
                   data_fingerprint, default_cola_dir, encode, file_sha256, fraction, get_tokenizer, gpu_device,
                   init_distributed, interrupt_exit_code, is_main, main_first, non_negative_float, non_negative_int,
                   number_in, positive_float, positive_int, print_samples, read_sentences, resolve_device,
                   save_checkpoint, seed_everything, seed_int, sigterm_as_interrupt, system_report, writable)


# ----------------------------------------------------------------------------- building models

def gpt_weights(cls, variant, random_init, **kwargs):
    """`cls` (GPT or GPTClassifier) with the variant's pretrained weights, or (random_init) random ones."""
    if random_init:
        print(f"note: {variant} architecture with random weights (--random_init), nothing downloaded",
              file=sys.stderr)
        return cls.from_random(variant, **kwargs)
    with main_first():  # one download, not one per rank
        return cls.from_pretrained(variant, **kwargs)


def build_classifier(variant, random_init, seed, labels=LABELS):
    """GPT-2 + score head for `labels`: pretrained weights, or (random_init) weights drawn from `seed`, so a later
    run can rebuild the very same base from the seed alone."""
    seed_everything(seed)
    return gpt_weights(GPTClassifier, variant, random_init, labels=labels)


def load_lora_classifier(folder, variant=None):
    """The classifier `run.py LoRA` (or PEFT) saved in `folder`, LoRA folded in, in eval mode."""
    return load_lora_model(folder, variant, build_classifier)


def build_student(args, splits=None):
    """The student for the data's labels (CoLA's when no data is read: --epochs 0 prints its size only)."""
    seed_everything(args.seed)
    return DistilRNN(RNNConfig(hidden=args.rnn_hidden, layers=args.rnn_layers, cell=args.rnn_cell,
                               labels=splits.labels if splits else LABELS))


def student_saver(model, folder, args):
    """What a student run does last: save the student to `folder` and say so."""
    def save():
        save_student(model, folder, {"seed": args.seed, "mode": args.mode})
        print(f"student saved to {folder}")
    return save


def data_splits(args, tokenizer, block_size=None):
    return load_splits(DataSpec.from_args(args), tokenizer, block_size=block_size, max_examples=args.max_examples,
                       seed=args.seed)


# ----------------------------------------------------------------------------- subcommands

def read_prompt(args, tokenizer):
    """The prompt's text (--prompt or --prompt_file) and its token ids; an empty prompt starts at <|endoftext|>."""
    prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
    return prompt, tokenizer.encode(prompt, allowed_special={"<|endoftext|>"}) or [tokenizer.eot_token]


def cmd_gen(args, device, dtype):
    """All samples decode in one batch (see print_samples for how they are printed)."""
    tokenizer = get_tokenizer()
    prompt, prompt_ids = read_prompt(args, tokenizer)
    seed_everything(args.seed)  # --random_init draws its weights from the seed too
    model = gpt_weights(GPT, args.gpt_variant, args.random_init).for_generation(device, dtype, args.quantize,
                                                                                args.compile)
    temperature = 0.0 if args.greedy else 1.0 if args.temperature is None else args.temperature
    eos = None if args.ignore_eos else tokenizer.eot_token
    samplers = [Sampler(temperature, args.top_k, args.top_p, args.repetition_penalty, seed=args.seed + i)
                for i in range(args.num_samples)]
    steps = model.generate_batch(prompt_ids, args.max_new_tokens, samplers, eos_id=eos)
    print_samples(tokenizer, prompt, steps, len(samplers), eos_id=eos, stream=not args.no_stream)


def cmd_lora(args, device, dtype):
    if args.epochs == 0:  # only the parameter table: build on the meta device, no weights, no download
        with torch.device("meta"):
            model = GPTClassifier.from_random(args.gpt_variant)
        return print_parameter_table(mark_only_lora_as_trainable(inject_lora(
            model, args.LoRA_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)))
    splits = data_splits(args, get_tokenizer(), load_config(args.gpt_variant).block_size)
    model = build_classifier(args.gpt_variant, args.random_init, args.seed, splits.labels)
    inject_lora(model, args.LoRA_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    mark_only_lora_as_trainable(model)
    print_parameter_table(model)
    cast_frozen_linears(model, dtype).to(device)

    def save():
        save_adapter(model, args.model_path, rank=args.LoRA_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                     targets=args.lora_targets, base_model=args.gpt_variant,
                     run_info={"random_init": args.random_init, "seed": args.seed, "gpt_variant": args.gpt_variant,
                               **splits.identity()})
        print(f"adapter saved to {args.model_path} (PEFT format)")

    train_and_report("LoRA", model, cross_entropy, splits, args, device, dtype, args.model_path, save)


def cmd_rnn(args, device, dtype):
    splits = data_splits(args, get_tokenizer()) if args.epochs else None
    model = build_student(args, splits).to(device)
    print_parameter_table(model)
    if args.epochs:
        train_and_report("rnn", model, cross_entropy, splits, args, device, dtype, args.model_path,
                         save=student_saver(model, args.model_path, args))


def cmd_distil(args, device, dtype):
    if not (Path(args.model_path) / ADAPTER_CONFIG).exists():
        raise UserError(f"no LoRA adapter at {args.model_path}: train the teacher first with "
                        f"`python run.py LoRA --gpt_variant {args.gpt_variant or 'gpt2'}`, or pass --model_path")
    _, info, variant = adapter_base(args.model_path, args.gpt_variant)
    splits = data_splits(args, get_tokenizer(), load_config(variant).block_size) if args.epochs else None
    check_teacher_data(args.model_path, info, splits)
    student = build_student(args, splits).to(device)
    print_parameter_table(student)
    if args.epochs == 0:
        return
    logits = teacher_logits(splits, args, variant, device, dtype)
    for name, split in splits.items():
        split.teacher = logits[name]
    record = train_and_report("distil", student, KDLoss(args.temperature, args.alpha), splits, args, device, dtype,
                              args.student_path, save=student_saver(student, args.student_path, args),
                              extra={"teacher": args.model_path})
    if record is not None:  # rank 0
        print_distil_report(logits, splits, record)


def teacher_logits(splits, args, variant, device, dtype):
    """The teacher's logits on every split, cached under a key made of the adapter's content, the base model, the
    dtype and the data: a second run with the same teacher neither builds nor runs it."""
    folder = Path(args.model_path)
    adapter = file_sha256(*(p for p in sorted(folder.iterdir()) if p.is_file()))
    key = hashlib.sha256(f"{adapter} {base_identity(variant)}".encode()).hexdigest()[:16]
    name = "-".join([run_stem("teacher", splits.spec), key, variant_slug(variant), str(dtype).removeprefix("torch."),
                     data_fingerprint(splits)])
    return cached_teacher_logits(Path("models/cache") / f"{name}.safetensors",
                                 lambda: cast_frozen_linears(load_lora_classifier(folder, variant), dtype).to(device),
                                 splits, batch_size=args.batch_size, device=device, dtype=dtype)


def base_identity(variant):
    """A hub id as it is; a local folder by its absolute path and its files' sizes and modification times, so that
    a base replaced or rewritten in place (or another folder of the same name) gets its own teacher logits."""
    if not os.path.isdir(variant):
        return variant
    files = sorted(p for p in Path(variant).resolve().iterdir() if p.is_file())
    return repr([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def load_predictor(folder, variant):
    """A trained classifier (GPT-2 + LoRA or a student) from its folder, recognised by its files."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).exists():
        return load_lora_classifier(folder, variant)
    if (folder / STUDENT_CONFIG).exists():
        return load_student(folder)
    raise UserError(f"{folder}: neither a LoRA adapter folder ({ADAPTER_CONFIG}) nor a student checkpoint "
                    f"({STUDENT_CONFIG}); train one with `python run.py LoRA` or `python run.py rnn`")


def cmd_predict(args, device, dtype):
    sentences, labels = read_sentences(args.sentence, args.input, DataSpec.from_args(args))
    model = load_predictor(args.model_path, args.gpt_variant)
    block_size = model.config.block_size if isinstance(model, GPTClassifier) else None
    if args.quantize == "int8" and not block_size:
        raise UserError(f"--quantize int8 is for GPT-2 classifiers; {args.model_path} holds an RNN student")
    if args.quantize == "int8":
        quantize_int8(model)
    elif block_size:
        cast_frozen_linears(model, dtype)
    # An empty line becomes <|endoftext|> alone; GPT-2 keeps the last block_size tokens, whose final one it reads.
    tokens = [(t or [EOT])[-block_size:] if block_size else (t or [EOT]) for t in encode(get_tokenizer(), sentences)]
    logits = predict_logits(compiled(model.to(device), args.compile), tokens, batch_size=args.batch_size,
                            device=device, dtype=dtype)
    print_predictions(sentences, torch.softmax(logits, -1), model.labels, labels, args.format)


def cmd_export(args, device, dtype):
    base = adapter_base(args.model_path, args.gpt_variant)[2]
    if os.path.isdir(base) and Path(base).resolve() == Path(args.out).resolve():
        raise UserError(f"--out {args.out}: is the adapter's base model, which the export would replace; "
                        "choose another folder")
    model = load_lora_classifier(args.model_path, args.gpt_variant)
    save_checkpoint(args.out, "model.safetensors", model.hf_state_dict(), {"config.json": model.hf_config()})
    print(f"merged classifier written to {args.out}: GPT2ForSequenceClassification.from_pretrained({args.out!r})")


def cmd_info(args, device, dtype):
    with torch.device("meta"):  # LoRA on gpt2's shapes, to size its default micro-batch: no weights, no download
        model = mark_only_lora_as_trainable(inject_lora(GPTClassifier.from_random("gpt2"), 4, 4))
    print(system_report(device, activation_bytes_per_token(model)))


# ----------------------------------------------------------------------------- arguments

def build_parser():
    parser = OneLineParser(description="GPT-2 generation, LoRA fine-tuning and distillation on CoLA.")
    sub = parser.add_subparsers(dest="mode", required=True)

    # Each subcommand takes only the flags it uses: `common` every one, `placed` those that use a device,
    # `compute` those that run a model there, `seeded` those that draw random numbers.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks")
    placed = argparse.ArgumentParser(add_help=False, parents=[common])
    placed.add_argument("--device", default="auto", help="auto (CUDA, else an Apple GPU, else the CPU), cpu, cuda, "
                        "cuda:N, mps")
    placed.add_argument("--gpu_id", dest="device", type=gpu_device, default=argparse.SUPPRESS,
                        help="the assignment's GPU index N: the same as --device cuda:N")
    compute = argparse.ArgumentParser(add_help=False, parents=[placed])
    compute.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                         help="auto: bf16 where it is native (GPUs from A100 on, CPUs with AMX/AVX512-BF16), fp16 "
                         "on T4/V100, else fp32; gen on a CPU times fp32 against bf16 (with --quantize int8: fp32)")
    compute.add_argument("--compile", action="store_true", help="torch.compile the model (no faster on a 2-core CPU)")
    seeded = argparse.ArgumentParser(add_help=False, parents=[compute])
    seeded.add_argument("--seed", type=seed_int, default=0, help="seeds weights, data order, dropout and sampling "
                        "(the assignment's form, a number right after the subcommand, means the same)")

    gpt = argparse.ArgumentParser(add_help=False)
    gpt.add_argument("--gpt_variant", default="gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, any Hugging "
                     "Face GPT-2 id, or a local folder in transformers' format")
    gpt.add_argument("--random_init", action="store_true", help="the variant's architecture with random weights")

    train = argparse.ArgumentParser(add_help=False)
    train.add_argument("--data_dir", default=default_cola_dir(), help="folder of the raw CoLA TSVs "
                       "(downloaded there when missing; $COLA_DATA_DIR when set, else data/cola)")
    train.add_argument("--max_examples", type=positive_int, help="train on a seeded random subset of this size")
    train.add_argument("--resume", action="store_true", help="continue the interrupted run with these flags")
    train.add_argument("--batch_size", type=positive_int, default=128, help="sentences per optimizer step")
    train.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    train.add_argument("--tensorboard", nargs="?", const="auto", metavar="DIR", help="log steps and epochs for "
                       "TensorBoard in DIR (given alone: runs/<mode>-<time>-<pid>)")
    train.add_argument("--micro_batch_tokens", type=positive_int, help="split each batch into pieces of at most "
                       "this many padded tokens and accumulate gradients: bounds memory, same result (default: 512 "
                       "on CPU, as fast as larger pieces there; on CUDA what half the free memory holds)")

    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--dataset", default="cola", help="cola (raw TSVs in --data_dir), a Hugging Face dataset id, "
                      "or a folder: train/validation[/test] csv, tsv, json, jsonl, parquet, or save_to_disk's")
    for flag, about in (("dataset_config", "the hub dataset's configuration, e.g. sst2"), ("train_split", "default: "
                        "train"), ("text_column", "default: sentence, else text"), ("label_column", "default: label, "
                        "else labels"), ("eval_split", "default: validation, else dev"), ("test_split", "the second "
                        "evaluation, if labelled (default: test)")):
        data.add_argument(f"--{flag}", help=about)

    student = argparse.ArgumentParser(add_help=False)
    student.add_argument("--rnn_hidden", "--hidden_dim", type=positive_int, default=768,
                         help="student embedding and hidden size (--hidden_dim: the assignment's name)")
    student.add_argument("--rnn_layers", type=positive_int, default=2, help="stacked recurrent layers")
    student.add_argument("--rnn_cell", default="rnn", choices=["rnn", "gru", "lstm"], help="recurrent cell")
    student.add_argument("--clip", type=non_negative_float, default=1.0,
                         help="gradient-norm clipping, 0 for none (ReLU RNNs explode without it)")
    student.add_argument("--epochs", type=non_negative_int, default=5, help="0 prints the parameter table only")

    g = sub.add_parser("gen", parents=[seeded, gpt], help="generate text")
    prompt = g.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue")
    prompt.add_argument("--prompt_file", help="read the prompt from this file")
    g.add_argument("--max_new_tokens", type=positive_int, default=100, help="tokens to generate per sample")
    g.add_argument("--temperature", type=non_negative_float, help="0 means greedy (default: 1)")
    g.add_argument("--top_k", type=positive_int, default=50, help="sample among the k most likely tokens")
    g.add_argument("--top_p", type=number_in(float, 0, 1, low_open=True), default=None,
                   help="nucleus sampling: keep the most likely tokens up to this probability mass")
    g.add_argument("--repetition_penalty", type=positive_float, default=1.0, help="CTRL's penalty; 1 is none")
    g.add_argument("--greedy", action="store_true", help="always the most likely token")
    g.add_argument("--ignore_eos", action="store_true", help="keep going past <|endoftext|>")
    g.add_argument("--num_samples", type=positive_int, default=1, help="samples to draw, in one batch (seeds "
                   "--seed, --seed+1, ...); sample 1 streams, the rest print at the end")
    g.add_argument("--no_stream", action="store_true", help="print each sample when it is complete")
    g.add_argument("--quantize", choices=["int8"], help="int8 weights (one scale per output channel) for the "
                   "blocks and the head: a quarter of fp32's bytes to read per token (errors: see README)")
    g.set_defaults(func=cmd_gen, check=check_gen)

    lora = sub.add_parser("LoRA", parents=[seeded, gpt, train, data],
                          help="LoRA fine-tuning of GPT-2 on CoLA or another dataset")
    lora.add_argument("--LoRA_rank", "--lora_rank", type=positive_int, default=4, help="rank r of the update B A")
    lora.add_argument("--lora_alpha", type=positive_float, help="scale numerator (default: the rank, i.e. scale 1)")
    lora.add_argument("--lora_dropout", type=number_in(float, 0, 1, high_open=True), default=0.0,
                      help="dropout on the LoRA branch's input")
    lora.add_argument("--lora_targets", nargs="+", choices=LORA_TARGETS, default=list(LORA_TARGETS),
                      help="the linear layers of each block that get LoRA")
    lora.add_argument("--epochs", type=non_negative_int, default=10, help="0 prints the parameter table only")
    lora.add_argument("--model_path", help="adapter folder to write (default models/LoRA-<variant>)")
    lora.set_defaults(func=cmd_lora, check=check_lora)

    rnn = sub.add_parser("rnn", parents=[seeded, train, data, student], help="train the DistilRNN student on labels")
    rnn.add_argument("--model_path", default="models/rnn", help="student checkpoint folder to write")
    rnn.set_defaults(func=cmd_rnn, check=lambda parser, args: check_training(parser, args, "model_path"))

    distil = sub.add_parser("distil", parents=[seeded, train, data, student],
                            help="distil the LoRA-tuned GPT-2 into the DistilRNN student")
    distil.add_argument("--gpt_variant", help="the teacher's base (default: the one the adapter names)")
    distil.add_argument("--model_path", help="the teacher's adapter folder (default models/LoRA-<variant>)")
    distil.add_argument("--student_path", default="models/distil-rnn", help="student checkpoint folder to write")
    distil.add_argument("--temperature", type=positive_float, default=2.0, help="softmax temperature T of the KD loss")
    distil.add_argument("--alpha", type=fraction, default=0.5, help="weight of the soft (KL) part; 1-alpha on labels")
    distil.set_defaults(func=cmd_distil, check=check_distil)

    predict = sub.add_parser("predict", parents=[compute, data], help="classify sentences with a trained model")
    predict.add_argument("--model_path", required=True, help="a LoRA adapter folder or a student checkpoint")
    predict.add_argument("--gpt_variant", help="GPT-2 base for an adapter (default: the one it names)")
    source = predict.add_mutually_exclusive_group()
    source.add_argument("--sentence", action="append", help="a sentence to classify (repeatable)")
    source.add_argument("--input", help="one sentence per line, a CoLA-format TSV, or a csv / tsv / json / jsonl "
                        "/ parquet file read with --text_column, --label_column (with labels, the scores too)")
    predict.add_argument("--format", default="table", choices=["table", "jsonl", "tsv"], help="output format")
    predict.add_argument("--batch_size", type=positive_int, default=128, help="sentences per forward pass")
    predict.add_argument("--quantize", choices=["int8"], help="int8 weights for the blocks and the head "
                         "(GPT-2 classifiers): about half the memory; slower than fp32 for large batches")
    predict.set_defaults(func=cmd_predict, check=check_model_use)

    export = sub.add_parser("export", parents=[common],
                            help="write a LoRA-tuned classifier as a plain Hugging Face checkpoint, LoRA merged")
    export.add_argument("--model_path", required=True, help="the adapter folder")
    export.add_argument("--gpt_variant", help="GPT-2 base (default: the one the adapter names)")
    export.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")
    export.set_defaults(func=cmd_export, check=check_model_use, device="cpu", dtype="float32")  # fixed, no flags

    sweep = sub.add_parser("tune", help="sweep seeds x a grid of flags of LoRA, rnn or distil", description=(
        "Example: python run.py tune distil --seeds 1 2 3 --grid temperature=1,2,4 alpha=0.3,0.5,0.9 --epochs 3. "
        "Any other flag is passed to every run."))
    sweep.add_argument("target", choices=tune.TUNABLE, help="the subcommand to sweep")
    sweep.add_argument("--seeds", nargs="+", type=seed_int, default=[0, 1, 2],
                       help="each configuration runs once per seed")
    sweep.add_argument("--grid", nargs="+", default=[], metavar="FLAG=V1,V2", help="values to sweep, per flag")
    sweep.add_argument("--name", help="names tuning/<name>.md and plots/tune_<name>.png (default: from the grid)")
    sweep.add_argument("--parallel", type=positive_int, default=1,
                       help="run this many configurations side by side, one process each (each on a visible GPU if "
                       "any)")
    sweep.add_argument("--debug", action="store_true", help="show full tracebacks")
    sweep.set_defaults(func=None, check=check_results_writable)
    sub.add_parser("info", parents=[placed], help="versions, hardware, what would be chosen here, where data is"
                   ).set_defaults(func=cmd_info, check=lambda parser, args: None, dtype="auto")
    return parser


# Checks argparse cannot express, and defaults that depend on other flags: usage errors (exit 2) before anything
# is downloaded or built. Each subcommand names its `check` in build_parser; main() calls it.

def check_gen(parser, args):
    ignored = [flag for flag in ("temperature", "top_p") if args.greedy and getattr(args, flag) is not None]
    if ignored:
        parser.error(f"--greedy takes the most likely token: --{ignored[0]} would be ignored")
    check_variant(parser, args.gpt_variant)
    check_exists(parser, "prompt_file", args.prompt_file)
    if args.prompt_file:
        try:
            Path(args.prompt_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            parser.error(f"--prompt_file {args.prompt_file}: not UTF-8 text (byte {e.start})")


def check_lora(parser, args):
    twice = next((t for i, t in enumerate(args.lora_targets) if t in args.lora_targets[:i]), None)
    if twice:
        parser.error(f"--lora_targets: {twice} is given twice")
    args.lora_alpha = args.LoRA_rank if args.lora_alpha is None else args.lora_alpha
    args.model_path = args.model_path or f"models/LoRA-{variant_slug(args.gpt_variant)}"
    check_variant(parser, args.gpt_variant)
    check_training(parser, args, "model_path")


def check_distil(parser, args):
    args.model_path = args.model_path or f"models/LoRA-{variant_slug(args.gpt_variant or 'gpt2')}"
    check_variant(parser, args.gpt_variant)
    check_training(parser, args, "student_path")


def check_model_use(parser, args):
    """predict and export read a trained model's folder; predict may read an --input file, export writes --out."""
    check_variant(parser, args.gpt_variant)
    check_exists(parser, "input", getattr(args, "input", None))
    check_exists(parser, "model_path", args.model_path, folder=True)
    if args.mode == "export":
        check_output_folder(parser, "out", args.out)
        check_output_kind(parser, "out", args.out, "a transformers model")


def check_variant(parser, variant):
    if variant and looks_like_path(variant):  # else a Hugging Face id, looked up when it is loaded
        check_exists(parser, "gpt_variant", variant, folder=True)


def check_exists(parser, flag, path, folder=False):
    """--flag PATH, when given, must name an existing folder (or file)."""
    if path and not (Path(path).is_dir() if folder else Path(path).is_file()):
        parser.error(f"--{flag} {path}: no such {'folder' if folder else 'file'}")


def check_output_folder(parser, flag, path):
    """A folder we write into: it may exist and hold other files, but must not be a file."""
    if Path(path).exists() and not Path(path).is_dir():
        parser.error(f"--{flag} {path}: exists and is not a folder (nothing was written to it)")
    if not writable(path):
        parser.error(f"--{flag} {path}: cannot write there (a file is in the way, or no permission)")


def folder_holds(path):
    """Which model a folder holds: a LoRA adapter, a student checkpoint, a transformers model, or None."""
    folder = Path(path)
    if (folder / ADAPTER_CONFIG).is_file():
        return "a LoRA adapter"
    if not (folder / STUDENT_CONFIG).is_file():
        return None
    try:
        kind = json.loads((folder / STUDENT_CONFIG).read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        kind = None
    return "a student checkpoint" if kind == "DistilRNN" else "a transformers model"


def check_output_kind(parser, flag, path, writes):
    """An output folder may hold an earlier model of the kind written there, never another model's files (a
    teacher's adapter, a base model), which the write would overwrite or mix with."""
    held = folder_holds(path)
    if held and held != writes:
        parser.error(f"--{flag} {path}: holds {held}; {writes} written there would overwrite or mix with it, "
                     "choose another folder")


def check_training(parser, args, output_flag):
    out = getattr(args, output_flag)
    for flag in (output_flag, "data_dir"):
        check_output_folder(parser, flag, getattr(args, flag))
    state = resume_state_path(out)  # beside the output folder, not in it
    if not writable(state):
        parser.error(f"--{output_flag} {out}: cannot write {state} (a run's state between epochs) there")
    check_output_kind(parser, output_flag, out, "a LoRA adapter" if args.mode == "LoRA" else "a student checkpoint")
    ignored = DataSpec.from_args(args).ignored_flag()
    if ignored:
        parser.error(ignored)
    check_tensorboard(parser, args)
    check_results_writable(parser, args)


def check_tensorboard(parser, args):
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        parser.error("--tensorboard needs the tensorboard package: pip install tensorboard")
    if args.tensorboard not in (None, "auto"):
        check_output_folder(parser, "tensorboard", args.tensorboard)


def check_results_writable(parser, args):
    for folder in (TUNING_DIR, PLOTS_DIR):
        if Path(folder).exists() and not Path(folder).is_dir():
            parser.error(f"{folder}: a file is where run results go (the folder {folder}/); move it away")
        if not writable(folder):
            parser.error(f"{folder}/: cannot write run results there (permission denied)")


def execute(args):
    """Run a parsed subcommand on the device and dtype its flags ask for, resolved here once."""
    device = resolve_device(args.device)
    decoding = None
    if args.mode == "gen" and args.dtype == "auto" and device.type == "cpu":  # the work decides (see decode_dtype)
        decoding = DecodingWork(args.num_samples, len(read_prompt(args, get_tokenizer())[1]), args.max_new_tokens,
                                int8=args.quantize == "int8")
    args.func(args, device, compute_dtype(args.dtype, device, args.mode in tune.TUNABLE, decoding))


def seed_from_sr_no(argv):
    """The assignment's `run.py MODE SR_NO ...`: its 5-digit SR number, right after the subcommand, was the seed."""
    if len(argv) > 1 and argv[0] != "tune" and argv[1].isdigit():
        return [argv[0], "--seed", argv[1], *argv[2:]]
    return argv


def main(argv=None):
    """Run one subcommand; every failure ends in one line on stderr (the traceback only with --debug)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(seed_from_sr_no(sys.argv[1:] if argv is None else argv))
    if rest and args.mode != "tune":  # a sweep passes the flags it does not know to every run
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        args.check(parser, args)
        plan = tune.tune_plan(parser, args, rest) if args.mode == "tune" else None
        init_distributed()
        if not is_main():  # under torchrun only rank 0 prints
            sys.stdout = open(os.devnull, "w")
        with sigterm_as_interrupt():  # SIGTERM stops a run as Ctrl-C does
            tune.sweep(args, plan, execute) if plan else execute(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return getattr(e, "exit_code", 1)
    except KeyboardInterrupt as e:
        print(f"error: {'terminated (SIGTERM)' if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
        return interrupt_exit_code(e)
    except Exception as e:
        if args.debug:
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
        print(f"error: unexpected {type(e).__name__}: {reason} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
