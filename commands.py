"""What each subcommand of run.py does: build the model, call the loop or the decoder, report."""
import os
from pathlib import Path

import torch

from batches import load_splits
from checkpoints import (ADAPTER_CONFIG, adapter_base, build_classifier, gpt_weights, load_lora_classifier,
                         load_predictor, save_checkpoint)
from cpu_decoding import prepare_for_generation
from data import DataSpec, encode, get_tokenizer, read_sentences
from devices import compiled
from distil import KDLoss, check_teacher_data, print_distil_report, teacher_logits
from generation import Sampler, print_samples
from model import (EOT, GPT, LABELS, DistilRNN, GPTClassifier, RNNConfig, cast_frozen_linears, inject_lora, load_config,
                   mark_only_lora_as_trainable)
from quantize import quantize_int8
from report import print_parameter_table, print_predictions
from static_decoding import StaticDecoder
from system_info import system_report
from train_utils import activation_bytes_per_token, cross_entropy, predict_logits, train_and_report
from utils import UserError, seed_everything


def build_student(args, splits=None):
    """The student for the data's labels (CoLA's when no data is read: --epochs 0 prints its size only)."""
    seed_everything(args.seed)
    return DistilRNN(RNNConfig(hidden=args.rnn_hidden, layers=args.rnn_layers, cell=args.rnn_cell,
                               labels=splits.labels if splits else LABELS))


def data_splits(args, tokenizer, block_size=None):
    return load_splits(DataSpec.from_args(args), tokenizer, block_size=block_size, max_examples=args.max_examples,
                       seed=args.seed)


def read_prompt(args, tokenizer):
    """The prompt's text (--prompt or --prompt_file) and its token ids; an empty prompt starts at <|endoftext|>."""
    prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
    return prompt, tokenizer.encode(prompt, allowed_special={"<|endoftext|>"}) or [tokenizer.eot_token]


def cmd_gen(args, device, dtype):
    """All samples decode in one batch (see print_samples for how they are printed)."""
    tokenizer = get_tokenizer()
    prompt, prompt_ids = read_prompt(args, tokenizer)
    seed_everything(args.seed)  # --random_init draws its weights from the seed too
    model = prepare_for_generation(gpt_weights(GPT, args.gpt_variant, args.random_init), device, dtype,
                                   rows=args.num_samples, quantize=args.quantize, compile=args.compile)
    temperature = 0.0 if args.greedy else 1.0 if args.temperature is None else args.temperature
    eos = None if args.ignore_eos else tokenizer.eot_token
    samplers = [Sampler(temperature, args.top_k, args.top_p, args.repetition_penalty, seed=args.seed + i)
                for i in range(args.num_samples)]
    decoder = StaticDecoder(model) if args.compile else model  # --compile: one compiled graph per step
    steps = decoder.generate_batch(prompt_ids, args.max_new_tokens, samplers, eos_id=eos)
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
    run_info = {"random_init": args.random_init, "seed": args.seed, "gpt_variant": args.gpt_variant,
                **splits.identity()}
    train_and_report("LoRA", model, cross_entropy, splits, args, device, dtype, args.model_path, run_info)


def cmd_rnn(args, device, dtype):
    splits = data_splits(args, get_tokenizer()) if args.epochs else None
    model = build_student(args, splits).to(device)
    print_parameter_table(model)
    if args.epochs:
        train_and_report("rnn", model, cross_entropy, splits, args, device, dtype, args.model_path,
                         {"seed": args.seed, "mode": args.mode})


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
                              args.student_path, {"seed": args.seed, "mode": args.mode},
                              extra={"teacher": args.model_path})
    if record is not None:  # rank 0
        print_distil_report(logits, splits, record)


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
