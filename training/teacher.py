"""The teacher of distillation: its logits on every split, computed once and cached on disk under a key of what
they depend on, and the check that it learnt the student's dataset."""
import hashlib
import os
from pathlib import Path
import time

import torch

from model import LABELS, cast_frozen_linears, count_parameters, variant_slug
from runtime.distributed import everyone, on_main
from textdata.batches import Split, data_fingerprint
from textdata.readers import run_stem
from train_utils import predict_logits
from training.checkpoints import load_lora_classifier, read_tensors
from training.kd_loss import UNLABELLED
from utils import UserError, atomic_path, file_sha256


def teacher_logits(splits, adapter, variant, *, batch_size, device, dtype):
    """The logits of the teacher (the `adapter` folder on its base `variant`) on every split, cached under a key
    made of the adapter's content, the base model, the dtype and the data: a second run with the same teacher
    neither builds nor runs it."""
    name = "-".join([run_stem("teacher", splits.spec), teacher_key(adapter, variant, dtype), data_fingerprint(splits)])
    return cached_teacher_logits(Path("models/cache") / f"{name}.safetensors",
                                 lambda: build_teacher(adapter, variant, device, dtype), splits, batch_size=batch_size,
                                 device=device, dtype=dtype)


def teacher_key(adapter, variant, dtype):
    """What the teacher's logits depend on besides the data: its adapter's files, its base and the dtype."""
    content = file_sha256(*(p for p in sorted(Path(adapter).iterdir()) if p.is_file()))
    key = hashlib.sha256(f"{content} {base_identity(variant)}".encode()).hexdigest()[:16]
    return "-".join([key, variant_slug(variant), str(dtype).removeprefix("torch.")])


def build_teacher(adapter, variant, device, dtype):
    return cast_frozen_linears(load_lora_classifier(Path(adapter), variant), dtype).to(device)


def transfer_teacher_logits(tokens, adapter, variant, spec, *, batch_size, device, dtype):
    """The teacher's logits (N, classes) on the transfer set's sentences, cached like teacher_logits under a key
    that adds the set's content, and whether they came from the cache."""
    content = hashlib.sha256(repr(tokens).encode()).hexdigest()[:16]
    name = f"{run_stem('transfer', spec)}-{teacher_key(adapter, variant, dtype)}-{content}"
    cache = Path("models/cache") / f"{name}.safetensors"
    hit = everyone(cache.exists())
    dummy = {"transfer": Split(tokens, torch.full((len(tokens),), UNLABELLED))}
    logits = cached_teacher_logits(cache, lambda: build_teacher(adapter, variant, device, dtype), dummy,
                                   batch_size=batch_size, device=device, dtype=dtype)
    return logits["transfer"], hit


def base_identity(variant):
    """A hub id as it is; a local folder by its absolute path and its files' sizes and modification times, so that
    a base replaced or rewritten in place (or another folder of the same name) gets its own teacher logits."""
    if not os.path.isdir(variant):
        return variant
    files = sorted(p for p in Path(variant).resolve().iterdir() if p.is_file())
    return repr([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def cached_teacher_logits(cache, build_teacher, splits, *, batch_size, device, dtype):
    """The teacher's logits on every split, its size and speed: read from the file `cache` when every rank has it
    (machines need not share a disk), else computed with the model `build_teacher()` returns and written there."""
    if everyone(cache.exists()):
        print(f"teacher logits from cache {cache}")
        return read_tensors(cache)
    teacher = build_teacher()
    logits = {"parameters": torch.tensor(count_parameters(teacher)[0])}
    for name, split in splits.items():
        start = time.perf_counter()
        logits[name] = predict_logits(teacher, split.tokens, batch_size=batch_size, device=device, dtype=dtype)
        logits[f"{name}_seconds"] = torch.tensor(time.perf_counter() - start)

    def write_cache():
        from safetensors.torch import save_file
        with atomic_path(cache) as tmp:
            save_file({k: v.contiguous() for k, v in logits.items()}, tmp)

    on_main(write_cache)
    return logits


def check_teacher_data(folder, info, splits):
    """A distil teacher must have learnt the dataset and label set its student learns (an adapter from before
    datasets other than CoLA, or from PEFT, is CoLA's). Nothing to check without data (--epochs 0)."""
    if splits is None:
        return
    theirs = (info.get("dataset", "cola"), info.get("dataset_name", "CoLA"), tuple(info.get("labels", LABELS)))
    ours = (splits.spec.slug, splits.spec.name, tuple(splits.labels))
    if (theirs[0], theirs[2]) != (ours[0], ours[2]):
        raise UserError(f"{folder}: the teacher was trained on {theirs[1]} with labels {list(theirs[2])}, not on "
                        f"{ours[1]} with labels {list(ours[2])}; train a teacher on it with `python run.py LoRA`")
