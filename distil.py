"""Knowledge distillation: the KD loss, the teacher's logits (cached on disk), and the report that sets teacher,
students and the majority class side by side."""
import hashlib
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from batches import data_fingerprint
from checkpoints import load_lora_classifier, read_tensors
from data import DataSpec, run_stem
from distributed import everyone, on_main
from metrics import majority_label, mcnemar_exact, scores
from model import LABELS, cast_frozen_linears, count_parameters, variant_slug
from report import PLOTS_DIR, format_table, plot_summary, score_cells, score_headers
from runlog import TUNING_DIR, read_jsonl
from train_utils import predict_logits
from utils import UserError, atomic_path, file_sha256


def kd_loss(student, teacher, labels, temperature, alpha):
    """Hinton et al.'s distillation loss: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    T^2 keeps the soft part's gradients on the scale of the hard part's as T grows.
    """
    T = temperature
    soft = F.kl_div(F.log_softmax(student.float() / T, -1), F.log_softmax(teacher.float() / T, -1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student.float(), labels)
    return alpha * T * T * soft + (1 - alpha) * hard


class KDLoss:
    def __init__(self, temperature, alpha):
        self.temperature, self.alpha = temperature, alpha

    def __call__(self, logits, labels, teacher):
        return kd_loss(logits, teacher, labels, self.temperature, self.alpha)


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


def report_entry(name, params, speed, preds):
    return {"name": name, "params": params, "speed": speed, **preds}


def print_distil_report(logits, splits, kd_run):
    """Teacher vs student with KD vs student without KD (latest matching `rnn` run) vs majority baseline, every
    number computed from saved predictions, with intervals; McNemar's test pairs the two students (or, without a
    no-KD run, the KD student and the baseline). Also draws plots/summary.png (summary-<dataset>.png)."""
    names, n = splits.evaluated, len(splits.labels)
    labels = {name: splits[name].labels for name in names}
    short = {"dev": "dev", "ood": "ood"} if splits.spec.is_cola else splits.titles
    majority = majority_label(splits["train"].labels)
    entries = [report_entry("teacher (GPT-2 + LoRA)", int(logits["parameters"]),
                            len(splits["dev"]) / float(logits["dev_seconds"]),
                            {k: logits[k].argmax(-1).tolist() for k in names}),
               report_entry("student with KD", kd_run["parameters"], kd_run["dev_sentences_per_s"],
                            {k: kd_run[f"{k}_preds"] for k in names})]
    nokd = latest_matching_rnn_run(kd_run)
    if nokd:
        entries.append(report_entry("student without KD", nokd["parameters"], nokd["dev_sentences_per_s"],
                                    {k: nokd[f"{k}_preds"] for k in names}))
    entries.append(report_entry("majority baseline", 0, 0, {k: [majority] * len(labels[k]) for k in names}))
    rows = []
    for e in entries:
        e["scores"] = scores(e["dev"], labels["dev"], n)
        ood = [score_cells(scores(e["ood"], labels["ood"], n))[0]] if "ood" in names else []
        rows.append([e["name"], f"{e['params'] / 1e6:.2f}M" if e["params"] else "-", *score_cells(e["scores"]),
                     *ood, f"{e['speed']:,.0f}" if e["speed"] else "-"])
    on = "" if splits.spec.is_cola else f" on {splits.spec.name}"
    print(f"\nDistillation report{on} (95% intervals: Wilson for accuracy, bootstrap for MCC)")
    headers = [f"{short['dev']} {h}" if h == "MCC" else h for h in score_headers(short["dev"], n)]
    print(format_table(["model", "params", *headers, *([f"{short['ood']} acc"] if "ood" in names else []),
                        "sentences/s"], rows))
    print_mcnemar(entries, labels["dev"], short["dev"], None if nokd else rnn_log(kd_run))
    for note in splits.notes:
        print(f"note: {note}")
    print(f"comparison chart: {plot_summary(entries, splits, PLOTS_DIR)}")


def print_mcnemar(entries, labels, title, missing_log):
    """McNemar's exact test of the student with KD against the third entry (without KD, or the baseline)."""
    other = entries[2]
    correct = {e["name"]: torch.tensor(e["dev"]) == labels for e in (entries[1], other)}
    only_kd, only_other, p = mcnemar_exact(correct["student with KD"], correct[other["name"]])
    print(f"McNemar's exact test, student with KD vs {other['name']} on the {len(labels)} {title} sentences: "
          f"{only_kd} right only with KD, {only_other} right only without; p = {p:.3g}")
    if missing_log:
        print(f"(no `run.py rnn` run with the same data, student shape, seed and training flags in {missing_log}: "
              "run it for the without-KD row)")


def rnn_log(run):
    """The log of `run.py rnn` runs on the dataset of `run`."""
    return f"{TUNING_DIR}/{run_stem('rnn', DataSpec.from_args(run['args']))}.jsonl"


def latest_matching_rnn_run(run):
    """The latest `run.py rnn` run on the same data, student shape, seed and training recipe as `run` (a distil
    run), if any: the two then differ by KD alone."""
    same = ("rnn_hidden", "rnn_layers", "rnn_cell", "max_examples", "seed", "lr", "epochs", "batch_size", "clip",
            "dtype")
    matches = [r for r in read_jsonl(rnn_log(run)) if r.get("finished", True) and r["data"] == run["data"]
               and all(r["args"].get(k) == run["args"].get(k) for k in same)]
    return matches[-1] if matches else None
