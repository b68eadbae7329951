"""Knowledge distillation: the KD loss, the teacher's logits (cached on disk), and the report that sets teacher,
students and the majority class side by side."""
import hashlib
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from textdata.batches import Split, data_fingerprint
from training.checkpoints import load_lora_classifier, read_tensors
from textdata.readers import DataSpec, run_stem
from runtime.distributed import everyone, on_main
from training.metrics import ECE_BINS, calibration, majority_label, mcnemar_exact, scores
from model import LABELS, cast_frozen_linears, count_parameters, variant_slug
from training.report import PLOTS_DIR, format_table, plot_calibration, plot_summary, score_cells, score_headers
from training.runlog import TUNING_DIR, read_jsonl
from train_utils import Classification, predict_logits
from utils import UserError, atomic_path, file_sha256


UNLABELLED = -1  # the label of a transfer sentence: the teacher's logits are all it has


def soft_rows(student, teacher, temperature, kind):
    """The soft term of each row (B,): Hinton's T^2 * KL(softmax(t/T) || softmax(s/T)) ("kl"), or Tang et al.'s
    squared distance between the logits themselves, ||t - s||^2 ("mse"; no temperature)."""
    s, t = student.float(), teacher.float()
    if kind == "mse":
        return ((s - t) ** 2).sum(-1)
    T = temperature
    log_p, log_q = F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)
    return T * T * (log_p.exp() * (log_p - log_q)).sum(-1)


def kd_loss(student, teacher, labels, temperature, alpha, kind="kl"):
    """The distillation loss, the mean over rows of: alpha * soft + (1 - alpha) * CE(s, y) on a labelled row (with
    "kl", Hinton et al.'s loss), the soft term alone, at full weight, on a transfer row (label UNLABELLED): alpha
    trades the soft term against the hard one, and a transfer row has no hard one.

    T^2 keeps the soft part's gradients on the scale of the hard part's as T grows.
    """
    soft = soft_rows(student, teacher, temperature, kind)
    labelled = labels != UNLABELLED
    hard = F.cross_entropy(student.float(), labels.clamp_min(0), reduction="none")
    return torch.where(labelled, alpha * soft + (1 - alpha) * hard, soft).mean()


class KDLoss(Classification):
    """A student's objective: a classifier's, but with kd_loss against the teacher's logits as its loss."""

    def __init__(self, temperature, alpha, kind="kl"):
        self.temperature, self.alpha, self.kind = temperature, alpha, kind

    def __call__(self, logits, labels, teacher):
        return kd_loss(logits, teacher, labels, self.temperature, self.alpha, self.kind)


def teacher_logits(splits, args, variant, device, dtype):
    """The teacher's logits on every split, cached under a key made of the adapter's content, the base model, the
    dtype and the data: a second run with the same teacher neither builds nor runs it."""
    name = "-".join([run_stem("teacher", splits.spec), teacher_key(args, variant, dtype), data_fingerprint(splits)])
    return cached_teacher_logits(Path("models/cache") / f"{name}.safetensors", lambda: build_teacher(args, variant,
                                 device, dtype), splits, batch_size=args.batch_size, device=device, dtype=dtype)


def teacher_key(args, variant, dtype):
    """What the teacher's logits depend on besides the data: its adapter's files, its base and the dtype."""
    folder = Path(args.model_path)
    adapter = file_sha256(*(p for p in sorted(folder.iterdir()) if p.is_file()))
    key = hashlib.sha256(f"{adapter} {base_identity(variant)}".encode()).hexdigest()[:16]
    return "-".join([key, variant_slug(variant), str(dtype).removeprefix("torch.")])


def build_teacher(args, variant, device, dtype):
    return cast_frozen_linears(load_lora_classifier(Path(args.model_path), variant), dtype).to(device)


def transfer_teacher_logits(tokens, args, variant, device, dtype, spec):
    """The teacher's logits (N, classes) on the transfer set's sentences, cached like teacher_logits under a key
    that adds the set's content, and whether they came from the cache."""
    content = hashlib.sha256(repr(tokens).encode()).hexdigest()[:16]
    name = f"{run_stem('transfer', spec)}-{teacher_key(args, variant, dtype)}-{content}"
    cache = Path("models/cache") / f"{name}.safetensors"
    hit = everyone(cache.exists())
    dummy = {"transfer": Split(tokens, torch.full((len(tokens),), UNLABELLED))}
    logits = cached_teacher_logits(cache, lambda: build_teacher(args, variant, device, dtype), dummy,
                                   batch_size=args.batch_size, device=device, dtype=dtype)
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


def report_entry(name, params, speed, preds, probs=None, calibrated=None):
    return {"name": name, "params": params, "speed": speed, **preds, "probs": probs, "calibration": calibrated}


def run_entry(name, run, names):
    """A report row of a logged student run (runs logged before calibration have no probabilities)."""
    return report_entry(name, run["parameters"], run["dev_sentences_per_s"], {k: run[f"{k}_preds"] for k in names},
                        run.get("dev_probs"), run.get("calibration"))


def teacher_entry(logits, splits):
    heldout = splits.get("heldout")
    return report_entry("teacher (GPT-2 + LoRA)", int(logits["parameters"]),
                        len(splits["dev"]) / float(logits["dev_seconds"]),
                        {k: logits[k].argmax(-1).tolist() for k in splits.evaluated}, logits["dev"].softmax(-1),
                        calibration(logits.get("heldout"), None if heldout is None else heldout.labels,
                                    logits["dev"], splits["dev"].labels))


def majority_entry(splits):
    """Always the training set's majority class, with the training set's class frequencies as its probabilities."""
    majority, n = majority_label(splits["train"].labels), len(splits.labels)
    log_prior = torch.bincount(splits["train"].labels, minlength=n).double().clamp_min(1).log()
    heldout = splits.get("heldout")
    constant = {k: log_prior.expand(len(splits[k]), n) for k in (*splits.evaluated, "heldout") if k in splits}
    return report_entry("majority baseline", 0, 0, {k: [majority] * len(splits[k]) for k in splits.evaluated},
                        constant["dev"].softmax(-1),
                        calibration(constant.get("heldout"), None if heldout is None else heldout.labels,
                                    constant["dev"], splits["dev"].labels))


def report_entries(logits, splits, run):
    """The report's rows: the teacher, this run, the same distillation without a transfer set (when this run has
    one), the student without KD (when logged), the majority class; and the rnn log searched, if it had no match."""
    names, transfer = splits.evaluated, run.get("transfer")
    entries = [teacher_entry(logits, splits),
               run_entry("student with KD + transfer set" if transfer else "student with KD", run, names)]
    plain = latest_matching_distil_run(run) if transfer else None
    if plain:
        entries.append(run_entry("student with KD", plain, names))
    nokd = latest_matching_rnn_run(run)
    if nokd:
        entries.append(run_entry("student without KD", nokd, names))
    return entries + [majority_entry(splits)], None if nokd else rnn_log(run)


def print_distil_report(logits, splits, kd_run):
    """Teacher vs student with KD (+ transfer set) vs the same without the transfer set vs student without KD
    (latest matching logged runs) vs majority baseline, every number computed from saved predictions, with
    intervals and the ECE before and after temperature scaling; McNemar's test pairs this run's student with each
    other student (or, with none, the baseline). Also draws plots/summary.png and plots/calibration.png
    (summary-<dataset>.png, calibration-<dataset>.png)."""
    names, n = splits.evaluated, len(splits.labels)
    short = {"dev": "dev", "ood": "ood"} if splits.spec.is_cola else splits.titles
    entries, missing_log = report_entries(logits, splits, kd_run)
    rows = []
    for e in entries:
        e["scores"] = scores(e["dev"], splits["dev"].labels, n)
        ood = [score_cells(scores(e["ood"], splits["ood"].labels, n))[0]] if "ood" in names else []
        c = e["calibration"]
        ece = [f"{c['ece']:.3f}", f"{c['ece_scaled']:.3f} (T {c['temperature']:.2f})"] if c else ["-", "-"]
        rows.append([e["name"], f"{e['params'] / 1e6:.2f}M" if e["params"] else "-", *score_cells(e["scores"]),
                     *ood, *ece, f"{e['speed']:,.0f}" if e["speed"] else "-"])
    on = "" if splits.spec.is_cola else f" on {splits.spec.name}"
    print(f"\nDistillation report{on} (95% intervals: Wilson for accuracy, bootstrap for MCC; ECE in {ECE_BINS} "
          f"bins, T fitted on the {len(splits.get('heldout', []))} held-out training sentences)")
    headers = [f"{short['dev']} {h}" if h == "MCC" else h for h in score_headers(short["dev"], n)]
    print(format_table(["model", "params", *headers, *([f"{short['ood']} acc"] if "ood" in names else []),
                        f"{short['dev']} ECE", "ECE after T", "sentences/s"], rows))
    print_mcnemar(entries, splits["dev"].labels, short["dev"], missing_log)
    if kd_run.get("transfer"):
        print(transfer_line(kd_run["transfer"], splits.labels))
    for note in splits.notes:
        print(f"note: {note}")
    print(f"comparison chart: {plot_summary(entries, splits, PLOTS_DIR, kd_run.get('transfer'))}; reliability "
          f"diagram: {plot_calibration(entries, splits, PLOTS_DIR)}")


def transfer_line(t, labels):
    """What the transfer set is: size, source, what was dropped, the teacher's labels on it."""
    counts = t.get("teacher_labels") or [0] * len(labels)
    balance = ", ".join(f"{c / max(1, sum(counts)):.1%} {name}" for name, c in zip(labels, counts))
    leaked = ", ".join(f"{v} {k}" for k, v in t["leaked"].items())
    cache = "from the cache" if t.get("teacher_cache_hit") else "computed"
    return (f"transfer set: {t['size']:,} sentences ({t['source']}); dropped: {t['dropped']:,} duplicates or equal "
            f"to a training sentence, equal to a held-out sentence: {leaked}; the teacher labels them {balance} "
            f"(its logits {cache})")


def print_mcnemar(entries, labels, title, missing_log):
    """McNemar's exact test of this run's student (the second entry) against each other student, or against the
    baseline when there is none."""
    ours = entries[1]
    others = [e for e in entries[2:] if e["name"].startswith("student")] or [entries[-1]]
    for other in others:
        a, b = (torch.tensor(e["dev"]) == labels for e in (ours, other))
        only_ours, only_other, p = mcnemar_exact(a, b)
        print(f"McNemar's exact test, {ours['name']} vs {other['name']} on the {len(labels)} {title} sentences: "
              f"{only_ours} right only with the first, {only_other} right only with the second; p = {p:.3g}")
    if missing_log:
        print(f"(no `run.py rnn` run with the same data, student shape, seed and training flags in {missing_log}: "
              "run it for the without-KD row)")


def rnn_log(run):
    """The log of `run.py rnn` runs on the dataset of `run`."""
    return f"{TUNING_DIR}/{run_stem('rnn', DataSpec.from_args(run['args']))}.jsonl"


SAME_RECIPE = ("rnn_hidden", "rnn_layers", "rnn_cell", "max_examples", "seed", "lr", "epochs", "batch_size", "clip",
               "dtype")


def latest_matching_rnn_run(run):
    """The latest `run.py rnn` run on the same data, student shape, seed and training recipe as `run` (a distil
    run), if any: the two then differ by KD alone."""
    return latest_match(rnn_log(run), run, SAME_RECIPE)


def latest_matching_distil_run(run):
    """The latest `run.py distil` run with the same teacher, KD loss, data, student and recipe as `run` but no
    transfer set, if any: the two then differ by the transfer set alone."""
    log = f"{TUNING_DIR}/{run_stem('distil', DataSpec.from_args(run['args']))}.jsonl"
    same = SAME_RECIPE + ("model_path", "temperature", "alpha", "kd_loss")
    return latest_match(log, run, same, lambda r: not (r["args"].get("augment") or r["args"].get("transfer_gen")))


def latest_match(log, run, same, also=lambda r: True):
    """The latest finished run in `log` on `run`'s data with the same values of the flags `same`."""
    default = {"kd_loss": "kl"}  # runs logged before the flag existed used Hinton's KL
    matches = [r for r in read_jsonl(log) if r.get("finished", True) and r["data"] == run["data"] and also(r)
               and all(r["args"].get(k, default.get(k)) == run["args"].get(k) for k in same)]
    return matches[-1] if matches else None
