"""What each subcommand of run.py does: build the model, call the loop or the decoder, report."""
import argparse
import os
from pathlib import Path

import torch

from textdata.batches import Split, load_splits
from decoding.beam_search import BeamSettings, beam_search
from training.checkpoints import (ADAPTER_CONFIG, LM_TASK, adapter_base, adapter_task, build_classifier, build_lm,
                         gpt_weights, load_lora_classifier, load_lora_lm, load_predictor, save_checkpoint)
from decoding.generation_eval import DecodeSettings, evaluate_split
from decoding.packed_weights import prepare_for_generation
from textdata.readers import DataSpec, encode, get_tokenizer, read_sentences
from runtime.devices import compiled
from training.distillation import (UNLABELLED, KDLoss, check_teacher_data, print_distil_report, teacher_logits,
                    transfer_teacher_logits)
from decoding.sampling import Sampler, print_samples, print_stream
from textdata.lm_examples import load_lm_splits
from training.lm_objective import NextToken
from model import (EOT, GPT, LABELS, DistilRNN, GPTClassifier, RNNConfig, cast_frozen_linears, inject_lora, load_config,
                   mark_only_lora_as_trainable)
from decoding.int8_linears import quantize_int8
from training.report import print_parameter_table, print_predictions
from decoding.static_step import StaticDecoder
from cli.system_info import system_report
from train_utils import activation_bytes_per_token, cross_entropy, predict_logits, train_and_report
from textdata.transfer_set import transfer_sentences
from utils import UserError, seed_everything

LM_BLOCK_SIZE = 256  # --task lm's default block, nanoGPT's fine-tuning size, a quarter of GPT-2's context


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
    """All samples decode in one batch (see print_samples for how they are printed); --adapter decodes with a
    CAUSAL_LM adapter folded into its base; --dataset decodes and scores every prompt of its evaluation split."""
    temperature = 0.0 if args.greedy else 1.0 if args.temperature is None else args.temperature
    if args.dataset:
        return evaluate_split(args, device, dtype, DecodeSettings(
            args.max_new_tokens, temperature, args.top_k, args.top_p, args.repetition_penalty,
            args.no_repeat_ngram_size, args.seed, beam_settings(args) if args.num_beams > 1 else None,
            stop_at_eos=not args.ignore_eos))
    tokenizer = get_tokenizer()
    prompt, prompt_ids = read_prompt(args, tokenizer)
    if args.adapter:
        model = load_lora_lm(args.adapter, args.gpt_variant)
    else:
        seed_everything(args.seed)  # --random_init draws its weights from the seed too
        model = gpt_weights(GPT, args.gpt_variant, args.random_init)
    model = prepare_for_generation(model, device, dtype, rows=max(args.num_samples, args.num_beams),
                                   quantize=args.quantize, compile=args.compile)
    eos = None if args.ignore_eos else tokenizer.eot_token
    if args.num_beams > 1:
        if len(prompt_ids) + args.max_new_tokens > model.config.block_size:
            raise UserError(f"beam search keeps the prompt ({len(prompt_ids)} tokens) and --max_new_tokens "
                            f"{args.max_new_tokens} in the {model.config.block_size}-token context; ask for fewer")
        return print_stream(tokenizer, prompt, iter(beam_search(model, prompt_ids, args.max_new_tokens,
                                                                beam_settings(args), eos_id=eos)), eos, stream=False)
    samplers = [Sampler(temperature, args.top_k, args.top_p, args.repetition_penalty, seed=args.seed + i,
                        no_repeat_ngram_size=args.no_repeat_ngram_size) for i in range(args.num_samples)]
    decoder = StaticDecoder(model) if args.compile else model  # --compile: one compiled graph per step
    steps = decoder.generate_batch(prompt_ids, args.max_new_tokens, samplers, eos_id=eos)
    print_samples(tokenizer, prompt, steps, len(samplers), eos_id=eos, stream=not args.no_stream)


def beam_settings(args):
    early = {None: False, "false": False, "true": True, "never": "never"}[args.early_stopping]
    return BeamSettings(args.num_beams, 1.0 if args.length_penalty is None else args.length_penalty,
                        args.no_repeat_ngram_size, early, args.repetition_penalty)


def cmd_lora(args, device, dtype):
    """LoRA on a classifier (--task classify) or on GPT-2's own head (--task lm): the same loop, another model,
    data and objective."""
    lm = args.task == "lm"
    if args.epochs == 0:  # only the parameter table: build on the meta device, no weights, no download
        with torch.device("meta"):
            model = (GPT if lm else GPTClassifier).from_random(args.gpt_variant)
        return print_parameter_table(mark_only_lora_as_trainable(inject_lora(
            model, args.LoRA_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)))
    splits = lm_splits(args) if lm else data_splits(args, get_tokenizer(), load_config(args.gpt_variant).block_size)
    model = (build_lm if lm else build_classifier)(args.gpt_variant, args.random_init, args.seed, splits.labels)
    inject_lora(model, args.LoRA_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    mark_only_lora_as_trainable(model)
    print_parameter_table(model)
    cast_frozen_linears(model, dtype).to(device)
    run_info = {"random_init": args.random_init, "seed": args.seed, "gpt_variant": args.gpt_variant,
                **splits.identity(), **({"task": "lm"} if lm else {})}
    record = train_and_report("LoRA", model, NextToken() if lm else cross_entropy, splits, args, device, dtype,
                              args.model_path, run_info)
    if record is not None and lm and args.generate_eval:  # rank 0, once the adapter is on disk
        print(f"\ndecoding the {splits.titles['dev']} prompts greedily (--generate_eval {args.generate_eval}):")
        evaluate_split(argparse.Namespace(**vars(args), adapter=args.model_path, quantize=None), device, dtype,
                       DecodeSettings(args.generate_eval, temperature=0.0, seed=args.seed))


def lm_splits(args):
    """--task lm's splits: text blocks (or pairs) of --block_size tokens, by default 256 or the context if shorter."""
    block_size = args.block_size or min(LM_BLOCK_SIZE, load_config(args.gpt_variant).block_size)
    return load_lm_splits(DataSpec.from_args(args), get_tokenizer(), block_size=block_size,
                          prompt_column=args.prompt_column, completion_column=args.completion_column,
                          max_examples=args.max_examples, seed=args.seed)


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
    tokenizer = get_tokenizer()
    splits = data_splits(args, tokenizer, load_config(variant).block_size) if args.epochs else None
    check_teacher_data(args.model_path, info, splits)
    student = build_student(args, splits).to(device)
    print_parameter_table(student)
    if args.epochs == 0:
        return
    logits = teacher_logits(splits, args, variant, device, dtype)
    for name, split in splits.items():
        split.teacher = logits[name]
    train, transfer = with_transfer_set(splits, args, variant, tokenizer, device, dtype)
    record = train_and_report("distil", student, KDLoss(args.temperature, args.alpha, args.kd_loss), splits, args,
                              device, dtype, args.student_path, {"seed": args.seed, "mode": args.mode},
                              extra={"teacher": args.model_path, "transfer": transfer}, train=train)
    if record is not None:  # rank 0
        print_distil_report(logits, splits, record)


def with_transfer_set(splits, args, variant, tokenizer, device, dtype):
    """The training split with the transfer set's sentences after it (label UNLABELLED, the teacher's logits), and
    what the report says of the set; the training split as it is, and None, without one."""
    if not (args.augment or args.transfer_gen):
        return splits["train"], None
    texts = {name: [tokenizer.decode(t) for t in split.tokens] for name, split in splits.items()}
    sentences, about = transfer_sentences(args, texts.pop("train"), texts, variant, tokenizer, device, dtype)
    tokens = encode(tokenizer, sentences)
    if not tokens:
        print(f"note: the transfer set is empty ({about['source']}): training on the training set alone")
        return splits["train"], about
    logits, about["teacher_cache_hit"] = transfer_teacher_logits(tokens, args, variant, device, dtype, splits.spec)
    about["teacher_labels"] = torch.bincount(logits.argmax(-1), minlength=len(splits.labels)).tolist()
    train = splits["train"]
    return Split(train.tokens + tokens, torch.cat([train.labels, torch.full((len(tokens),), UNLABELLED)]),
                 torch.cat([train.teacher, logits])), about


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
    lm = adapter_task(args.model_path) == LM_TASK
    model = (load_lora_lm if lm else load_lora_classifier)(args.model_path, args.gpt_variant)
    save_checkpoint(args.out, "model.safetensors", model.hf_state_dict(), {"config.json": model.hf_config()})
    kind, cls = ("language model", "GPT2LMHeadModel") if lm else ("classifier", "GPT2ForSequenceClassification")
    print(f"merged {kind} written to {args.out}: {cls}.from_pretrained({args.out!r})")


def cmd_info(args, device, dtype):
    with torch.device("meta"):  # LoRA on gpt2's shapes, to size its default micro-batch: no weights, no download
        model = mark_only_lora_as_trainable(inject_lora(GPTClassifier.from_random("gpt2"), 4, 4))
    print(system_report(device, activation_bytes_per_token(model)))
