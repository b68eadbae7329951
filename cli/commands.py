"""What each subcommand of run.py does with its configuration (config.subcommands): build the model, call the loop
or the decoder, report. Each hands the sections below it, never the whole configuration, except to the run's
record, which holds it."""
import os
from pathlib import Path
import time
import uuid

import torch

from cli.system_info import system_report
from config.records import config_fields, read_record, write_jsonl_record
from config.sections import DecodeSettings
from decoding.beam_search import beam_search, beam_settings
from decoding.generation_eval import evaluate_split
from decoding.int8_linears import quantize_int8
from decoding.packed_weights import prepare_for_generation
from decoding.sampling import print_samples, print_stream, sampler_for
from decoding.static_step import StaticDecoder
from model import (EOT, GPT, LABELS, METHODS, DistilRNN, GPTClassifier, RNNConfig, cast_frozen_linears, inject_lora,
                   load_config, mark_only_lora_as_trainable)
from runtime.devices import compiled
from reporting.contents import report_document
from reporting.document import to_html, to_markdown
from reporting.model_card import exported_card
from runtime.provenance import provenance, reproducing_command
from textdata.batches import Split, load_splits
from textdata.lm_examples import load_lm_splits
from textdata.readers import encode, get_tokenizer, read_sentences, run_stem
from textdata.transfer_set import transfer_sentences
from train_utils import activation_bytes_per_token, cross_entropy, predict_logits, train_and_report
from training.checkpoints import (LM_TASK, adapter_base, adapter_task, build_classifier, build_lm, gpt_weights,
                                  is_adapter, load_lora_classifier, load_lora_lm, load_predictor, save_checkpoint)
from training.distil_report import print_distil_report
from training.kd_loss import UNLABELLED, KDLoss
from training.lm_objective import NextToken
from training.run_watch import when_and_where
from training.tables import print_parameter_table, print_predictions
from training.teacher import check_teacher_data, teacher_logits, transfer_teacher_logits
from utils import TUNING_DIR, UserError, atomic_files, seed_everything

LM_BLOCK_SIZE = 256  # --task lm's default block, nanoGPT's fine-tuning size, a quarter of GPT-2's context


def build_student(student, seed, splits=None):
    """The student of shape `student` (config.sections.StudentSettings) for the data's labels (CoLA's when no data
    is read: --epochs 0 prints its size only)."""
    seed_everything(seed)
    return DistilRNN(RNNConfig(hidden=student.rnn_hidden, layers=student.rnn_layers, cell=student.rnn_cell,
                               labels=splits.labels if splits else LABELS))


def data_splits(config, tokenizer, block_size=None):
    return load_splits(config.data, tokenizer, block_size=block_size, max_examples=config.train.max_examples,
                       seed=config.run.seed)


def read_prompt(config, tokenizer):
    """The prompt's text (--prompt or --prompt_file) and its token ids; an empty prompt starts at <|endoftext|>."""
    prompt = Path(config.prompt_file).read_text(encoding="utf-8") if config.prompt_file else config.prompt
    return prompt, tokenizer.encode(prompt, allowed_special={"<|endoftext|>"}) or [tokenizer.eot_token]


def cmd_gen(config, device, dtype):
    """All samples decode in one batch (see print_samples for how they are printed); --adapter decodes with a
    CAUSAL_LM adapter folded into its base; --dataset decodes and scores every prompt of its evaluation split."""
    decode, source, seed = config.decode, config.model, config.run.seed
    if config.data.dataset:
        return evaluate_split(config.data, config.pairs, source, config.adapter, decode, seed, device, dtype)
    tokenizer = get_tokenizer()
    prompt, prompt_ids = read_prompt(config, tokenizer)
    if config.adapter:
        model = load_lora_lm(config.adapter, source.gpt_variant)
    else:
        seed_everything(seed)  # --random_init draws its weights from the seed too
        model = gpt_weights(GPT, source.gpt_variant, source.random_init)
    model = prepare_for_generation(model, device, dtype, rows=max(config.num_samples, decode.num_beams),
                                   quantize=source.quantize, compile=config.run.compile)
    eos = None if decode.ignore_eos else tokenizer.eot_token
    start = time.perf_counter()
    if decode.num_beams > 1:
        if len(prompt_ids) + decode.max_new_tokens > model.config.block_size:
            raise UserError(f"beam search keeps the prompt ({len(prompt_ids)} tokens) and --max_new_tokens "
                            f"{decode.max_new_tokens} in the {model.config.block_size}-token context; ask for fewer")
        samples = [print_stream(tokenizer, prompt, iter(beam_search(model, prompt_ids, decode.max_new_tokens,
                                                                    beam_settings(decode), eos_id=eos)), eos,
                                stream=False)]
    else:
        samplers = [sampler_for(decode, seed + i) for i in range(config.num_samples)]
        decoder = StaticDecoder(model) if config.run.compile else model  # --compile: one compiled graph per step
        steps = decoder.generate_batch(prompt_ids, decode.max_new_tokens, samplers, eos_id=eos)
        samples = print_samples(tokenizer, prompt, steps, len(samplers), eos_id=eos, stream=not config.no_stream)
    if not config.no_record:
        log_generation(config, prompt, samples, time.perf_counter() - start, device, dtype)


def log_generation(config, prompt, samples, seconds, device, dtype):
    """gen's line in tuning/gen.jsonl: its configuration, the prompt, each sample's text and the tokens/s of the
    decoding (all samples' new tokens over its wall time, printing included)."""
    record = {**config_fields(config), **provenance(config), "run_id": uuid.uuid4().hex[:12], "finished": True,
              **when_and_where(device, dtype), "prompt": prompt, "samples": [text for text, _ in samples],
              "tokens_per_s": sum(n for _, n in samples) / seconds, "wall_seconds": seconds}
    write_jsonl_record(f"{TUNING_DIR}/gen.jsonl", record)


def lora_model(config, labels, build):
    """GPT-2 (`build`: a builder of training.checkpoints, or a meta-device one) trained as config.lora.method says:
    LoRA (rsLoRA, DoRA) as config.lora says, with the LayerNorms and the head; the head and the LayerNorms alone;
    or every weight. With --grad_checkpoint its blocks recompute their activations in the backward pass."""
    source, lora = config.model, config.lora
    model = build(source.gpt_variant, source.random_init, config.run.seed, labels)
    if lora.method == "lora":
        inject_lora(model, lora.LoRA_rank, lora.lora_alpha, lora.lora_dropout, lora.lora_targets,
                    rslora=lora.use_rslora, dora=lora.use_dora)
    model.grad_checkpoint = config.train.grad_checkpoint
    return METHODS[lora.method](model)


def cmd_lora(config, device, dtype, trial=None):
    """LoRA on a classifier (--task classify) or on GPT-2's own head (--task lm): the same loop, another model,
    data and objective."""
    lm, source = config.lora.task == "lm", config.model
    if config.train.epochs == 0:  # only the parameter table: build on the meta device, no weights, no download
        with torch.device("meta"):
            return print_parameter_table(lora_model(config, None, lambda variant, *_: (
                GPT if lm else GPTClassifier).from_random(variant)), trained=True)
    splits = lm_splits(config) if lm else data_splits(config, get_tokenizer(),
                                                       load_config(source.gpt_variant).block_size)
    model = lora_model(config, splits.labels, build_lm if lm else build_classifier)
    print_parameter_table(model, trained=True)
    cast_frozen_linears(model, dtype).to(device)
    run_info = {"random_init": source.random_init, "seed": config.run.seed, "gpt_variant": source.gpt_variant,
                "method": config.lora.method, **splits.identity(), **({"task": "lm"} if lm else {})}
    record = train_and_report(model, NextToken() if lm else cross_entropy, splits, config, device=device,
                              dtype=dtype, out_path=config.model_path, run_info=run_info, trial=trial)
    if record is not None and lm and config.lm.generate_eval:  # rank 0, once the adapter is on disk
        print(f"\ndecoding the {splits.titles['dev']} prompts greedily (--generate_eval {config.lm.generate_eval}):")
        evaluate_split(config.data, config.pairs, source, config.model_path,
                       DecodeSettings(max_new_tokens=config.lm.generate_eval, greedy=True), config.run.seed, device,
                       dtype)


def lm_splits(config):
    """--task lm's splits: text blocks (or pairs) of --block_size tokens, by default 256 or the context if shorter."""
    block_size = config.lm.block_size or min(LM_BLOCK_SIZE, load_config(config.model.gpt_variant).block_size)
    return load_lm_splits(config.data, get_tokenizer(), block_size=block_size,
                          prompt_column=config.pairs.prompt_column, completion_column=config.pairs.completion_column,
                          max_examples=config.train.max_examples, seed=config.run.seed)


def cmd_rnn(config, device, dtype, trial=None):
    splits = data_splits(config, get_tokenizer()) if config.train.epochs else None
    model = build_student(config.student, config.run.seed, splits).to(device)
    print_parameter_table(model)
    if config.train.epochs:
        train_and_report(model, cross_entropy, splits, config, device=device, dtype=dtype,
                         out_path=config.model_path, run_info={"seed": config.run.seed, "mode": config.MODE},
                         trial=trial)


def cmd_distil(config, device, dtype, trial=None):
    adapter, batch_size = config.model_path, config.train.batch_size
    if not is_adapter(adapter):
        raise UserError(f"no LoRA adapter at {adapter}: train the teacher first with `python run.py LoRA "
                        f"--gpt_variant {config.model.gpt_variant or 'gpt2'}`, or pass --model_path")
    _, info, variant = adapter_base(adapter, config.model.gpt_variant)
    tokenizer = get_tokenizer()
    splits = data_splits(config, tokenizer, load_config(variant).block_size) if config.train.epochs else None
    check_teacher_data(adapter, info, splits)
    student = build_student(config.student, config.run.seed, splits).to(device)
    print_parameter_table(student)
    if config.train.epochs == 0:
        return
    logits = teacher_logits(splits, adapter, variant, batch_size=batch_size, device=device, dtype=dtype)
    for name, split in splits.items():
        split.teacher = logits[name]
    train, transfer = with_transfer_set(splits, config, variant, tokenizer, device, dtype)
    kd = config.distil
    record = train_and_report(student, KDLoss(kd.temperature, kd.alpha, kd.kd_loss), splits, config, device=device,
                              dtype=dtype, out_path=config.student_path,
                              run_info={"seed": config.run.seed, "mode": config.MODE},
                              extra={"teacher": adapter, "transfer": transfer}, train=train, trial=trial)
    if record is not None:  # rank 0: the comparison joins the run's record
        comparison = print_distil_report(logits, splits, read_record(record))
        write_jsonl_record(f"{TUNING_DIR}/{run_stem('distil', splits.spec)}.jsonl", record | {"comparison": comparison},
                           key="run_id")


def with_transfer_set(splits, config, variant, tokenizer, device, dtype):
    """The training split with the transfer set's sentences after it (label UNLABELLED, the teacher's logits), and
    what the report says of the set; the training split as it is, and None, without one."""
    if not config.transfer.wanted:
        return splits["train"], None
    texts = {name: [tokenizer.decode(t) for t in split.tokens] for name, split in splits.items()}
    sentences, about = transfer_sentences(config.transfer, config.run.seed, texts.pop("train"), texts, variant,
                                          tokenizer, device, dtype)
    tokens = encode(tokenizer, sentences)
    if not tokens:
        print(f"note: the transfer set is empty ({about['source']}): training on the training set alone")
        return splits["train"], about
    logits, about["teacher_cache_hit"] = transfer_teacher_logits(tokens, config.model_path, variant, splits.spec,
                                                                 batch_size=config.train.batch_size, device=device,
                                                                 dtype=dtype)
    about["teacher_labels"] = torch.bincount(logits.argmax(-1), minlength=len(splits.labels)).tolist()
    train = splits["train"]
    return Split(train.tokens + tokens, torch.cat([train.labels, torch.full((len(tokens),), UNLABELLED)]),
                 torch.cat([train.teacher, logits])), about


def cmd_predict(config, device, dtype):
    sentences, labels = read_sentences(config.sentence, config.input, config.data)
    model = load_predictor(config.model_path, config.model.gpt_variant)
    block_size = model.config.block_size if isinstance(model, GPTClassifier) else None
    if config.model.quantize == "int8":
        quantize_int8(model)
    elif block_size:
        cast_frozen_linears(model, dtype)
    # An empty line becomes <|endoftext|> alone; GPT-2 keeps the last block_size tokens, whose final one it reads.
    tokens = [(t or [EOT])[-block_size:] if block_size else (t or [EOT]) for t in encode(get_tokenizer(), sentences)]
    logits = predict_logits(compiled(model.to(device), config.run.compile), tokens, batch_size=config.batch_size,
                            device=device, dtype=dtype)
    print_predictions(sentences, torch.softmax(logits, -1), model.labels, labels, config.format)


def cmd_export(config, device, dtype):
    variant = config.model.gpt_variant
    base = adapter_base(config.model_path, variant)[2]
    if os.path.isdir(base) and Path(base).resolve() == Path(config.out).resolve():
        raise UserError(f"--out {config.out}: is the adapter's base model, which the export would replace; "
                        "choose another folder")
    lm = adapter_task(config.model_path) == LM_TASK
    model = (load_lora_lm if lm else load_lora_classifier)(config.model_path, variant)
    save_checkpoint(config.out, "model.safetensors", model.hf_state_dict(), {"config.json": model.hf_config()},
                    exported_card(config.model_path, config.out, reproducing_command(config)))
    kind, cls = ("language model", "GPT2LMHeadModel") if lm else ("classifier", "GPT2ForSequenceClassification")
    print(f"merged {kind} written to {config.out}: {cls}.from_pretrained({config.out!r})")


def cmd_info(config, device, dtype):
    with torch.device("meta"):  # LoRA on gpt2's shapes, to size its default micro-batch: no weights, no download
        model = mark_only_lora_as_trainable(inject_lora(GPTClassifier.from_random("gpt2"), 4, 4))
    kept = activation_bytes_per_token(model)
    model.grad_checkpoint = True
    print(system_report(device, kept, activation_bytes_per_token(model)))


REPORT_FILES = ("report.md", "report.html")


def cmd_report(config, device, dtype):
    """Both files are written together, replacing only themselves in --out."""
    document = report_document(config.runs, config.select, config.run_id)
    with atomic_files(config.out, REPORT_FILES) as tmp:
        Path(tmp["report.md"]).write_text(to_markdown(document, config.out), encoding="utf-8")
        Path(tmp["report.html"]).write_text(to_html(document), encoding="utf-8")
    print(f"report written to {' and '.join(str(Path(config.out) / name) for name in REPORT_FILES)}")


COMMANDS = {"gen": cmd_gen, "LoRA": cmd_lora, "rnn": cmd_rnn, "distil": cmd_distil, "predict": cmd_predict,
            "export": cmd_export, "info": cmd_info, "report": cmd_report}
