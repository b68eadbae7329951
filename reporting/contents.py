"""What `run.py report` says: the run records of a runs folder (its tuning/ and plots/), which of them it shows, and
its sections in the assignment's order: text generation, LoRA, distillation, sweeps, where the numbers come from."""
from dataclasses import dataclass
import json
from pathlib import Path
import re
import time

from config.records import RunRecord, json_record, read_record, record_id
from config.subcommands import GEN_PROMPT
from reporting.document import Code, Document, Heading, Image, Items, Paragraph, Section, Table
from reporting.number_format import formatted, with_interval
from reporting.run_blocks import (hyperparameter_table, is_lm, parameter_table, provenance_blocks,
                                  results_blocks, split_titles)
from training.run_watch import lora_method
from utils import PLOTS_DIR, TUNING_DIR, UserError


@dataclass(frozen=True)
class Logged:
    """A run record as the report reads it: its id, where it is (file:line) and what it holds."""
    id: str
    where: str
    record: RunRecord
    order: int


def read_logs(runs):
    """Every run record in `runs`/tuning/*.jsonl, and a note on each line skipped (one that is not JSON, or not a
    run record of this project). gen --dataset's outputs, one JSON line per prompt and no run, are not records."""
    logged, notes = [], []
    for path in sorted((Path(runs) / TUNING_DIR).glob("*.jsonl")):
        for number, text in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            where, line = f"{path}:{number}", json_record(text)
            if line is not None and "mode" not in line:
                continue
            try:
                record = None if line is None else read_record(line)
            except (TypeError, KeyError, ValueError, AttributeError):
                record = None
            if record is None and text.strip():
                notes.append(f"`{where}`: {'not a JSON record' if line is None else 'not a run record of this project'}"
                             ", skipped")
            elif record is not None:
                logged.append(Logged(record_id(line), where, record, len(logged)))
    return logged, notes


def group_of(run):
    """What makes two runs the same experiment, of which the report shows one: mode, model, what trains (LoRA's
    --method), task and dataset."""
    config = run.record.config
    if config.MODE == "gen":
        return "gen", config.adapter or config.model.gpt_variant
    model = getattr(config, "model", None)
    return (config.MODE, model and model.gpt_variant, lora_method(config), run.record.get("task", "classify"),
            config.data.name)


def dev_score(run):
    """The dev score `--select best` ranks by: accuracy, or (a language model) minus perplexity."""
    r = run.record
    return -r["dev_perplexity"] if is_lm(r) else r["dev_acc"]


def chosen_runs(logged, select, pinned):
    """{group: the run shown}: a run `pinned` (--run), else the latest finished one, or (`select` "best") the best
    by dev score; an unfinished run is never shown as a result."""
    pinned = tuple(pinned or ())
    ids = {run.id: run for run in logged}
    for run_id in pinned:
        if run_id not in ids:
            raise UserError(f"--run {run_id}: no run record has this id (the report lists each run's id)")
        if not ids[run_id].record.finished:
            raise UserError(f"--run {run_id}: that run ({ids[run_id].where}) has not finished: it has no result")
    groups = {}
    for run in sorted(logged, key=lambda r: (r.record.get("time", ""), r.order)):
        if run.record.finished:
            groups.setdefault(group_of(run), []).append(run)
    shown = {}
    for group, runs in groups.items():
        pins = [r for r in runs if r.id in pinned]
        best = select == "best" and group[0] != "gen"
        shown[group] = pins[-1] if pins else max(runs, key=dev_score) if best else runs[-1]
    return shown


def unfinished_items(logged, modes):
    """The runs of `modes` that have not finished (still training, stopped, or pruned by a search): listed, never
    reported as results."""
    items = []
    for run in logged:
        r = run.record
        if r.config.MODE in modes and not r.finished:
            done = len(r.get("history") or [])
            why = "pruned by the search" if r.get("pruned") else "still training, or stopped"
            items.append(f"run `{run.id}` (`{run.where}`), {done} of {r.config.train.epochs} epochs when last "
                         f"written at {r.get('time', '?')}: {why}; not a result")
    return [Paragraph("Runs not finished:"), Items(tuple(items))] if items else []


def none_yet(mode, command):
    return Paragraph(f"No finished `{mode}` run yet: `{command}` makes one.")


def in_runs(runs, path):
    """A path a record holds (relative to where its run started) in the runs folder."""
    return str(Path(path) if Path(path).is_absolute() else Path(runs) / path)


# Text generation

def gen_blocks(run):
    r, config = run.record, run.record.config
    d = config.decode
    model = f"adapter `{config.adapter}`" if config.adapter else f"`{config.model.gpt_variant}`"
    settings = (("--max_new_tokens", d.max_new_tokens), ("temperature", d.sampling_temperature), ("--top_k", d.sampling_top_k),
                ("--top_p", d.top_p), ("--repetition_penalty", d.repetition_penalty), ("--num_beams", d.num_beams),
                ("--num_samples", config.num_samples), ("--seed", config.run.seed))
    blocks = [Heading(f"{model} (run `{run.id}`)"), Table(("setting", "value"), tuple(
        (name, "-" if value is None else str(value)) for name, value in settings)), Paragraph("Prompt:"),
        Code(r["prompt"])]
    for i, text in enumerate(r.get("samples") or [], start=1):
        blocks += [Paragraph(f"Sample {i}, after the prompt:"), Code(text)]
    blocks.append(Paragraph(f"{formatted(r.get('tokens_per_s'), 'rate')} tokens/s on {r.get('device', '-')} in "
                            f"{r.get('dtype', '-')}."))
    return blocks


def generation_section(shown):
    runs = [run for group, run in shown.items() if group[0] == "gen"]
    blocks = [b for run in runs for b in gen_blocks(run)]
    return Section("Text generation", tuple(blocks or [none_yet("gen", f'python run.py gen --prompt "{GEN_PROMPT}"')]))


# Training runs

def run_title(run):
    config, r = run.record.config, run.record
    model = getattr(config, "model", None)
    on = f"`{model.gpt_variant}` on " if config.MODE == "LoRA" else ""
    trained = f" --method {lora_method(config)}" if lora_method(config) not in (None, "lora") else ""
    return f"{config.MODE}{trained}{' --task lm' if is_lm(r) else ''}: {on}{config.data.name} (run `{run.id}`)"


def generation_scores(runs, record):
    """BLEU and ROUGE-L of `gen --dataset` with this run's adapter (tuning/gen-<dataset>.json), where present."""
    rows = []
    for path in sorted((Path(runs) / TUNING_DIR).glob("gen*.json")):
        try:
            scores = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(scores, dict) and scores.get("adapter") == record.config.model_path and "bleu" in scores:
            names = scores.get("models") or {}
            rows += [(names.get(key, key), formatted(scores[f"{prefix}bleu"], "score"),
                      formatted(scores[f"{prefix}rougeL"], "score"))
                     for key, prefix in (("output", ""), ("base_output", "base_")) if f"{prefix}bleu" in scores]
    return [Paragraph("Generation as evaluation (`gen --dataset`, greedy):"), Table(("model", "BLEU", "ROUGE-L"),
                                                                                   tuple(rows))] if rows else []


def training_blocks(runs, run):
    """One training run: the parameter table, hyper-parameters, scores beside the baseline, its per-epoch plots."""
    r = run.record
    blocks = [Heading(run_title(run)), Paragraph(f"Parameters, as `run.py {r.config.MODE}` printed them:"),
              parameter_table(r), Paragraph("Hyper-parameters:"), hyperparameter_table(r), *results_blocks(r)]
    if is_lm(r):
        blocks += generation_scores(runs, r)
    return blocks + [Image(in_runs(runs, p), f"{r.config.MODE}: {Path(p).stem.split('_')[-1]} per epoch")
                     for p in r.get("plots") or []]


def lora_section(runs, shown, logged):
    chosen = [run for group, run in shown.items() if group[0] == "LoRA"]
    blocks = [b for run in chosen for b in training_blocks(runs, run)]
    blocks = blocks or [none_yet("LoRA", "python run.py LoRA --gpt_variant gpt2-medium")]
    return Section("LoRA fine-tuning", tuple(blocks + unfinished_items(logged, ("LoRA",))))


# Distillation

def student_table(run):
    s = run.record.config.student
    return Table(("student", "value"), (("cell", s.rnn_cell), ("layers", str(s.rnn_layers)),
                                        ("hidden size", str(s.rnn_hidden)),
                                        ("parameters", formatted(run.record["parameters"], "millions"))))


def comparison_blocks(runs, run):
    """The distil run's comparison as it recorded it: teacher, students and majority class side by side, McNemar's
    tests, the transfer set, the summary and calibration plots."""
    c, r = run.record.get("comparison"), run.record
    if not c:
        return [Paragraph("This record has no comparison of teacher and students (it predates it): rerun "
                          f"`{r.get('command') or 'python run.py distil'}` for one.")]
    titles = split_titles(r)
    ood = any(row["ood"] for row in c["rows"])
    headers = ("model", "parameters", f"{titles['dev']} accuracy", f"{titles['dev']} MCC",
               *([f"{titles['ood']} accuracy"] if ood else []), "dev ECE", "ECE after T (T)", "sentences/s")
    rows = []
    for row in c["rows"]:
        dev, cal = row["dev"], row["calibration"]
        rows.append((row["name"], formatted(row["parameters"] or None, "millions"),
                     with_interval(dev["acc"], dev["acc_ci"], "percent"),
                     with_interval(dev["mcc"], dev["mcc_ci"], "mcc"),
                     *([with_interval(row["ood"]["acc"], row["ood"]["acc_ci"], "percent") if row["ood"] else "-"]
                       if ood else []),
                     formatted(cal and cal["ece"], "ece"),
                     f"{formatted(cal['ece_scaled'], 'ece')} ({formatted(cal['temperature'], 'temperature')})"
                     if cal else "-", formatted(row["sentences_per_s"] or None, "rate")))
    tests = [f"{t['first']} vs {t['second']}: {t['only_first']} right only with the first, {t['only_second']} only "
             f"with the second; McNemar's p = {formatted(t['p'], 'p')}" for t in c["mcnemar"]]
    blocks = [Table(headers, tuple(rows)), Paragraph("McNemar's exact test on the dev sentences:"), Items(tuple(tests))]
    t = r.get("transfer")
    if t:
        leaked = ", ".join(f"{v} {k}" for k, v in (t.get("leaked") or {}).items()) or "none"
        blocks.append(Paragraph(f"Transfer set: {formatted(t['size'], 'count')} sentences ({t['source']}); dropped "
                                f"{formatted(t['dropped'], 'count')} duplicates or copies of training sentences, and "
                                f"as equal to a held-out sentence: {leaked}."))
    return blocks + [Image(in_runs(runs, p), caption) for p, caption in zip(
        c["plots"], ("teacher and students: accuracy, MCC, ECE, size and speed", "reliability diagram"))]


def distillation_section(runs, shown, logged):
    blocks = []
    for group, run in shown.items():
        if group[0] == "distil":
            blocks += [*training_blocks(runs, run), Paragraph("The student:"), student_table(run),
                       *comparison_blocks(runs, run)]
    for group, run in shown.items():
        if group[0] == "rnn":
            blocks += [*training_blocks(runs, run), Paragraph("The student without KD:"), student_table(run)]
    blocks = blocks or [none_yet("distil", "python run.py distil"), Paragraph(
        "It needs a LoRA teacher first (`python run.py LoRA`); `python run.py rnn` trains the student without KD.")]
    return Section("Distillation", tuple(blocks + unfinished_items(logged, ("distil", "rnn"))))


# Sweeps

def markdown_blocks(text):
    """The blocks of a sweep's summary (tuning/<name>.md, Markdown of headings, tables, lists and paragraphs)."""
    blocks, table, items = [], [], []

    def flush():
        if table:
            blocks.append(Table(tuple(table[0]), tuple(tuple(row) for row in table[1:])))
        if items:
            blocks.append(Items(tuple(items)))
        table.clear()
        items.clear()

    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                table.append([c.replace("**", "") for c in cells])
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush()
        if line.startswith("#"):
            blocks.append(Heading(line.lstrip("#").strip()))
        elif line:
            blocks.append(Paragraph(line.replace("**", "")))
    flush()
    return blocks


def sweeps_section(runs):
    blocks = []
    for path in sorted((Path(runs) / TUNING_DIR).glob("*.md")):
        blocks += markdown_blocks(path.read_text(encoding="utf-8", errors="replace"))
        blocks.append(Image(str(Path(runs) / PLOTS_DIR / f"tune_{path.stem}.png"), f"sweep {path.stem}"))
    return Section("Sweeps", tuple(blocks or [none_yet(
        "tune", "python run.py tune distil --seeds 1 2 3 --grid temperature=1,2,4")]))


def provenance_section(shown):
    blocks = [b for run in shown.values()
              for b in (Heading(f"{run.record.config.MODE} run `{run.id}` (`{run.where}`)"),
                        *provenance_blocks(run.record, run.id))]
    return Section("Where the numbers come from", tuple(blocks or [Paragraph("No run is shown.")]))


def report_document(runs, select="latest", pinned=()):
    """The report of the runs started in the folder `runs`."""
    logged, notes = read_logs(runs)
    shown = chosen_runs(logged, select, pinned)
    which = "the best finished run by dev score" if select == "best" else "the latest finished run"
    intro = [Paragraph(f"Made by `python run.py report` from the {len(logged)} run records in "
                       f"`{Path(runs) / TUNING_DIR}` on {time.strftime('%Y-%m-%d %H:%M')}: for each mode, model, task "
                       f"and dataset, {which}{' (or the one --run names)' if pinned else ''}. Accuracies are "
                       "percentages with 95% intervals in brackets.")]
    if notes:
        intro += [Paragraph("Lines skipped:"), Items(tuple(notes))]
    return Document("GPT-2: generation, LoRA and distillation", tuple(intro), (
        generation_section(shown), lora_section(runs, shown, logged), distillation_section(runs, shown, logged),
        sweeps_section(runs), provenance_section(shown)))
