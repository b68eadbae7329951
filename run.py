"""Command line: `python run.py {gen,LoRA,rnn,distil,predict,export,tune} ...`. Parse, validate, build, call,
report."""
import argparse
import codecs
import itertools
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from model import (GPT, LORA_TARGETS, DistilRNN, GPTClassifier, RNNConfig, Sampler, cast_frozen_linears,
                   count_parameters, decode_dtype, inject_lora, load_config, looks_like_path,
                   mark_only_lora_as_trainable, merge_lora, quantize_int8)
from train_utils import (KDLoss, Split, cross_entropy, default_micro_batch_tokens, evaluate, fit, format_table,
                         majority_label, mcnemar_exact, plot_grid, plot_history, plot_summary, predict_logits,
                         score_cells, scores)
from utils import (ADAPTER_CONFIG, EOT, LABELS, RUN_INFO, STUDENT_CONFIG, STUDENT_WEIGHTS, Terminated, UserError,
                   append_jsonl, atomic_path, compute_dtype, default_cola_dir, encode, everyone, file_sha256,
                   get_tokenizer, init_distributed, interrupt_exit_code, is_main, load_adapter_weights, load_cola,
                   main_first, on_main, read_adapter_config, read_cola_tsv, read_json, read_jsonl, read_tensors,
                   resolve_device, save_adapter, save_checkpoint, seed_everything, sigterm_as_interrupt, write_text)

TUNING_DIR, PLOTS_DIR = "tuning", "plots"


# ----------------------------------------------------------------------------- building models

def variant_slug(variant):
    return Path(variant.rstrip("/")).name


def build_classifier(variant, random_init, seed):
    """GPT-2 + score head: pretrained weights, or (random_init) weights drawn from `seed`, so a later run can
    rebuild the very same base from the seed alone."""
    seed_everything(seed)
    if random_init:
        print(f"note: {variant} architecture with random weights (--random_init), nothing downloaded",
              file=sys.stderr)
        return GPTClassifier.from_random(variant)
    with main_first():  # one download, not one per rank
        return GPTClassifier.from_pretrained(variant)


def adapter_base(folder, variant=None):
    """(LoRA settings, run info, GPT-2 base) of an adapter folder; `variant`, when given, must be its base."""
    cfg = read_adapter_config(folder)
    info = read_json(Path(folder) / RUN_INFO, "run info") if (Path(folder) / RUN_INFO).exists() else {}
    base = cfg["base_model"]
    if variant is not None and base is not None and variant_slug(variant) != variant_slug(base):
        raise UserError(f"{folder}: this adapter was trained on {base}, not on --gpt_variant {variant}")
    if (variant or base) is None:
        raise UserError(f"{folder}: the adapter names no base model; pass --gpt_variant")
    return cfg, info, variant or base


def load_lora_classifier(folder, variant=None):
    """The fine-tuned classifier saved by `run.py LoRA` (or PEFT) in `folder`, LoRA merged, in eval mode."""
    cfg, info, variant = adapter_base(folder, variant)
    model = build_classifier(variant, info.get("random_init", False), info.get("seed", 0))
    inject_lora(model, cfg["r"], cfg["alpha"], 0.0, cfg["targets"])
    load_adapter_weights(model, folder)
    merge_lora(model)
    return model.eval().requires_grad_(False)


def print_parameter_table(model):
    total, trainable = count_parameters(model)
    print(f"Number of parameters: {total / 1e6:.2f}M")
    print(f"Number of trainable parameters: {trainable / 1e6:.2f}M")
    print(f"Reduction: {100 * (1 - trainable / total):.2f}%")
    return total, trainable


# ----------------------------------------------------------------------------- data

def load_splits(args, tokenizer, block_size=None):
    """Tokenized CoLA splits; --max_examples takes a seeded random subset of the training set."""
    splits = {}
    with main_first():  # one download, not one per rank
        cola = load_cola(args.data_dir)
    for name, (sentences, labels) in cola.items():
        tokens = encode(tokenizer, sentences)
        if block_size:  # never for CoLA (at most 45 tokens); past the context keep the end, whose last token is read
            tokens = [t[-block_size:] for t in tokens]
        splits[name] = Split(tokens, torch.tensor(labels))
    if args.max_examples:
        keep = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(args.seed))
        keep = keep[:args.max_examples].tolist()
        train = splits["train"]
        splits["train"] = Split([train.tokens[i] for i in keep], train.labels[keep])
    return splits


def data_fingerprint(splits):
    """A short hash of the exact training and evaluation data (tokens and labels)."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(repr((splits[name].tokens, splits[name].labels.tolist())).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- one training run

def resume_state_path(out_path):
    return Path(f"{str(out_path).rstrip('/')}.resume.pt")


def run_config(args):
    """The flags a resumed run must share with the run it continues."""
    return {k: v for k, v in vars(args).items() if k not in ("resume", "debug", "func", "epochs", "device", "rest")}


def train_and_report(mode, model, loss_fn, splits, args, device, dtype, out_path, save, extra=None):
    """Train with the shared loop, evaluate the best epoch on dev and out-of-domain dev, print the summary,
    draw the plots, append the run to tuning/<mode>.jsonl and `save()` the model to `out_path`; the state
    kept for --resume is removed once all of that is written. Returns the run's record."""
    start = time.time()
    state_path = resume_state_path(out_path)
    history, best_epoch, best_dev = fit(
        model, loss_fn, splits, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=device, dtype=dtype,
        seed=args.seed, clip=getattr(args, "clip", None),
        micro_batch_tokens=args.micro_batch_tokens or default_micro_batch_tokens(device),
        state_path=state_path, resume=args.resume, config=run_config(args))
    final = {"dev": best_dev,  # the best epoch's weights are restored: their dev evaluation is already done
             "ood": evaluate(model, splits["ood"], loss_fn, batch_size=args.batch_size, device=device, dtype=dtype)}
    stats = {name: scores(final[name]["preds"], splits[name].labels) for name in ("dev", "ood")}
    majority = majority_label(splits["train"].labels)
    baseline = {name: scores([majority] * len(splits[name]), splits[name].labels) for name in ("dev", "ood")}
    total, trainable = count_parameters(model)
    print(f"\n{mode}: best epoch {best_epoch} of {args.epochs} (95% intervals: Wilson for accuracy, bootstrap for MCC)")
    print(format_table(["", "in-domain dev acc", "MCC", "out-of-domain acc", "MCC"],
                       [[mode, *score_cells(stats["dev"]), *score_cells(stats["ood"])],
                        ["majority baseline", *score_cells(baseline["dev"]), *score_cells(baseline["ood"])]]))

    def write_results():  # under torchrun rank 0 alone draws, logs and saves
        plots = plot_history(history, mode, baseline["dev"]["acc"], stats["dev"]["acc_ci"], PLOTS_DIR)
        record = {"mode": mode, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(args) | {"func": None},
                  "device": str(device), "dtype": str(dtype).removeprefix("torch."), "data": data_fingerprint(splits),
                  "parameters": total, "trainable_parameters": trainable, "history": history,
                  "best_epoch": best_epoch, "majority_label": majority, "baseline_dev_acc": baseline["dev"]["acc"],
                  "baseline_ood_acc": baseline["ood"]["acc"],
                  **{f"{name}_{k}": v for name in ("dev", "ood") for k, v in stats[name].items()},
                  "dev_sentences_per_s": final["dev"]["sentences_per_s"],
                  "dev_preds": final["dev"]["preds"], "ood_preds": final["ood"]["preds"],
                  "wall_seconds": time.time() - start, "plots": plots, **(extra or {})}
        append_jsonl(f"{TUNING_DIR}/{mode}.jsonl", record)
        print(f"plots: {', '.join(plots)}; run logged to {TUNING_DIR}/{mode}.jsonl")
        save()
        state_path.unlink(missing_ok=True)
        return record

    return on_main(write_results)


# ----------------------------------------------------------------------------- subcommands

def cmd_gen(args):
    """All samples decode in one batch. Sample 1 streams as it is generated; the others, which advance at the
    same pace, are printed when every sample has finished."""
    device = resolve_device(args.device)
    # auto: whichever of fp32 and bf16 decodes faster here, measured; an explicit --dtype is taken as given
    dtype = decode_dtype(device.type) if args.dtype == "auto" else compute_dtype(args.dtype, device)
    tokenizer = get_tokenizer()
    prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
    if args.random_init:
        print(f"note: {args.gpt_variant} architecture with random weights (--random_init), nothing downloaded",
              file=sys.stderr)
    model = GPT.from_random(args.gpt_variant) if args.random_init else GPT.from_pretrained(args.gpt_variant)
    model.for_generation(device, dtype)
    if args.quantize == "int8":
        quantize_int8(model)
    prompt_ids = tokenizer.encode(prompt, allowed_special={"<|endoftext|>"}) or [tokenizer.eot_token]
    temperature = 0.0 if args.greedy else args.temperature
    eos = None if args.ignore_eos else tokenizer.eot_token
    samplers = [Sampler(temperature, args.top_k, args.top_p, args.repetition_penalty, seed=args.seed + i)
                for i in range(args.num_samples)]
    steps = model.generate_batch(prompt_ids, args.max_new_tokens, samplers, eos_id=eos)
    samples = [[] for _ in samplers]

    def record(step):
        for sample, tok in zip(samples, step):
            if tok is not None:
                sample.append(tok)

    def first_sample():
        for step in steps:
            record(step)
            if step[0] is not None:
                yield step[0]

    if args.num_samples > 1:
        print("\n===== sample 1 =====")
    print_stream(tokenizer, prompt, first_sample(), eos_id=eos, stream=not args.no_stream)
    for step in steps:  # sample 1 may end before the others
        record(step)
    for i, sample in enumerate(samples[1:], start=2):
        print(f"\n===== sample {i} =====")
        print_stream(tokenizer, prompt, iter(sample), eos_id=eos, stream=False)


def print_stream(tokenizer, prompt, token_ids, eos_id, stream):
    """Print the prompt, then each token as it arrives (bytes decoded incrementally: a character may span tokens),
    up to `eos_id` (None: print <|endoftext|> like any other token)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [prompt]
    if stream:
        print(prompt, end="", flush=True)
    for tok in token_ids:
        if tok == eos_id:
            break
        text = decoder.decode(tokenizer.decode_single_token_bytes(tok))
        pieces.append(text)
        if stream:
            print(text, end="", flush=True)
    pieces.append(decoder.decode(b"", final=True))
    print(pieces[-1] if stream else "".join(pieces), flush=True)


def cmd_lora(args):
    device = resolve_device(args.device)
    dtype = compute_dtype(args.dtype, device)
    if args.epochs == 0:  # only the parameter table: build on the meta device, no weights, no download
        with torch.device("meta"):
            model = GPTClassifier.from_random(args.gpt_variant)
        print_parameter_table(mark_only_lora_as_trainable(inject_lora(model, args.LoRA_rank, args.lora_alpha,
                                                                      args.lora_dropout, args.lora_targets)))
        return
    tokenizer = get_tokenizer()
    model = build_classifier(args.gpt_variant, args.random_init, args.seed)
    inject_lora(model, args.LoRA_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    mark_only_lora_as_trainable(model)
    print_parameter_table(model)
    splits = load_splits(args, tokenizer, model.config.block_size)
    cast_frozen_linears(model, dtype).to(device)

    def save():
        save_adapter(model, args.model_path, rank=args.LoRA_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                     targets=args.lora_targets, base_model=args.gpt_variant,
                     run_info={"random_init": args.random_init, "seed": args.seed, "gpt_variant": args.gpt_variant})
        print(f"adapter saved to {args.model_path} (PEFT format)")

    train_and_report("LoRA", model, cross_entropy, splits, args, device, dtype, args.model_path, save)


def build_student(args):
    seed_everything(args.seed)
    return DistilRNN(RNNConfig(hidden=args.rnn_hidden, layers=args.rnn_layers, cell=args.rnn_cell))


def save_student(model, folder, args):
    save_checkpoint(folder, STUDENT_WEIGHTS, model.state_dict(),
                    {STUDENT_CONFIG: {"model_type": "DistilRNN", **asdict(model.config)},
                     RUN_INFO: {"seed": args.seed, "mode": args.mode}})
    print(f"student saved to {folder}")


def load_student(folder):
    """A DistilRNN checkpoint written by `run.py rnn` or `run.py distil`, in eval mode."""
    from model import RNNConfig as Cfg
    cfg = read_json(Path(folder) / STUDENT_CONFIG, "student config")
    if cfg.get("model_type") != "DistilRNN":
        raise UserError(f"{folder}: not a DistilRNN checkpoint")
    model = DistilRNN(Cfg.from_dict(cfg))
    state = read_tensors(Path(folder) / STUDENT_WEIGHTS)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{folder}: weights do not fit its config ({str(e).splitlines()[0]})") from None
    return model.eval()


def cmd_rnn(args):
    device = resolve_device(args.device)
    dtype = compute_dtype(args.dtype, device)
    model = build_student(args).to(device)
    print_parameter_table(model)
    if args.epochs == 0:
        return
    splits = load_splits(args, get_tokenizer())
    train_and_report("rnn", model, cross_entropy, splits, args, device, dtype, args.model_path,
                     save=lambda: save_student(model, args.model_path, args))


def teacher_logits(splits, args, variant, device, dtype):
    """The teacher's logits on every split, its size and speed, computed once and cached on disk under a key made
    of the adapter's content, the base model and the data: a second run with the same teacher loads them and
    neither builds nor runs the teacher."""
    folder = Path(args.model_path)
    key = file_sha256(*(p for p in sorted(folder.iterdir()) if p.is_file()))[:16]
    name = f"teacher-{key}-{variant_slug(variant)}-{str(dtype).removeprefix('torch.')}-{data_fingerprint(splits)}"
    cache = Path("models/cache") / f"{name}.safetensors"
    if everyone(cache.exists()):  # every rank must have it (machines need not share a disk)
        print(f"teacher logits from cache {cache}")
        return read_tensors(cache)
    teacher = cast_frozen_linears(load_lora_classifier(folder, variant), dtype).to(device)
    logits = {"parameters": torch.tensor(count_parameters(teacher)[0])}
    for name, split in splits.items():
        start = time.perf_counter()
        logits[name] = predict_logits(teacher, split.tokens, batch_size=args.batch_size, device=device, dtype=dtype)
        logits[f"{name}_seconds"] = torch.tensor(time.perf_counter() - start)
    def write_cache():
        from safetensors.torch import save_file
        with atomic_path(cache) as tmp:
            save_file({k: v.contiguous() for k, v in logits.items()}, tmp)

    on_main(write_cache)
    return logits


def cmd_distil(args):
    device = resolve_device(args.device)
    dtype = compute_dtype(args.dtype, device)
    if not (Path(args.model_path) / ADAPTER_CONFIG).exists():
        raise UserError(f"no LoRA adapter at {args.model_path}: train the teacher first with "
                        f"`python run.py LoRA --gpt_variant {args.gpt_variant or 'gpt2'}`, or pass --model_path")
    _, _, variant = adapter_base(args.model_path, args.gpt_variant)
    student = build_student(args).to(device)
    print_parameter_table(student)
    if args.epochs == 0:
        return
    splits = load_splits(args, get_tokenizer(), load_config(variant).block_size)
    logits = teacher_logits(splits, args, variant, device, dtype)
    for name, split in splits.items():
        split.teacher = logits[name]
    record = train_and_report("distil", student, KDLoss(args.temperature, args.alpha), splits, args, device, dtype,
                              args.student_path, save=lambda: save_student(student, args.student_path, args),
                              extra={"teacher": args.model_path})
    if record is None:  # not rank 0
        return
    print_distil_report(logits, splits, record)


def print_distil_report(logits, splits, kd_run):
    """Teacher vs student with KD vs student without KD (latest matching `rnn` run) vs majority baseline, every
    number computed from saved predictions, with intervals; McNemar's test pairs the two students (or, without a
    no-KD run, the KD student and the baseline). Also draws plots/summary.png."""
    labels = {name: splits[name].labels for name in ("dev", "ood")}
    majority = majority_label(splits["train"].labels)
    entries = [
        {"name": "teacher (GPT-2 + LoRA)", "params": int(logits["parameters"]),
         "dev": logits["dev"].argmax(-1).tolist(), "ood": logits["ood"].argmax(-1).tolist(),
         "speed": len(splits["dev"]) / float(logits["dev_seconds"])},
        {"name": "student with KD", "params": kd_run["parameters"], "dev": kd_run["dev_preds"],
         "ood": kd_run["ood_preds"], "speed": kd_run["dev_sentences_per_s"]}]
    nokd = latest_matching_rnn_run(kd_run)
    if nokd:
        entries.append({"name": "student without KD", "params": nokd["parameters"], "dev": nokd["dev_preds"],
                        "ood": nokd["ood_preds"], "speed": nokd["dev_sentences_per_s"]})
    entries.append({"name": "majority baseline", "params": 0, "dev": [majority] * len(labels["dev"]),
                    "ood": [majority] * len(labels["ood"]), "speed": 0})
    rows = []
    for e in entries:
        e["scores"] = scores(e["dev"], labels["dev"])
        ood = scores(e["ood"], labels["ood"])
        rows.append([e["name"], f"{e['params'] / 1e6:.2f}M" if e["params"] else "-", *score_cells(e["scores"]),
                     score_cells(ood)[0], f"{e['speed']:,.0f}" if e["speed"] else "-"])
    print("\nDistillation report (95% intervals: Wilson for accuracy, bootstrap for MCC)")
    print(format_table(["model", "params", "dev acc", "dev MCC", "ood acc", "sentences/s"], rows))
    other = entries[2]
    correct = {e["name"]: torch.tensor(e["dev"]) == labels["dev"] for e in (entries[1], other)}
    only_kd, only_other, p = mcnemar_exact(correct["student with KD"], correct[other["name"]])
    print(f"McNemar's exact test, student with KD vs {other['name']} on the {len(labels['dev'])} dev sentences: "
          f"{only_kd} right only with KD, {only_other} right only without; p = {p:.3g}")
    if not nokd:
        print("(no `run.py rnn` run on the same data and student shape in tuning/rnn.jsonl: "
              "run it for the without-KD row)")
    print(f"comparison chart: {plot_summary(entries, PLOTS_DIR)}")


def latest_matching_rnn_run(run):
    """The latest `run.py rnn` run on the same data, student shape and seed as `run` (a distil run), if any."""
    same = ("rnn_hidden", "rnn_layers", "rnn_cell", "max_examples", "seed")
    matches = [r for r in read_jsonl(f"{TUNING_DIR}/rnn.jsonl") if r["data"] == run["data"]
               and all(r["args"].get(k) == run["args"].get(k) for k in same)]
    return matches[-1] if matches else None


def load_predictor(folder, variant):
    """A trained classifier from its folder, recognised by its files: (model, block size or None for the RNN)."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).exists():
        model = load_lora_classifier(folder, variant)
        return model, model.config.block_size
    if (folder / STUDENT_CONFIG).exists():
        return load_student(folder), None
    raise UserError(f"{folder}: neither a LoRA adapter folder ({ADAPTER_CONFIG}) nor a student checkpoint "
                    f"({STUDENT_CONFIG}); train one with `python run.py LoRA` or `python run.py rnn`")


def read_sentences(args):
    """(sentences, labels or None) from --sentence, --input (plain lines or a CoLA TSV) or standard input."""
    if args.sentence:
        return args.sentence, None
    if args.input:
        path = Path(args.input)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--input {path}: cannot read it ({e})") from None
        first = next((line for line in text.splitlines() if line.strip()), "")
        if first.count("\t") == 3:  # a CoLA-format TSV: source, label, original mark, sentence
            return read_cola_tsv(path)
    else:
        text = sys.stdin.read()
    return text.splitlines(), None


def cmd_predict(args):
    device = resolve_device(args.device)
    dtype = compute_dtype(args.dtype, device)
    sentences, labels = read_sentences(args)
    model, block_size = load_predictor(args.model_path, args.gpt_variant)
    if args.quantize == "int8" and not block_size:
        raise UserError(f"--quantize int8 is for GPT-2 classifiers; {args.model_path} holds an RNN student")
    if args.quantize == "int8":
        quantize_int8(model)
    elif block_size:
        cast_frozen_linears(model, dtype)
    # An empty line becomes <|endoftext|> alone; GPT-2 keeps the last block_size tokens, whose final one it reads.
    tokens = [(t or [EOT])[-block_size:] if block_size else (t or [EOT]) for t in encode(get_tokenizer(), sentences)]
    logits = predict_logits(model.to(device), tokens, batch_size=args.batch_size, device=device, dtype=dtype)
    p_acceptable = torch.softmax(logits, -1)[:, 1].tolist()
    rows = [{"sentence": s, "label": LABELS[p >= 0.5], "p_acceptable": round(p, 6)}
            for s, p in zip(sentences, p_acceptable)]
    if args.format == "jsonl":
        print("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    elif args.format == "tsv":
        print("\n".join(f"{r['label']}\t{r['p_acceptable']:.4f}\t{r['sentence']}" for r in rows))
    else:
        print(format_table(["label", "p_acceptable", "sentence"],
                           [[r["label"], f"{r['p_acceptable']:.4f}", r["sentence"]] for r in rows]))
    if labels is not None:
        s = scores([int(p >= 0.5) for p in p_acceptable], labels)
        majority = max(labels.count(0), labels.count(1)) / len(labels)
        (acc_low, acc_high), (mcc_low, mcc_high) = s["acc_ci"], s["mcc_ci"]
        print(f"accuracy {s['acc']:.2%}  MCC {s['mcc']:+.3f}  on {len(labels)} labelled sentences; 95% intervals: "
              f"accuracy {acc_low:.1%}-{acc_high:.1%}, MCC {mcc_low:+.2f} to {mcc_high:+.2f}; "
              f"this file's majority class scores {majority:.2%} (MCC 0)",
              file=sys.stdout if args.format == "table" else sys.stderr)


def cmd_export(args):
    model = load_lora_classifier(args.model_path, args.gpt_variant)
    save_checkpoint(args.out, "model.safetensors", model.hf_state_dict(), {"config.json": model.hf_config()})
    print(f"merged classifier written to {args.out}: GPT2ForSequenceClassification.from_pretrained({args.out!r})")


TUNABLE = ("LoRA", "rnn", "distil")


def file_safe(text):
    """`text` with every character other than letters, digits, '.', '_' and '-' made '_'."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def tune_plan(parser, args):
    """Every (configuration, seed) run of a sweep, its arguments fully parsed and validated before any runs.

    Each run is the mode's own command line plus --seed and the grid's flags, so a sweep run is exactly the plain
    subcommand's run, and a logged run with the same flags counts as done."""
    grid = {}
    for item in args.grid:
        flag, _, values = item.partition("=")
        if not flag or not values:
            parser.error(f"--grid {item}: expected flag=value[,value...], e.g. temperature=1,2,4")
        grid[flag.lstrip("-")] = values.split(",")
    name = args.name or "_".join([args.target] + [f"{k}-{'-'.join(v)}" for k, v in grid.items()])
    name = file_safe(name)
    out_flag = "--student_path" if args.target == "distil" else "--model_path"
    plan = []
    for values in itertools.product(*grid.values()):
        config = dict(zip(grid, values))
        for seed in args.seeds:
            folder = f"models/tune/{name}/{file_safe(config_label(config))}_seed{seed}"
            out = [] if out_flag in args.rest else [out_flag, folder]
            argv = [args.target, *args.rest, *out, "--seed", str(seed)]
            argv += [a for k, v in config.items() for a in (f"--{k}", v)]
            run_args = finish_args(parser, parser.parse_args(argv))
            run_args.rest = []
            plan.append({"config": config, "seed": seed, "argv": argv, "args": run_args})
    return name, grid, plan


def logged_run(run, records):
    """The logged record of a planned run (same flags, same number of epochs), if any."""
    flags = json.loads(json.dumps(run_config(run["args"]) | {"epochs": run["args"].epochs}))
    matches = [r for r in records if all(r["args"].get(k) == v for k, v in flags.items())]
    return matches[-1] if matches else None


def cmd_tune(args):
    """Run a sweep (configurations x seeds), skipping runs already logged, then summarize it."""
    log = f"{TUNING_DIR}/{args.target}.jsonl"
    pending = []
    for i, run in enumerate(args.plan, start=1):
        label = f"{config_label(run['config'])} seed={run['seed']}"
        if logged_run(run, read_jsonl(log)):
            print(f"[{i}/{len(args.plan)}] {label}: already in {log}, skipped")
        else:
            pending.append((label, run))
    if args.parallel > 1:
        run_side_by_side(pending, args.parallel, Path(TUNING_DIR) / f"{args.tune_name}-logs")
    for label, run in [] if args.parallel > 1 else pending:
        print(f"\n[{args.plan.index(run) + 1}/{len(args.plan)}] {args.target} {label}")
        run["args"].func(run["args"])
    summarize_tune(args.tune_name, args.target, args.grid_values, args.plan)


def run_side_by_side(pending, slots, log_dir):
    """Run the pending sweep runs as separate processes, `slots` at a time, each slot on its own GPU when there
    are GPUs; each run's output goes to log_dir/<n>.log. Ctrl-C or SIGTERM is passed on to the running ones, which
    stop as a plain run does (resume state kept), and no further run starts."""
    import signal
    import subprocess
    import threading
    from concurrent.futures import ThreadPoolExecutor
    log_dir.mkdir(parents=True, exist_ok=True)
    running, lock, stopping = {}, threading.Lock(), threading.Event()

    def worker(slot):
        env = os.environ | ({"CUDA_VISIBLE_DEVICES": str(slot)} if torch.cuda.is_available() else {})
        for n, (label, run) in list(enumerate(pending))[slot::slots]:
            with open(log_dir / f"{n}.log", "w") as log:
                with lock:
                    if stopping.is_set():
                        return
                    running[n] = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *run["argv"]],
                                                  env=env, stdout=log, stderr=subprocess.STDOUT)
                code = running[n].wait()
            print(f"{label}: {'done' if code == 0 else f'FAILED (exit {code}), see {log_dir}/{n}.log'}", flush=True)

    with ThreadPoolExecutor(slots) as pool:
        try:
            list(pool.map(worker, range(slots)))
        except KeyboardInterrupt as e:
            with lock:
                stopping.set()
                for proc in running.values():
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
            raise


def config_label(config):
    return ", ".join(f"{k}={v}" for k, v in config.items())


def summarize_tune(name, target, grid, plan):
    """tuning/<name>.md and plots/tune_<name>.png: mean ± std over seeds per configuration, the best one, and
    McNemar's test of the best against the baseline (the no-KD student for distil, else the majority class)."""
    records = read_jsonl(f"{TUNING_DIR}/{target}.jsonl")
    configs = []
    for config in [dict(zip(grid, v)) for v in itertools.product(*grid.values())]:
        runs = [logged_run(run, records) for run in plan if run["config"] == config]
        runs = [r for r in runs if r is not None]
        if not runs:
            raise UserError(f"sweep {name}: no finished run of {config_label(config)}; see the messages above")
        stats = {m: (statistics.mean(r[m] for r in runs),
                     statistics.stdev(r[m] for r in runs) if len(runs) > 1 else 0.0)
                 for m in ("dev_acc", "dev_mcc", "ood_acc")}
        configs.append({"config": config, "runs": runs, **stats})
    best = max(configs, key=lambda c: c["dev_acc"][0])
    seeds = sorted({run["seed"] for run in plan})
    labels = torch.tensor(load_cola(plan[0]["args"].data_dir)["dev"][1])
    lines = [f"# Sweep `{name}` ({target})", "",
             f"Mean ± standard deviation over seeds {seeds}. Majority baseline: "
             f"{best['runs'][0]['baseline_dev_acc']:.2%} dev accuracy, MCC 0; one dev-accuracy point is about "
             f"{len(labels) / 100:.0f} sentences.", "",
             "| configuration | seeds | dev accuracy | dev MCC | out-of-domain accuracy |", "|---|---|---|---|---|"]
    for c in configs:
        (acc, acc_sd), (mcc, mcc_sd), (ood, ood_sd) = c["dev_acc"], c["dev_mcc"], c["ood_acc"]
        lines.append(f"| {config_label(c['config'])} | {len(c['runs'])} | {acc:.2%} ± {acc_sd:.2%} | "
                     f"{mcc:+.3f} ± {mcc_sd:.3f} | {ood:.2%} ± {ood_sd:.2%} |")
    lines += ["", f"Best by mean dev accuracy: **{config_label(best['config'])}**.", "",
              "McNemar's exact test of the best configuration against the baseline, per seed (sentences right only "
              "with the best / only with the baseline; a small p says the difference is unlikely to be chance):", ""]
    for r in best["runs"]:
        nokd = latest_matching_rnn_run(r) if target == "distil" else None
        baseline = nokd["dev_preds"] if nokd else [r["majority_label"]] * len(r["dev_preds"])
        only_best, only_base, p = mcnemar_exact(torch.tensor(r["dev_preds"]) == labels,
                                                torch.tensor(baseline) == labels)
        lines.append(f"- seed {r['args']['seed']}: vs {'the no-KD student' if nokd else 'the majority class'}: "
                     f"{only_best} / {only_base}, p = {p:.3g}")
    text = "\n".join(lines) + "\n"
    write_text(f"{TUNING_DIR}/{name}.md", text)
    plot = plot_grid([config_label(c["config"]) for c in configs], configs, best["runs"][0]["baseline_dev_acc"],
                     f"{PLOTS_DIR}/tune_{name}.png")
    print("\n" + text + f"\nsummary: {TUNING_DIR}/{name}.md; plot: {plot}")


# ----------------------------------------------------------------------------- arguments

def number_in(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` (int or float) within [low, high], each end optionally open."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high or value != value:  # value != value: NaN
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value
    return parse


positive_int = number_in(int, 1)
non_negative_int = number_in(int, 0)
positive_float = number_in(float, 0, low_open=True)
non_negative_float = number_in(float, 0)
fraction = number_in(float, 0, 1)
seed_int = number_in(int, 0, 2 ** 32 - 1)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default, so nobody has to open the code to learn it; an option without a fixed
    default (None) says in its help what it falls back to."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), pointing at --help instead of the usage."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs | {"allow_abbrev": False,  # --seed must never be read as --seeds
                                            "formatter_class": DefaultsHelpFormatter})

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser():
    parser = OneLineParser(description="GPT-2 generation, LoRA fine-tuning and distillation on CoLA.")
    sub = parser.add_subparsers(dest="mode", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=seed_int, default=0, help="seeds weights, data order, dropout and sampling")
    common.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    common.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bf16 where the hardware runs it fast (CUDA, CPUs with AMX/AVX512-BF16), else fp32")
    common.add_argument("--debug", action="store_true", help="show full tracebacks")

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
    train.add_argument("--micro_batch_tokens", type=positive_int, help="split each batch into pieces of at most "
                       "this many padded tokens and accumulate gradients: bounds memory, same result (default: 512 "
                       "on CPU, as fast as larger pieces there; 16384 on CUDA)")

    student = argparse.ArgumentParser(add_help=False)
    student.add_argument("--rnn_hidden", type=positive_int, default=768, help="student embedding and hidden size")
    student.add_argument("--rnn_layers", type=positive_int, default=2, help="stacked recurrent layers")
    student.add_argument("--rnn_cell", default="rnn", choices=["rnn", "gru", "lstm"], help="recurrent cell")
    student.add_argument("--clip", type=non_negative_float, default=1.0,
                         help="gradient-norm clipping, 0 for none (ReLU RNNs explode without it)")
    student.add_argument("--epochs", type=non_negative_int, default=5, help="0 prints the parameter table only")

    g = sub.add_parser("gen", parents=[common, gpt], help="generate text")
    prompt = g.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue")
    prompt.add_argument("--prompt_file", help="read the prompt from this file")
    g.add_argument("--max_new_tokens", type=positive_int, default=100, help="tokens to generate per sample")
    g.add_argument("--temperature", type=non_negative_float, default=1.0, help="0 means greedy")
    g.add_argument("--top_k", type=positive_int, default=50, help="sample among the k most likely tokens")
    g.add_argument("--top_p", type=number_in(float, 0, 1, low_open=True), default=None,
                   help="nucleus sampling: keep the most likely tokens up to this probability mass")
    g.add_argument("--repetition_penalty", type=positive_float, default=1.0, help="CTRL's penalty; 1 is none")
    g.add_argument("--greedy", action="store_true", help="always the most likely token")
    g.add_argument("--ignore_eos", action="store_true", help="keep going past <|endoftext|>")
    g.add_argument("--num_samples", type=positive_int, default=1, help="samples to draw, in one batch (seeds --seed, --seed+1, ...); sample 1 streams, the rest print at the end")
    g.add_argument("--no_stream", action="store_true", help="print each sample when it is complete")
    g.add_argument("--quantize", choices=["int8"], help="int8 weights (one scale per output channel) for the "
                   "blocks and the head: a quarter of fp32's bytes to read per token, logits within about 1%%")
    g.set_defaults(func=cmd_gen)

    lora = sub.add_parser("LoRA", parents=[common, gpt, train], help="LoRA fine-tuning of GPT-2 on CoLA")
    lora.add_argument("--LoRA_rank", "--lora_rank", type=positive_int, default=4, help="rank r of the update B A")
    lora.add_argument("--lora_alpha", type=positive_float, help="scale numerator (default: the rank, i.e. scale 1)")
    lora.add_argument("--lora_dropout", type=number_in(float, 0, 1, high_open=True), default=0.0,
                      help="dropout on the LoRA branch's input")
    lora.add_argument("--lora_targets", nargs="+", choices=LORA_TARGETS, default=list(LORA_TARGETS),
                      help="the linear layers of each block that get LoRA")
    lora.add_argument("--epochs", type=non_negative_int, default=10, help="0 prints the parameter table only")
    lora.add_argument("--model_path", help="adapter folder to write (default models/LoRA-<variant>)")
    lora.set_defaults(func=cmd_lora)

    rnn = sub.add_parser("rnn", parents=[common, train, student], help="train the DistilRNN student on labels")
    rnn.add_argument("--model_path", default="models/rnn", help="student checkpoint folder to write")
    rnn.set_defaults(func=cmd_rnn)

    distil = sub.add_parser("distil", parents=[common, train, student],
                            help="distil the LoRA-tuned GPT-2 into the DistilRNN student")
    distil.add_argument("--gpt_variant", help="the teacher's base (default: the one the adapter names)")
    distil.add_argument("--model_path", help="the teacher's adapter folder (default models/LoRA-<variant>)")
    distil.add_argument("--student_path", default="models/distil-rnn", help="student checkpoint folder to write")
    distil.add_argument("--temperature", type=positive_float, default=2.0, help="softmax temperature T of the KD loss")
    distil.add_argument("--alpha", type=fraction, default=0.5, help="weight of the soft (KL) part; 1-alpha on labels")
    distil.set_defaults(func=cmd_distil)

    predict = sub.add_parser("predict", parents=[common], help="classify sentences with a trained model")
    predict.add_argument("--model_path", required=True, help="a LoRA adapter folder or a student checkpoint")
    predict.add_argument("--gpt_variant", help="GPT-2 base for an adapter (default: the one it names)")
    source = predict.add_mutually_exclusive_group()
    source.add_argument("--sentence", action="append", help="a sentence to classify (repeatable)")
    source.add_argument("--input", help="one sentence per line, or a CoLA-format TSV (then accuracy and MCC too)")
    predict.add_argument("--format", default="table", choices=["table", "jsonl", "tsv"], help="output format")
    predict.add_argument("--batch_size", type=positive_int, default=128, help="sentences per forward pass")
    predict.add_argument("--quantize", choices=["int8"], help="int8 weights for the blocks and the head "
                         "(GPT-2 classifiers): a quarter of the memory; slower than fp32 for large batches")
    predict.set_defaults(func=cmd_predict)

    export = sub.add_parser("export", parents=[common],
                            help="write a LoRA-tuned classifier as a plain Hugging Face checkpoint, LoRA merged")
    export.add_argument("--model_path", required=True, help="the adapter folder")
    export.add_argument("--gpt_variant", help="GPT-2 base (default: the one the adapter names)")
    export.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")
    export.set_defaults(func=cmd_export)

    tune = sub.add_parser("tune", help="sweep seeds x a grid of flags of LoRA, rnn or distil", description=(
        "Example: python run.py tune distil --seeds 1 2 3 --grid temperature=1,2,4 alpha=0.3,0.5,0.9 --epochs 3. "
        "Any other flag is passed to every run."))
    tune.add_argument("target", choices=TUNABLE, help="the subcommand to sweep")
    tune.add_argument("--seeds", nargs="+", type=seed_int, default=[0, 1, 2], help="each configuration runs once per seed")
    tune.add_argument("--grid", nargs="+", default=[], metavar="FLAG=V1,V2", help="values to sweep, per flag")
    tune.add_argument("--name", help="names tuning/<name>.md and plots/tune_<name>.png (default: from the grid)")
    tune.add_argument("--parallel", type=positive_int, default=1,
                      help="run this many configurations side by side, one process each (one GPU each if present)")
    tune.add_argument("--debug", action="store_true", help="show full tracebacks")
    tune.set_defaults(func=cmd_tune)
    return parser


def writable(path):
    """True if `path` can be created or replaced: its nearest existing ancestor is a writable folder (or it is
    itself an existing writable file)."""
    path = Path(path).absolute()
    first = path
    while not path.exists():
        path = path.parent
    if path.is_dir():
        return os.access(path, os.W_OK)
    return path == first and os.access(path.parent, os.W_OK)


def finish_args(parser, args):
    """Defaults that depend on other flags, and checks argparse cannot express: usage errors, exit 2, before
    anything is downloaded or built."""
    if args.mode == "LoRA":
        args.lora_alpha = args.LoRA_rank if args.lora_alpha is None else args.lora_alpha
        args.model_path = args.model_path or f"models/LoRA-{variant_slug(args.gpt_variant)}"
    if args.mode == "distil" and args.model_path is None:
        args.model_path = f"models/LoRA-{variant_slug(args.gpt_variant or 'gpt2')}"
    variant = getattr(args, "gpt_variant", None)
    if variant and looks_like_path(variant) and not Path(variant).is_dir():
        parser.error(f"--gpt_variant {variant}: no such folder")
    for flag in ("prompt_file", "input"):
        if getattr(args, flag, None) and not Path(getattr(args, flag)).is_file():
            parser.error(f"--{flag} {getattr(args, flag)}: no such file")
    if args.mode in ("predict", "export") and not Path(args.model_path).is_dir():
        parser.error(f"--model_path {args.model_path}: no such folder")
    outputs = {"LoRA": ["model_path"], "rnn": ["model_path"], "distil": ["student_path"], "export": ["out"]}
    for flag in outputs.get(args.mode, []) + (["data_dir"] if hasattr(args, "data_dir") else []):
        if Path(getattr(args, flag)).exists() and not Path(getattr(args, flag)).is_dir():
            parser.error(f"--{flag} {getattr(args, flag)}: exists and is not a folder (nothing was written to it)")
        if not writable(getattr(args, flag)):
            parser.error(f"--{flag} {getattr(args, flag)}: cannot write there (a file is in the way, or no permission)")
    if args.mode in TUNABLE and args.dtype == "float16":
        parser.error("--dtype float16 is for gen and predict; train in bfloat16 or float32 (float16 training "
                     "needs loss scaling, which this loop does not do)")
    if args.mode == "tune":
        args.tune_name, args.grid_values, args.plan = tune_plan(parser, args)
    if args.mode in ("LoRA", "rnn", "distil", "tune"):
        for folder in (TUNING_DIR, PLOTS_DIR):
            if not writable(folder):
                parser.error(f"{folder}/: cannot write run results there (permission denied)")
    return args


def main(argv=None):
    """Run one subcommand; every failure ends in one line on stderr (the traceback only with --debug)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.mode != "tune":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        args = finish_args(parser, args)
        init_distributed()
        if not is_main():  # under torchrun only rank 0 prints
            sys.stdout = open(os.devnull, "w")
        with sigterm_as_interrupt():  # SIGTERM stops a run as Ctrl-C does
            args.func(args)
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
