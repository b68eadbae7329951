"""The distillation report: teacher, students with and without KD and the majority class side by side, with
intervals, McNemar's test and calibration, the students' rows from their logged runs."""
import torch

from config.fields import deciding_values
from config.records import read_records
from textdata.readers import run_stem
from training.metrics import ECE_BINS, calibration, majority_label, mcnemar_exact, scores
from training.plots import plot_calibration, plot_summary
from training.tables import format_table, score_cells, score_headers
from utils import PLOTS_DIR, TUNING_DIR


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
    (summary-<dataset>.png, calibration-<dataset>.png). Returns the comparison as the run's record keeps it: its
    rows, McNemar's tests and the two plots."""
    names, n = splits.evaluated, len(splits.labels)
    short = {"dev": "dev", "ood": "ood"} if splits.spec.is_cola else splits.titles
    entries, missing_log = report_entries(logits, splits, kd_run)
    rows, kept = [], []
    for e in entries:
        e["scores"] = scores(e["dev"], splits["dev"].labels, n)
        ood = scores(e["ood"], splits["ood"].labels, n) if "ood" in names else None
        c = e["calibration"]
        ece = [f"{c['ece']:.3f}", f"{c['ece_scaled']:.3f} (T {c['temperature']:.2f})"] if c else ["-", "-"]
        rows.append([e["name"], f"{e['params'] / 1e6:.2f}M" if e["params"] else "-", *score_cells(e["scores"]),
                     *([score_cells(ood)[0]] if ood else []), *ece, f"{e['speed']:,.0f}" if e["speed"] else "-"])
        kept.append({"name": e["name"], "parameters": e["params"], "sentences_per_s": e["speed"], "dev": e["scores"],
                     "ood": ood, "calibration": c and {k: c[k] for k in ("ece", "ece_scaled", "temperature")}})
    on = "" if splits.spec.is_cola else f" on {splits.spec.name}"
    print(f"\nDistillation report{on} (95% intervals: Wilson for accuracy, bootstrap for MCC; ECE in {ECE_BINS} "
          f"bins, T fitted on the {len(splits.get('heldout', []))} held-out training sentences)")
    headers = [f"{short['dev']} {h}" if h == "MCC" else h for h in score_headers(short["dev"], n)]
    print(format_table(["model", "params", *headers, *([f"{short['ood']} acc"] if "ood" in names else []),
                        f"{short['dev']} ECE", "ECE after T", "sentences/s"], rows))
    tests = print_mcnemar(entries, splits["dev"].labels, short["dev"], missing_log)
    if kd_run.get("transfer"):
        print(transfer_line(kd_run["transfer"], splits.labels))
    for note in splits.notes:
        print(f"note: {note}")
    plots = [plot_summary(entries, splits, PLOTS_DIR, kd_run.get("transfer")), plot_calibration(entries, splits,
                                                                                                 PLOTS_DIR)]
    print(f"comparison chart: {plots[0]}; reliability diagram: {plots[1]}")
    return {"rows": kept, "mcnemar": tests, "plots": plots}


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
    baseline when there is none; returns each test's pair, counts and p."""
    ours, tests = entries[1], []
    others = [e for e in entries[2:] if e["name"].startswith("student")] or [entries[-1]]
    for other in others:
        a, b = (torch.tensor(e["dev"]) == labels for e in (ours, other))
        only_ours, only_other, p = mcnemar_exact(a, b)
        print(f"McNemar's exact test, {ours['name']} vs {other['name']} on the {len(labels)} {title} sentences: "
              f"{only_ours} right only with the first, {only_other} right only with the second; p = {p:.3g}")
        tests.append({"first": ours["name"], "second": other["name"], "only_first": only_ours,
                      "only_second": only_other, "p": p})
    if missing_log:
        print(f"(no `run.py rnn` run with the same data, student shape, seed and training flags in {missing_log}: "
              "run it for the without-KD row)")
    return tests


def rnn_log(run):
    """The log of `run.py rnn` runs on the dataset of `run` (a RunRecord)."""
    return f"{TUNING_DIR}/{run_stem('rnn', run.config.data)}.jsonl"


# The sections of two runs' configurations that make them the same recipe: where it runs (the seed, the dtype),
# how it trains and the student's shape (each section's fields that decide a result); the data is compared by its
# fingerprint.
STUDENT_RECIPE = ("run", "train", "student")


def recipe(config, sections):
    """What decides the result in the named sections of `config`."""
    return {name: deciding_values(getattr(config, name)) for name in sections}


def latest_matching_rnn_run(run):
    """The latest `run.py rnn` run on the same data, student shape, seed and training recipe as `run` (a distil
    run's RunRecord), if any: the two then differ by KD alone."""
    return latest_match(rnn_log(run), run, lambda r: recipe(r.config, STUDENT_RECIPE) == recipe(run.config,
                                                                                                STUDENT_RECIPE))


def latest_matching_distil_run(run):
    """The latest `run.py distil` run with the same teacher, KD loss, data, student and recipe as `run` but no
    transfer set, if any: the two then differ by the transfer set alone."""
    log = f"{TUNING_DIR}/{run_stem('distil', run.config.data)}.jsonl"
    sections = (*STUDENT_RECIPE, "distil")
    return latest_match(log, run, lambda r: not r.config.transfer.wanted and r.config.model_path == run.config.model_path
                        and recipe(r.config, sections) == recipe(run.config, sections))


def latest_match(log, run, same):
    """The latest finished run in `log` on `run`'s data for which `same(record)` holds."""
    matches = [r for r in read_records(log) if r.finished and r["data"] == run["data"] and same(r)]
    return matches[-1] if matches else None
