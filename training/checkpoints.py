"""Models on disk: safetensors checkpoints written as save_pretrained writes them, PEFT's LoRA adapter format in
and out, and the student's checkpoint."""
from dataclasses import asdict
import json
import math
from pathlib import Path
import sys

import torch
import torch.nn as nn

from model import (GPT, LABELS, LORA_TARGETS, DistilRNN, GPTClassifier, RNNConfig, fold_lora, inject_lora, lora_layers,
                   open_checkpoint, variant_slug)
from runtime.distributed import main_first
from utils import UserError, atomic_files, read_json, seed_everything

RUN_INFO = "run_info.json"  # how the run that wrote a checkpoint was configured (ignored by PEFT)
# The model card (reporting.model_card), which the Hub shows; the marker says this project wrote it, and only a card
# carrying it is ever replaced: a README.md the user wrote stays.
CARD_NAME = "README.md"
CARD_MARKER = "<!-- written by run.py (a model card): the next save into this folder replaces it -->"


def read_tensors(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not Path(path).exists():
        raise UserError(f"{path}: no such file")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: corrupt or truncated checkpoint ({e})") from None


def card_text_of_ours(path):
    """The text of the model card at `path` when this project wrote it (it carries the marker), else None."""
    text = Path(path).read_text(encoding="utf-8", errors="replace") if Path(path).is_file() else ""
    return text if CARD_MARKER in text else None


def card_files(folder, card):
    """{README.md: card} to write beside a model, or {} without a card or where the folder holds a README.md that
    this project did not write (kept, with a note)."""
    path = Path(folder) / CARD_NAME
    if card is None:
        return {}
    if path.is_file() and card_text_of_ours(path) is None:
        print(f"note: {path} is not a card this project wrote: kept as it is, no model card written", file=sys.stderr)
        return {}
    return {CARD_NAME: card}


def save_checkpoint(folder, weights_name, tensors, json_files, card=None):
    """Write `tensors` (safetensors, fp32), `json_files` ({name: object}) and the model `card` (README.md: see
    card_files) into `folder`, as save_pretrained does: these files are replaced together (all written before any is
    replaced), anything else there is left alone."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    texts = card_files(folder, card)
    try:
        with atomic_files(folder, [weights_name, *json_files, *texts]) as tmp:
            save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, tmp[weights_name],
                      metadata={"format": "pt"})
            for name, obj in json_files.items():
                Path(tmp[name]).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
            for name, text in texts.items():
                Path(tmp[name]).write_text(text, encoding="utf-8")
    except (OSError, SafetensorError) as e:  # a full disk, a quota, a folder gone read-only
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"{folder}: could not save the model ({reason}); its previous files are as they were") \
            from None


# PEFT's adapter format: `PeftModel.from_pretrained(GPT2ForSequenceClassification..., folder)` loads what we save,
# and adapters PEFT saved load here.
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


# --method head: the trained score head and LayerNorms alone, under transformers' names, and the base they go on.
HEAD_CONFIG, HEAD_WEIGHTS = "head_config.json", "head_model.safetensors"
# --method full: every weight, as transformers' save_pretrained writes them (what `export` writes for an adapter).
HF_CONFIG, HF_WEIGHTS = "config.json", "model.safetensors"

PEFT_PREFIX = "base_model.model."
LM_TASK = "CAUSAL_LM"  # PEFT's task type of a language-model adapter (a classifier's is SEQ_CLS)


def modules_to_save(model):
    """PEFT's name for what trains beside LoRA: the short names of those modules, e.g. ['ln_1', 'ln_2', 'ln_f',
    'score']."""
    names = []
    for name, module in model.named_modules():
        trains = any(p.requires_grad for key, p in module.named_parameters(recurse=False)
                     if not key.startswith("lora_"))  # DoRA's magnitude is the LoRA layer's own
        short = name.rsplit(".", 1)[-1]
        if trains and not short.startswith("lora_") and short not in names:
            names.append(short)
    return names


def save_adapter(model, folder, *, rank, alpha, dropout, targets, base_model, run_info, rslora=False, dora=False,
                 card=None):
    """Save the trainable tensors (LoRA A/B, DoRA's magnitudes, LayerNorms, a classifier's head) in PEFT's LoRA
    format for GPT2ForSequenceClassification (SEQ_CLS), or for GPT2LMHeadModel (CAUSAL_LM) when the model is a
    language model: `PeftModel.from_pretrained` loads the folder as it is."""
    tensors = {PEFT_PREFIX + k: v for k, v in model.named_parameters() if v.requires_grad}
    task = "SEQ_CLS" if isinstance(model, GPTClassifier) else LM_TASK
    config = {"peft_type": "LORA", "task_type": task, "base_model_name_or_path": base_model,
              "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(targets),
              "fan_in_fan_out": True,  # GPT-2's checkpoints store these layers as Conv1D (in, out)
              "bias": "none", "modules_to_save": modules_to_save(model),
              "use_rslora": rslora, "use_dora": dora, "inference_mode": True}
    save_checkpoint(folder, ADAPTER_WEIGHTS, tensors, {ADAPTER_CONFIG: config, RUN_INFO: run_info}, card)


def save_head(model, folder, *, base_model, run_info, card=None):
    """Save the trainable tensors of a --method head run (the score head, the LayerNorms) under their names in
    GPT2ForSequenceClassification, with the name of the base they were trained on."""
    tensors = {k: v for k, v in model.named_parameters() if v.requires_grad}
    config = {"method": "head", "task_type": "SEQ_CLS", "base_model_name_or_path": base_model,
              "modules": modules_to_save(model)}
    save_checkpoint(folder, HEAD_WEIGHTS, tensors, {HEAD_CONFIG: config, RUN_INFO: run_info}, card)


def save_full(model, folder, run_info, card=None):
    """Save every weight as a transformers checkpoint (GPT2ForSequenceClassification or GPT2LMHeadModel)."""
    save_checkpoint(folder, HF_WEIGHTS, model.hf_state_dict(), {HF_CONFIG: model.hf_config(), RUN_INFO: run_info},
                    card)


def adapter_files(folder):
    """(config, weights) of a folder of tensors trained on a base: a --method head run's, else a PEFT adapter's."""
    folder = Path(folder)
    if (folder / HEAD_CONFIG).is_file():
        return folder / HEAD_CONFIG, folder / HEAD_WEIGHTS
    return folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS


def is_adapter(folder):
    """A folder of tensors trained on a base it names: a LoRA adapter or a trained head."""
    return adapter_files(folder)[0].is_file()


def positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def positive_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def names(v, least=1):
    return isinstance(v, list) and len(v) >= least and all(isinstance(x, str) and x for x in v) and \
        len(set(v)) == len(v)


# {field: (test, what it must be, required)} of each config we read: a hand-edited value is refused when read,
# naming the file and the field, instead of failing later inside the model
ADAPTER_FIELDS = {"r": (positive_int, "a positive integer", True),
                  "lora_alpha": (positive_number, "a positive number", False),
                  "target_modules": (lambda v: isinstance(v, str) or names(v), "a layer name or a list of them", False),
                  "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a model id or folder", False)}
HEAD_FIELDS = {"base_model_name_or_path": ADAPTER_FIELDS["base_model_name_or_path"]}
STUDENT_FIELDS = {"vocab_size": (lambda v: positive_int(v) and v >= 50257, "at least 50257 (GPT-2's tokens)", False),
                  "hidden": (positive_int, "a positive integer", False),
                  "layers": (positive_int, "a positive integer", False),
                  "cell": (lambda v: v in ("rnn", "gru", "lstm"), "one of 'rnn', 'gru', 'lstm'", False),
                  "labels": (lambda v: names(v, least=2), "a list of two or more distinct class names", False)}


def checked_config(path, what, rules):
    """The JSON object in `path`, each field `rules` names checked (see ADAPTER_FIELDS)."""
    cfg = read_json(path, what)
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: corrupt {what} (not a JSON object)")
    for key, (ok, must, required) in rules.items():
        if key not in cfg and required:
            raise UserError(f"{path}: corrupt {what} (no {key!r} field)")
        if key in cfg and not ok(cfg[key]):
            raise UserError(f"{path}: {key} must be {must}, found {cfg[key]!r}")
    return cfg


def read_adapter_config(folder):
    """The LoRA settings of an adapter folder: {'r', 'alpha', 'targets', 'base_model', 'rslora', 'dora'}, refusing
    what we can't run."""
    path = adapter_files(folder)[0]
    if not Path(folder).is_dir():
        raise UserError(f"{folder}: no such adapter folder")
    if path.name == HEAD_CONFIG:  # no LoRA layers: the head and LayerNorms go on the base as they are
        base = checked_config(path, "head config", HEAD_FIELDS).get("base_model_name_or_path")
        return {"r": 0, "alpha": 0.0, "targets": [], "base_model": base, "rslora": False, "dora": False}
    cfg = checked_config(path, "adapter config", ADAPTER_FIELDS)
    for key, ok in (("peft_type", "LORA"), ("bias", "none")):
        if cfg.get(key, ok) != ok:
            raise UserError(f"{path}: {key}={cfg[key]!r} is not supported (only LoRA, rsLoRA, DoRA: {key}={ok!r})")
    for key in ("use_rslora", "use_dora"):
        if not isinstance(cfg.get(key, False), bool):
            raise UserError(f"{path}: {key} must be true or false, found {cfg[key]!r}")
    if cfg.get("layers_to_transform") is not None or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise UserError(f"{path}: per-layer ranks or layer subsets are not supported")
    wanted = cfg.get("target_modules") or []
    wanted = [wanted] if isinstance(wanted, str) else wanted
    targets = [t for t in LORA_TARGETS if any(t == w or t.endswith("." + w) for w in wanted)]
    unknown = [w for w in wanted if not any(t == w or t.endswith("." + w) for t in LORA_TARGETS)]
    if unknown or not targets:
        raise UserError(f"{path}: target_modules {unknown or wanted} are not GPT-2 layers we adapt "
                        f"(supported: {', '.join(LORA_TARGETS)})")
    return {"r": cfg["r"], "alpha": float(cfg.get("lora_alpha", 8)), "targets": targets,
            "base_model": cfg.get("base_model_name_or_path"), "rslora": cfg.get("use_rslora", False),
            "dora": cfg.get("use_dora", False)}


def adapter_task(folder):
    """PEFT's task_type of an adapter folder: "CAUSAL_LM" for a language model (gen), else a classifier (predict)."""
    return read_json(adapter_files(folder)[0], "adapter config").get("task_type") or "SEQ_CLS"


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


def load_lora_model(folder, variant, build_base):
    """The model an adapter's (or a trained head's) folder describes, LoRA folded in, in eval mode:
    `build_base(variant, random_init, seed, labels)` makes the base (pretrained, or random from the seed the
    adapter's run_info.json records) with the labels it records (CoLA's when it records none, as PEFT's adapters)."""
    cfg, info, variant = adapter_base(folder, variant)
    model = build_base(variant, info.get("random_init", False), info.get("seed", 0), info.get("labels", LABELS))
    if cfg["targets"]:
        inject_lora(model, cfg["r"], cfg["alpha"], 0.0, cfg["targets"], rslora=cfg["rslora"], dora=cfg["dora"])
    load_adapter_weights(model, folder)
    return fold_lora(model).eval().requires_grad_(False)


def injected_targets(named_parameters):
    """The LoRA targets present in a model, e.g. ['attn.c_attn', 'mlp.c_fc']."""
    return sorted({".".join(k.split(".")[3:5]) for k in named_parameters if ".lora_A." in k})


def load_adapter_weights(model, folder):
    """Copy an adapter's (or a trained head's) tensors into a model that already has LoRA injected with the same
    settings."""
    path = adapter_files(folder)[1]
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in read_tensors(path).items()}
    ours = dict(model.named_parameters())
    unknown = sorted(tensors.keys() - ours.keys())
    if unknown:
        raise UserError(f"{path}: holds {unknown[0]}, outside the target set {injected_targets(ours)} that "
                        f"{ADAPTER_CONFIG} declares")
    if isinstance(model, GPTClassifier) and "score.weight" not in tensors:
        raise UserError(f"{path}: no classification head (score.weight): not an adapter for sequence classification")
    missing = [k for k in ours if ".lora_" in k and k not in tensors]
    if missing:
        raise UserError(f"{path}: lacks {missing[0]}, inside the target set {injected_targets(ours)} that "
                        f"{ADAPTER_CONFIG} declares")
    with torch.no_grad():
        for key, value in tensors.items():
            if value.shape != ours[key].shape:
                raise UserError(f"{path}: {key} has shape {tuple(value.shape)} but this model's is "
                                f"{tuple(ours[key].shape)} (an adapter of another variant or rank)")
            ours[key].copy_(value)
    return sorted(tensors)


# A student checkpoint: config.json names the architecture, model.safetensors holds the weights.
STUDENT_CONFIG, STUDENT_WEIGHTS = "config.json", "model.safetensors"


def save_student(model, folder, run_info, card=None):
    save_checkpoint(folder, STUDENT_WEIGHTS, model.state_dict(),
                    {STUDENT_CONFIG: {"model_type": "DistilRNN", **asdict(model.config)}, RUN_INFO: run_info}, card)


def load_student(folder):
    """A DistilRNN checkpoint written by `run.py rnn` or `run.py distil`, in eval mode."""
    cfg = checked_config(Path(folder) / STUDENT_CONFIG, "student config", STUDENT_FIELDS)
    if cfg.get("model_type") != "DistilRNN":
        raise UserError(f"{folder}: not a DistilRNN checkpoint")
    model = DistilRNN(RNNConfig.from_dict(cfg))
    state = read_tensors(Path(folder) / STUDENT_WEIGHTS)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{folder}: weights do not fit its config ({str(e).splitlines()[0]})") from None
    return model.eval()


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


def build_lm(variant, random_init, seed, labels=None):
    """GPT-2 with its LM head, pretrained or (random_init) drawn from `seed`; an LM has no labels."""
    seed_everything(seed)
    return gpt_weights(GPT, variant, random_init)


def load_lora_lm(folder, variant=None):
    """The language model a CAUSAL_LM adapter (PEFT's) describes, LoRA folded into its base, in eval mode."""
    return load_lora_model(folder, variant, build_lm)


def load_full_classifier(folder):
    """A GPT2ForSequenceClassification checkpoint (--method full's, or an export), with the labels it names."""
    hf = read_json(Path(folder) / HF_CONFIG, "model config")
    names = hf.get("id2label") or {}
    labels = [names[str(i)] for i in range(len(names))] if len(names) >= 2 else LABELS
    weights = open_checkpoint(str(folder))
    if "score.weight" not in weights:
        raise UserError(f"{folder}: a GPT-2 with no score head (score.weight), not a classifier")
    model = GPTClassifier.from_pretrained(str(folder), labels=labels)
    with torch.no_grad():
        model.score.weight.copy_(weights["score.weight"]())
    return model.eval().requires_grad_(False)


def load_predictor(folder, variant):
    """A trained classifier (GPT-2 + LoRA, a trained head, every weight, or a student) from its folder, recognised by
    its files."""
    folder = Path(folder)
    if is_adapter(folder):
        return load_lora_classifier(folder, variant)
    held = folder_holds(folder)
    if held == "a transformers model":
        return load_full_classifier(folder)
    if held == "a student checkpoint":
        return load_student(folder)
    raise UserError(f"{folder}: neither a LoRA adapter folder ({ADAPTER_CONFIG}), a trained head ({HEAD_CONFIG}), a "
                    f"transformers classifier nor a student checkpoint ({STUDENT_CONFIG}); train one with "
                    "`python run.py LoRA` or `python run.py rnn`")


def save_trained(model, folder, run_info, card=None):
    """Write what a training run trained into its output folder: the student's checkpoint, or the LoRA adapter in
    PEFT's format, its settings read off the model's LoRA layers and its base named in run_info; with its model
    `card` (README.md)."""
    if isinstance(model, DistilRNN):
        save_student(model, folder, run_info, card)
        print(f"student saved to {folder}")
        return
    method = run_info.get("method", "lora")
    if method == "full":
        save_full(model, folder, run_info, card)
        print(f"every weight saved to {folder} ({type(model).__name__}: transformers' "
              f"{model.hf_config()['architectures'][0]}.from_pretrained loads it)")
        return
    if method == "head":
        save_head(model, folder, base_model=run_info["gpt_variant"], run_info=run_info, card=card)
        print(f"head and LayerNorms saved to {folder} (on {run_info['gpt_variant']})")
        return
    layer = lora_layers(model)[0]
    present = injected_targets(dict(model.named_parameters()))
    save_adapter(model, folder, rank=layer.rank, alpha=layer.alpha,
                 dropout=layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0,
                 targets=[t for t in LORA_TARGETS if t in present], base_model=run_info["gpt_variant"],
                 run_info=run_info, rslora=layer.rslora, dora=layer.dora, card=card)
    print(f"adapter saved to {folder} (PEFT format)")


def folder_holds(path):
    """Which model a folder holds: a LoRA adapter, a trained head, a student checkpoint, a transformers model, or
    None."""
    folder = Path(path)
    if (folder / HEAD_CONFIG).is_file():
        return "a trained head"
    if (folder / ADAPTER_CONFIG).is_file():
        return "a LoRA adapter"
    if not (folder / STUDENT_CONFIG).is_file():
        return None
    try:
        kind = json.loads((folder / STUDENT_CONFIG).read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        kind = None
    return "a student checkpoint" if kind == "DistilRNN" else "a transformers model"
